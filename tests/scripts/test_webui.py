"""scripts/webui.py served on a free loopback port and driven with gradio_client: every tab's results equal the
scripts' for the same settings and seed (PNG pixels and text metadata), the tabs follow the loaded model, bad input
is one message and leaves the app working, a second request waits in the queue, and cancel stops a running job."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm import inference as inf
from ldm.data.shapes import ShapesValidation

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

PROMPT = "a red circle on a white background"
KINDS = ("text", "inpaint", "concat", "upscale")


@dataclass
class Served:
    ui: object
    url: str
    runs: dict
    outdir: Path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(scripts, tiny_runs, tmp_path_factory):
    """The web UI over four tiny runs (the text model loaded first), on a free port of 127.0.0.1."""
    runs = {kind: tiny_runs(kind) for kind in KINDS}
    outdir = tmp_path_factory.mktemp("webui_out")
    port = free_port()
    argv = [arg for kind in KINDS for arg in ("-r", str(runs[kind].logdir))]
    args = scripts("webui").get_parser().parse_args([*argv, "--port", str(port), "--outdir", str(outdir),
                                                     "--device", "cpu"])
    assert args.host == "127.0.0.1"
    ui = scripts("webui").serve(args, block=False)
    yield Served(ui, f"http://127.0.0.1:{port}/", runs, outdir)
    ui.blocks.close()


@pytest.fixture
def client(served):
    return Client(served.url, verbose=False)


def use(client, served, kind):
    """Load the tiny run of `kind`; the model panel's text."""
    return client.predict(str(served.runs[kind].logdir), api_name="/load_model")[0]


