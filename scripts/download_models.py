"""Download the published checkpoints of the original READMEs (latent-diffusion, Stable Diffusion 2) to where the
configs and scripts expect them, verify them, and unzip the archives where the originals unzipped them.

    python scripts/download_models.py                        # the LDMs of scripts/download_models.sh
    python scripts/download_models.py --group first_stages    # the autoencoders of scripts/download_first_stages.sh
    python scripts/download_models.py cin256 kl-f8 midas-dpt-hybrid   # single entries
    python scripts/download_models.py --list                  # every entry, its target and how it is verified

Checksums: none of the original READMEs publishes a sha256 for the ommer-lab archives or checkpoints, nor for the
Hugging Face files they link, so those are verified as zip archives instead (every member's CRC; a .ckpt is a torch
zip archive) and their size is checked against the server's Content-Length. The MiDaS file's name carries the first 8
hex digits of its sha256 (torch.hub's convention, `dpt_hybrid-midas-501f0c75.pt`), which is checked. An entry that
gets a full sha256 in MANIFEST is checked against it. Every file is written to a temporary name and renamed; an
archive that fails its check is not kept. Offline, or when a server refuses, the command prints one `error:` line.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm import inference as inf  # noqa: E402
from ldm.util import atomic_path  # noqa: E402

OMMER = "https://ommer-lab.com/files/latent-diffusion"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One published file: where it comes from, where it goes (relative to --root), how it is verified."""

    name: str
    group: str
    url: str
    target: str
    unzip: bool = False
    sha256: str | None = None  # the full published digest, when there is one
    sha256_prefix: str | None = None  # the leading hex digits a file name publishes (torch.hub convention)

    @property
    def check(self) -> str:
        """How the download is verified, in words."""
        if self.sha256:
            return "sha256"
        if self.sha256_prefix:
            return f"sha256 prefix {self.sha256_prefix}"
        return "zip integrity + size (no checksum published)"


def _first_stage(name: str) -> Entry:
    return Entry(name, "first_stages", f"{OMMER}/{name}.zip", f"models/first_stage_models/{name}/model.zip", True)


def _ldm(name: str, archive: str, target: str) -> Entry:
    return Entry(name, "ldm", f"{OMMER}/{archive}", f"models/ldm/{name}/{target}", True)


MANIFEST: list[Entry] = [
    *[_first_stage(n) for n in ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8",
                                "vq-f8-n256", "vq-f16")],
    _ldm("celeba256", "celeba.zip", "celeba-256.zip"),
    _ldm("ffhq256", "ffhq.zip", "ffhq-256.zip"),
    _ldm("lsun_churches256", "lsun_churches.zip", "lsun_churches-256.zip"),
    _ldm("lsun_beds256", "lsun_bedrooms.zip", "lsun_beds-256.zip"),
    _ldm("text2img256", "text2img.zip", "model.zip"),
    _ldm("cin256", "cin.zip", "model.zip"),
    _ldm("semantic_synthesis512", "semantic_synthesis.zip", "model.zip"),
    _ldm("semantic_synthesis256", "semantic_synthesis256.zip", "model.zip"),
    _ldm("bsr_sr", "sr_bsr.zip", "model.zip"),
    _ldm("layout2img-openimages256", "layout2img_model.zip", "model.zip"),
    _ldm("inpainting_big", "inpainting_big.zip", "model.zip"),
    # further checkpoints the READMEs link directly
    Entry("text2img-large", "extra", f"{OMMER}/nitro/txt2img-f8-large/model.ckpt", "models/ldm/text2img-large/model.ckpt"),
    Entry("rdm768x768", "extra", "https://ommer-lab.com/files/rdm/model.ckpt", "models/rdm/rdm768x768/model.ckpt"),
    Entry("midas-dpt-hybrid", "extra", "https://github.com/intel-isl/DPT/releases/download/1_0/dpt_hybrid-midas-501f0c75.pt",
          "midas_models/dpt_hybrid-midas-501f0c75.pt", sha256_prefix="501f0c75"),
    Entry("sd21-unclip-h", "extra",
          "https://huggingface.co/stabilityai/stable-diffusion-2-1-unclip/resolve/main/sd21-unclip-h.ckpt",
          "checkpoints/sd21-unclip-h.ckpt"),
    Entry("sd21-unclip-l", "extra",
          "https://huggingface.co/stabilityai/stable-diffusion-2-1-unclip/resolve/main/sd21-unclip-l.ckpt",
          "checkpoints/sd21-unclip-l.ckpt"),
]
GROUPS = ("ldm", "first_stages", "extra", "all")


