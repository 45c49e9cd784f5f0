"""scripts/download_models.py on local files and a local HTTP server (no real download): checksums, zip integrity,
truncation, unzip where the originals did, atomic writes, and the one-line errors when a server cannot be reached."""
from __future__ import annotations

import hashlib
import http.server
import importlib.util
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("download_models", REPO / "scripts" / "download_models.py")
dm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("download_models", dm)  # dataclasses look their module up there
_spec.loader.exec_module(dm)


@pytest.fixture()
def archive(tmp_path):
    """A published-style archive: model.ckpt (a torch zip) and config.yaml, and its sha256."""
    ckpt = tmp_path / "src" / "model.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, ckpt)
    path = tmp_path / "kl-f8.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.write(ckpt, "model.ckpt")
        z.writestr("config.yaml", "model: {}\n")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def entry(url: str, target: str = "models/first_stage_models/kl-f8/model.zip", **kwargs) -> dm.Entry:
    return dm.Entry("test", "first_stages", url, target, **kwargs)


def test_archive_is_verified_and_unzipped_where_the_original_unzips(archive, tmp_path):
    path, sha = archive
    root = tmp_path / "repo"
    target = dm.fetch(entry(path.as_uri(), unzip=True, sha256=sha), root)
    assert target == root / "models/first_stage_models/kl-f8/model.zip" and target.read_bytes() == path.read_bytes()
    state = torch.load(target.parent / "model.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state["w"], torch.arange(4.0))
    assert (target.parent / "config.yaml").read_text() == "model: {}\n"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_checksum_mismatch_keeps_nothing(archive, tmp_path):
    path, sha = archive
    root = tmp_path / "repo"
    with pytest.raises(dm.DownloadError, match="does not match the published"):
        dm.fetch(entry(path.as_uri(), sha256="0" * 64), root)
    with pytest.raises(dm.DownloadError, match="does not start with the published ffff"):
        dm.fetch(entry(path.as_uri(), sha256_prefix="ffff"), root)
    folder = root / "models/first_stage_models/kl-f8"
    assert not folder.exists() or not list(folder.iterdir())  # neither the file nor a temporary is left
    assert dm.fetch(entry(path.as_uri(), sha256_prefix=sha[:8]), root).is_file()


def test_without_a_published_checksum_the_zip_is_checked(tmp_path, archive):
    root = tmp_path / "repo"
    plain = tmp_path / "model.ckpt"
    plain.write_bytes(b"not a checkpoint")
    with pytest.raises(dm.DownloadError, match="not a zip archive"):
        dm.fetch(entry(plain.as_uri(), "models/x/model.ckpt"), root)
    path, _ = archive
    data = bytearray(path.read_bytes())
    offset = data.index(b"model: {}")  # the stored (uncompressed) member's bytes
    data[offset] ^= 0xFF
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(data))
    with pytest.raises(dm.DownloadError, match="config.yaml is corrupt"):
        dm.fetch(entry(broken.as_uri(), "models/x/model.zip"), root)
    assert not (root / "models/x/model.zip").exists()


def test_existing_targets_are_kept_unless_forced(archive, tmp_path, capsys):
    path, _ = archive
    root = tmp_path / "repo"
    target = root / "models/first_stage_models/kl-f8/model.zip"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old")
    dm.fetch(entry(path.as_uri()), root)
    assert target.read_bytes() == b"old" and "exists" in capsys.readouterr().out
    dm.fetch(entry(path.as_uri()), root, force=True)
    assert target.read_bytes() == path.read_bytes()


def test_members_outside_the_folder_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escaped.txt", "x")
    with pytest.raises(dm.DownloadError, match="would be written outside"):
        dm.fetch(entry(evil.as_uri(), "models/y/model.zip", unzip=True), tmp_path / "repo")
    assert not (tmp_path / "escaped.txt").exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/missing.zip":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        announced = len(self.payload) + (100 if self.path == "/truncated.zip" else 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(archive):
    _Handler.payload = archive[0].read_bytes()
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_http_download_size_truncation_and_http_errors(server, archive, tmp_path):
    root = tmp_path / "repo"
    target = dm.fetch(entry(f"{server}/kl-f8.zip", unzip=True), root)
    assert target.read_bytes() == archive[0].read_bytes() and (target.parent / "model.ckpt").is_file()
    with pytest.raises(dm.DownloadError, match="broke off|announced"):
        dm.fetch(entry(f"{server}/truncated.zip", "models/t/model.zip"), root, timeout=5)
    assert not (root / "models/t/model.zip").exists()
    with pytest.raises(dm.DownloadError, match="missing.zip answered HTTP 404"):
        dm.fetch(entry(f"{server}/missing.zip", "models/m/model.zip"), root)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/kl-f8.zip"
    monkeypatch.setattr(dm, "MANIFEST", [entry(url)])
    assert dm.main(["test", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download " + url) and "offline" in err and "\n" not in err
    assert dm.main(["nonexistent"]) == 2
    assert "unknown checkpoint(s) nonexistent" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.zip"))


def test_manifest_and_shell_wrappers_follow_the_original_scripts():
    first = [e for e in dm.MANIFEST if e.group == "first_stages"]
    assert [e.name for e in first] == ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8",
                                       "vq-f8-n256", "vq-f16"]
    assert all(e.unzip and e.target == f"models/first_stage_models/{e.name}/model.zip" for e in first)
    ldm = {e.name: e for e in dm.MANIFEST if e.group == "ldm"}
    assert len(ldm) == 11 and ldm["celeba256"].target == "models/ldm/celeba256/celeba-256.zip"
    assert ldm["bsr_sr"].url.endswith("/sr_bsr.zip")
    midas = next(e for e in dm.MANIFEST if e.name == "midas-dpt-hybrid")
    assert midas.sha256_prefix == "501f0c75" and midas.target == "midas_models/dpt_hybrid-midas-501f0c75.pt"
    out = subprocess.run(["bash", str(REPO / "scripts" / "download_first_stages.sh"), "--list"], capture_output=True,
                         text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == [e.name for e in first]
    out = subprocess.run(["bash", str(REPO / "scripts" / "download_models.sh"), "--list"], capture_output=True,
                         text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == list(ldm)