def png(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


def shape_image(folder, name, seed, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    image = ShapesValidation(size=size, length=1, seed=seed)[0]["image"]
    Image.fromarray(((image + 1) * 127.5).round().astype(np.uint8)).save(folder / name)
    return folder / name


def right_half_mask(folder, name="x_mask.png", size=16):
    """The script's mask (white = fill) and the same region as a painted editor layer (alpha = painted)."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    mask[3:6, 2:5] = 255
    Image.fromarray(mask).save(folder / name)
    layer = np.zeros((size, size, 4), np.uint8)
    layer[..., :3] = 255
    layer[..., 3] = mask
    Image.fromarray(layer, "RGBA").save(folder / "layer.png")
    return folder / name, folder / "layer.png"


def assert_same_results(gallery, script_files, ignore=()):
    """Each app result has the script's pixels and PNG text chunks (except the keys in `ignore`)."""
    assert len(gallery) == len(script_files)
    for item, path in zip(gallery, script_files):
        (got, got_meta), (want, want_meta) = png(item["image"]), png(path)
        assert np.array_equal(got, want)
        assert {k: v for k, v in got_meta.items() if k not in ignore} == \
            {k: v for k, v in want_meta.items() if k not in ignore}
        assert item["caption"].startswith(f"seed {want_meta['seed']} ")


def sampler_flags(scripts, name):
    """The txt2img flags that choose sampler `name` (--sampler NAME where the script has it)."""
    parser = scripts("txt2img").get_parser()
    if any("--sampler" in action.option_strings for action in parser._actions):
        return ["--sampler", name]
    return {"ddim": [], "plms": ["--plms"], "dpm": ["--dpm"]}[name]


def test_txt2img_equals_the_script_for_every_sampler(served, client, scripts, tmp_path):
    assert "Tasks: Text to image, Image to image, Inpainting." in use(client, served, "text")
    for name in inf.SAMPLERS:
        gallery, metadata, status, history = client.predict(PROMPT, "", name, 4, 3.0, 0.0, 16, 16, 7, 2,
                                                            api_name="/txt2img")
        out = tmp_path / name
        argv = ["-r", served.runs["text"].logdir, "--prompt", PROMPT, "--H", "16", "--W", "16", "--steps", "4",
                "--scale", "3.0", "--seed", "7", "--n_samples", "2", "--n_iter", "1", "--outdir", out,
                "--device", "cpu", *sampler_flags(scripts, name)]
        assert scripts("txt2img").main([str(a) for a in argv]) == 0
        assert_same_results(gallery, [out / "samples" / "00000.png", out / "samples" / "00001.png"])
        assert [m["seed"] for m in metadata] == [7, 8] and metadata[0]["sampler"] == name
        assert status.startswith("2 image(s) in ") and status.endswith(str(served.outdir / "txt2img"))
    assert len(history) == 2 * len(inf.SAMPLERS)  # this session's results so far, newest first
    assert history[0]["caption"].startswith("seed 7 · sampler " + inf.SAMPLERS[-1])


def test_txt2img_schedule_guidance_rescale_and_eta_equal_the_script(served, client, scripts, tmp_path):
    use(client, served, "text")
    gallery, metadata, _, _ = client.predict(PROMPT, "", "euler_ancestral", 4, 3.0, 0.5, 16, 16, 3, 1, "exponential",
                                             0.7, api_name="/txt2img")
    argv = ["-r", served.runs["text"].logdir, "--prompt", PROMPT, "--H", "16", "--W", "16", "--steps", "4", "--scale",
            "3.0", "--seed", "3", "--n_samples", "1", "--n_iter", "1", "--outdir", tmp_path, "--device", "cpu",
            "--sampler", "euler_ancestral", "--schedule", "exponential", "--guidance_rescale", "0.7", "--ddim_eta", "0.5"]
    assert scripts("txt2img").main([str(a) for a in argv]) == 0
    assert_same_results(gallery, [tmp_path / "samples" / "00000.png"])
    assert {k: metadata[0][k] for k in ("sampler", "schedule", "guidance_rescale", "eta")} == {
        "sampler": "euler_ancestral", "schedule": "exponential", "guidance_rescale": 0.7, "eta": 0.5}
    assert gallery[0]["caption"].startswith("seed 3 · sampler euler_ancestral · schedule exponential · steps 4 · "
                                            "scale 3.0 · guidance_rescale 0.7")
    plain = client.predict(PROMPT, "", "euler_ancestral", 4, 3.0, 0.0, 16, 16, 3, 1, api_name="/txt2img")[1][0]
    assert "eta" not in plain and "schedule" not in plain and "guidance_rescale" not in plain  # the sampler's own


def test_img2img_equals_the_script(served, client, scripts, tmp_path):
    use(client, served, "text")
    odd = tmp_path / "in" / "odd.png"  # cropped to 16x16 by both
    odd.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (19, 21, 3), dtype=np.uint8)).save(odd)
    gallery, metadata, _, _ = client.predict(handle_file(str(odd)), PROMPT, "", 0.5, 6, 2.0, 0.3, 5, 2,
                                             api_name="/img2img")
    out = tmp_path / "out"
    argv = ["-r", served.runs["text"].logdir, "--init-img", odd, "--prompt", PROMPT, "--strength", "0.5", "--steps",
            "6", "--scale", "2.0", "--ddim_eta", "0.3", "--seed", "5", "--n_samples", "2", "--n_iter", "1",
            "--outdir", out, "--device", "cpu"]
    assert scripts("img2img").main([str(a) for a in argv]) == 0
    assert_same_results(gallery, [out / "samples" / "00000.png", out / "samples" / "00001.png"])
    assert metadata[0]["init_image"] == "odd.png" and metadata[0]["t_enc"] == 3


