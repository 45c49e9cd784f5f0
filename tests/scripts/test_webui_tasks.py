"""The web UI's depth-to-image and image-variations tabs, driven with gradio_client on a free loopback port: they
appear for the models that do those tasks only, and their results equal scripts/depth2img.py's and
scripts/unclip.py's for the same settings and seed (PNG pixels and text metadata)."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes import ShapesScenesValidation
from task_runs import depth_run, unclip_run
from test_webui import free_port  # one way to pick the port for both web UI test modules

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def served(scripts, tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_tasks")
    runs = {"depth": depth_run(root)[0], "unclip": unclip_run(root)[0], "text": tiny_runs("text")}
    port, outdir = free_port(), root / "out"
    argv = [arg for run in runs.values() for arg in ("-r", str(run.logdir))]
    args = scripts("webui").get_parser().parse_args([*argv, "--port", str(port), "--outdir", str(outdir),
                                                     "--device", "cpu"])
    ui = scripts("webui").serve(args, block=False)
    yield ui, Client(f"http://127.0.0.1:{port}/", verbose=False), runs
    ui.blocks.close()


def png(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


def assert_same(gallery, files):
    assert len(gallery) == len(files)
    for item, path in zip(gallery, files):
        (got, got_meta), (want, want_meta) = png(item["image"]), png(path)
        assert np.array_equal(got, want) and got_meta == want_meta


def scene(folder):
    folder.mkdir(parents=True, exist_ok=True)
    example = ShapesScenesValidation(size=16, length=1)[0]
    Image.fromarray(((example["image"] + 1) * 127.5).round().astype(np.uint8)).save(folder / "scene.png")
    Image.fromarray((example["depth"][0] * 255).round().astype(np.uint8), mode="L").save(folder / "depth.png")
    return folder / "scene.png", folder / "depth.png"


def test_the_new_tabs_follow_the_model(served):
    ui, client, runs = served
    for kind, tabs in {"depth": ["depth2img"], "unclip": ["variations"],
                       "text": ["txt2img", "img2img", "inpaint"]}.items():
        about = client.predict(str(runs[kind].logdir), api_name="/load_model")[0]
        assert ui.visible_tabs(ui.slot.loaded) == tabs, kind
        assert runs[kind].logdir.name in about


def test_depth2img_tab_equals_the_script(served, scripts, tmp_path):
    _, client, runs = served
    client.predict(str(runs["depth"].logdir), api_name="/load_model")
    image, depth = scene(tmp_path / "in")
    gallery, metadata, _, _ = client.predict(handle_file(str(image)), handle_file(str(depth)), PROMPT, "", 0.75, 4,
                                             2.0, 0.0, 5, 2, api_name="/depth2img")
    out = tmp_path / "out"
    argv = ["-r", runs["depth"].logdir, "--init-img", image, "--depth-img", depth, "--prompt", PROMPT, "--strength",
            "0.75", "--steps", "4", "--scale", "2.0", "--seed", "5", "--n_samples", "2", "--outdir", out,
            "--device", "cpu"]
    assert scripts("depth2img").main([str(a) for a in argv]) == 0
    assert_same(gallery, [out / "samples" / "00000.png", out / "samples" / "00001.png"])
    assert metadata[0]["depth_image"] == "depth.png" and [m["seed"] for m in metadata] == [5, 6]


def test_variations_tab_equals_the_script(served, scripts, tmp_path):
    _, client, runs = served
    client.predict(str(runs["unclip"].logdir), api_name="/load_model")
    image, _ = scene(tmp_path / "in")
    gallery, metadata, _, _ = client.predict(handle_file(str(image)), "", "", 50, 4, 3.0, 0.0, 9, 2,
                                             api_name="/variations")
    out = tmp_path / "out"
    argv = ["-r", runs["unclip"].logdir, "--init-img", image, "--noise_level", "50", "--steps", "4", "--scale", "3.0",
            "--seed", "9", "--n_samples", "2", "--outdir", out, "--device", "cpu"]
    assert scripts("unclip").main([str(a) for a in argv]) == 0
    assert_same(gallery, [out / "samples" / "00000.png", out / "samples" / "00001.png"])
    assert metadata[1]["noise_level"] == 50 and metadata[1]["init_image"] == "scene.png"