class DownloadError(inf.ScriptError):
    """A file could not be fetched or failed its check; the message names the URL or file."""


def _download(url: str, tmp: str, timeout: float) -> tuple[str, int, int | None]:
    """Stream `url` into `tmp`: (sha256 hex digest, bytes written, Content-Length or None)."""
    digest, written = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}") from None
    except http.client.HTTPException as err:  # e.g. the connection closed before Content-Length bytes came
        raise DownloadError(f"{url}: the download broke off ({type(err).__name__}); try again") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url} ({reason}); are you offline? Download it by hand to the "
                            "target that --list shows") from None
    return digest.hexdigest(), written, int(length) if length and length.isdigit() else None


def _verify(entry: Entry, path: str, sha256: str, size: int, expected_size: int | None) -> None:
    """Raise DownloadError unless the file passes the entry's check."""
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{entry.url}: got {size} bytes, the server announced {expected_size} (truncated)")
    if entry.sha256 and sha256 != entry.sha256.lower():
        raise DownloadError(f"{entry.url}: sha256 {sha256} does not match the published {entry.sha256}")
    if entry.sha256_prefix and not sha256.startswith(entry.sha256_prefix.lower()):
        raise DownloadError(f"{entry.url}: sha256 {sha256} does not start with the published {entry.sha256_prefix}")
    if not entry.sha256 and not entry.sha256_prefix:
        if not zipfile.is_zipfile(path):
            raise DownloadError(f"{entry.url}: the download is not a zip archive (checkpoints and archives are)")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise DownloadError(f"{entry.url}: archive member {bad} is corrupt (CRC mismatch)")


def _unzip(archive_path: Path) -> list[Path]:
    """Extract an archive beside itself, each member written atomically; members leaving the folder are refused."""
    folder = archive_path.parent.resolve()
    written = []
    with zipfile.ZipFile(archive_path) as archive:
        for member in archive.infolist():
            target = (folder / member.filename).resolve()
            if folder not in target.parents and target != folder:
                raise DownloadError(f"{archive_path}: member {member.filename} would be written outside {folder}")
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with archive.open(member) as source, atomic_path(target) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
            written.append(target)
    return written


def fetch(entry: Entry, root: Path, force: bool = False, timeout: float = 60.0) -> Path:
    """Download, verify and (for archives) unzip one entry under `root`; an existing target is kept unless `force`."""
    target = root / entry.target
    if target.is_file() and not force:
        print(f"{entry.name}: {target} exists (--force downloads it again)")
    else:
        print(f"{entry.name}: {entry.url} -> {target}")
        with atomic_path(target) as tmp:
            sha256, size, expected = _download(entry.url, tmp, timeout)
            _verify(entry, tmp, sha256, size, expected)
        print(f"{entry.name}: {size} bytes, sha256 {sha256} ({entry.check})")
    if entry.unzip:
        members = _unzip(target)
        print(f"{entry.name}: unzipped {len(members)} file(s) into {target.parent}")
    return target


def select(names: Sequence[str], group: str) -> list[Entry]:
    """The entries named (any group), or those of `group`."""
    if names:
        known = {e.name: e for e in MANIFEST}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise inf.ScriptError(f"unknown checkpoint(s) {', '.join(unknown)}; --list shows the names")
        return [known[n] for n in names]
    return [e for e in MANIFEST if group == "all" or e.group == group]


def get_parser() -> argparse.ArgumentParser:
    """Names or --group, --root, --force, --list, --timeout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("names", nargs="*", help="entries to fetch (default: all of --group)")
    add("--group", choices=GROUPS, default="ldm", help="ldm (download_models.sh), first_stages "
                                                      "(download_first_stages.sh), extra or all")
    add("--root", default=str(REPO), help="folder the targets are relative to (default: the repository)")
    add("--force", action="store_true", help="download again even when the target exists")
    add("--list", action="store_true", help="print the entries and exit")
    add("--timeout", type=float, default=60.0, help="seconds without data before a download fails")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch the selected checkpoints; one `error:` line and exit status 2 on failure."""
    def body(args: argparse.Namespace) -> None:
        entries = select(args.names, args.group)
        if args.list:
            for e in entries:
                print(f"{e.name:26s} {e.group:13s} {e.target:60s} {e.check}  {e.url}")
            return
        for entry in entries:
            fetch(entry, Path(args.root), force=args.force, timeout=args.timeout)

    return inf.run_cli(get_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