@pytest.mark.parametrize("kind, scale", [("text", 2.0), ("inpaint", 3.0)])
def test_inpainting_a_painted_mask_equals_the_script(served, client, scripts, tmp_path, kind, scale):
    use(client, served, kind)
    image = shape_image(tmp_path / "in", "x.png", seed=3)
    mask, layer = right_half_mask(tmp_path / "in")
    editor = {"background": handle_file(str(image)), "layers": [handle_file(str(layer))], "composite": None}
    painted = client.predict(editor, None, "a blue square", "", 5, scale, 0.0, 11, 2, api_name="/inpaint")[0]
    uploaded = client.predict(editor, handle_file(str(mask)), "a blue square", "", 5, scale, 0.0, 11, 1,
                              api_name="/inpaint")[0]
    scripted = []
    for seed in (11, 12):
        out = tmp_path / f"out{seed}"
        argv = ["-r", served.runs[kind].logdir, "--image", image, "--mask", mask, "--prompt", "a blue square",
                "--scale", str(scale), "--steps", "5", "--seed", str(seed), "--outdir", out, "--device", "cpu"]
        assert scripts("inpaint").main([str(a) for a in argv]) == 0
        scripted.append(out / "x.png")
    assert_same_results(painted, scripted, ignore=("mask",))
    assert png(painted[0]["image"])[1]["mask"] == "drawn"
    assert_same_results(uploaded, scripted[:1])  # the mask file's name too


@pytest.mark.parametrize("kind, prompt, noise_level", [("concat", "", 20), ("upscale", "a red circle", 30)])
def test_superres_equals_the_script(served, client, scripts, tmp_path, kind, prompt, noise_level):
    assert "Tasks: Super-resolution." in use(client, served, kind)
    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(low)
    gallery = client.predict(handle_file(str(low)), prompt, "", noise_level, 5, 3.0, 0.0, 9, 1,
                             api_name="/superres")[0]
    out = tmp_path / "out"
    argv = ["-r", served.runs[kind].logdir, "--image", low, "--prompt", prompt, "--noise_level", str(noise_level),
            "--steps", "5", "--scale", "3.0", "--seed", "9", "--outdir", out, "--device", "cpu"]
    assert scripts("superres").main([str(a) for a in argv]) == 0
    assert_same_results(gallery, [out / "low.png"])
    assert png(gallery[0]["image"])[0].shape == (16, 16, 3)


def test_the_tabs_follow_the_loaded_model_and_the_old_model_is_released(served, client):
    expected = {"text": ["txt2img", "img2img", "inpaint"], "inpaint": ["inpaint"], "concat": ["superres"],
                "upscale": ["superres"]}
    for kind, tabs in expected.items():
        previous = weakref.ref(served.ui.slot.loaded.model)
        about, *sizes = client.predict(str(served.runs[kind].logdir), api_name="/load_model")
        assert served.ui.visible_tabs(served.ui.slot.loaded) == tabs, kind
        assert previous() is None  # released: nothing holds the model loaded before
        if kind == "text":
            assert sizes == [16, 16]  # txt2img's size follows the model (16 px images)
        assert served.runs[kind].logdir.name in about


@pytest.mark.parametrize("call, message", [
    (lambda c, d: c.predict("  ", "", "ddim", 4, 3.0, 0.0, 16, 16, 1, 1, api_name="/txt2img"),
     "--prompt is empty; give a prompt"),
    (lambda c, d: c.predict(PROMPT, "", "ddim", 4, 3.0, 0.0, 20, 16, 1, 1, api_name="/txt2img"),
     "--H 20 must be a positive multiple of 8, the model's downsampling factor"),
    (lambda c, d: c.predict(PROMPT, "", "ddim", 3, 3.0, 0.0, 16, 16, 1, 1, api_name="/txt2img"), "--steps 3: "),
    (lambda c, d: c.predict(handle_file(str(d / "bad.png")), PROMPT, "", 0.5, 4, 2.0, 0.0, 1, 1,
                            api_name="/img2img"), "--init-img: '"),
    (lambda c, d: c.predict({"background": handle_file(str(d / "x.png")), "layers": [], "composite": None},
                            handle_file(str(d / "small_mask.png")), "", "", 4, 1.0, 0.0, 1, 1, api_name="/inpaint"),
     "but its image '"),
    (lambda c, d: c.predict({"background": handle_file(str(d / "x.png")), "layers": [], "composite": None}, None,
                            "", "", 4, 1.0, 0.0, 1, 1, api_name="/inpaint"), "--mask: nothing is painted"),
    (lambda c, d: c.predict(None, "", "", 20, 4, 1.0, 0.0, 1, 1, api_name="/superres"), "does not do super-resolution"),
    (lambda c, d: c.predict(str(d / "nowhere"), api_name="/load_model"), "-r/--resume: checkpoint '"),
], ids=["empty-prompt", "size", "steps", "unreadable-upload", "mask-size", "no-mask", "wrong-task", "no-model"])
def test_bad_input_is_one_message_and_the_app_keeps_working(served, client, tmp_path, call, message):
    use(client, served, "text")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    shape_image(tmp_path, "x.png", seed=1)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
    with pytest.raises(AppError) as raised:
        call(client, tmp_path)
    text = str(raised.value)
    assert message in text and "\n" not in text and "Traceback" not in text
    if message.startswith("--init-img"):
        assert "bad.png' is not a readable image" in text
    gallery = client.predict(PROMPT, "", "ddim", 4, 3.0, 0.0, 16, 16, 1, 1, api_name="/txt2img")[0]
    assert len(gallery) == 1


def test_a_second_request_waits_in_the_queue_and_cancel_stops_the_running_one(served, tmp_path):
    first, second = Client(served.url, verbose=False), Client(served.url, verbose=False)
    use(first, served, "text")
    written = set((served.outdir / "txt2img").glob("*.png")) if (served.outdir / "txt2img").exists() else set()
    long_job = first.submit(PROMPT, "", "ddim", 500, 3.0, 0.0, 16, 16, 1, 8, api_name="/txt2img")
    deadline = time.time() + 60
    while not served.ui.slot.busy and time.time() < deadline:
        time.sleep(0.05)
    assert served.ui.slot.busy
    while not long_job.status().progress_data and time.time() < deadline:
        time.sleep(0.05)
    progress = long_job.status().progress_data[-1]  # the page's progress bar, fed by the sampler's steps
    assert progress.length == 500 and 1 <= progress.index <= 500 and progress.unit == "steps"
    waiting = second.submit(PROMPT, "", "ddim", 4, 3.0, 0.0, 16, 16, 3, 1, api_name="/txt2img")
    while waiting.status().code.name not in ("IN_QUEUE", "PROCESSING") and time.time() < deadline:
        time.sleep(0.05)
    status = waiting.status()
    assert status.code.name == "IN_QUEUE" and status.rank is not None  # its position, shown in the page
    second.predict(api_name="/cancel_txt2img")  # not its job: ignored
    time.sleep(0.5)
    assert served.ui.slot.busy and not long_job.done()
    assert first.predict(api_name="/cancel_txt2img").startswith("Cancel")
    _, _, message, _ = long_job.result(timeout=120)
    assert message.startswith("Cancelled after step ") and message.endswith("of 500; nothing was written")
    done = int(message.split()[3])
    assert done < 500
    gallery = waiting.result(timeout=120)[0]
    assert len(gallery) == 1 and png(gallery[0]["image"])[1]["seed"] == "3"
    assert len(set((served.outdir / "txt2img").glob("*.png")) - written) == 1  # only the second job's image


@pytest.mark.slow  # two fresh interpreters importing torch and gradio: ~20-40 s on 2 cores
def test_the_command_line_serves_the_page_and_a_missing_model_is_one_error_line(text_run, tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "webui.py"
    result = subprocess.run([sys.executable, str(script), "-r", str(tmp_path / "none")], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: -r/--resume: checkpoint '{tmp_path / 'none'}' does not exist"
    port = free_port()
    server = subprocess.Popen([sys.executable, str(script), "-r", str(text_run.logdir), "--port", str(port),
                               "--device", "cpu", "--outdir", str(tmp_path / "out")], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config, deadline = None, time.time() + 120
        while config is None and time.time() < deadline and server.poll() is None:
            try:
                config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read())
            except OSError:
                time.sleep(0.5)
        assert config is not None, server.communicate(timeout=5)[0] if server.poll() is not None else "no answer"
        assert config["title"] == "ldm web UI"
        assert {"txt2img", "img2img", "inpaint", "superres", "load_model"} <= {
            dep.get("api_name") for dep in config["dependencies"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
