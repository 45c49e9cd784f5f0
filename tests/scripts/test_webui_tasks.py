"""The web UI's depth-to-image, image-variations and layout / label-map tabs, driven with gradio_client on a free
loopback port: they appear for the models that do those tasks only, and their results equal scripts/depth2img.py's,
scripts/unclip.py's and scripts/sample_conditional.py's for the same settings and seed (PNG pixels and text
metadata)."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm.data.shapes import ShapesScenesValidation
from task_runs import depth_run, map_run, unclip_run
from test_webui import free_port  # one way to pick the port for both web UI test modules

from gradio_client import Client, handle_file  # test extra

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def served(scripts, tiny_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_tasks")
    runs = {"depth": depth_run(root)[0], "unclip": unclip_run(root)[0], "text": tiny_runs("text"),
            "layout": map_run(root, "layout2img")[0], "semantic": map_run(root, "semantic")[0]}
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
    for kind, tabs in {"depth": ["depth2img"], "unclip": ["variations"], "layout": ["maps"], "semantic": ["maps"],
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


def maps_tab_equals_the_script(client, scripts, run, tmp_path, tab_inputs, script_flags, names):
    """The maps tab (sampler euler_ancestral, karras spacing, eta 0.5, seed 7, 2 samples per input) and
    sample_conditional.py with those flags write the same PNGs."""
    client.predict(str(run.logdir), api_name="/load_model")
    layout, segmentation = tab_inputs
    gallery, metadata, _, _ = client.predict(layout, segmentation, "euler_ancestral", 4, 1.0, 0.5, 32, 32, 7, 2,
                                             "karras", 0.0, api_name="/maps")
    out = tmp_path / "out"
    argv = ["-r", run.logdir, *script_flags, "--sampler", "euler_ancestral", "--schedule", "karras", "--eta", "0.5",
            "--steps", "4", "--seed", "7", "--n_samples", "2", "--outdir", out, "--device", "cpu"]
    assert scripts("sample_conditional").main([str(a) for a in argv]) == 0
    assert_same(gallery, [out / "samples" / name for name in names])
    return metadata


def test_maps_tab_equals_the_script_for_layouts(served, scripts, tmp_path):
    _, client, runs = served
    layouts = [[{"class": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4]}], [{"class": 19, "bbox": [0.5, 0.4, 0.4, 0.5]}]]
    path = tmp_path / "layouts.json"
    path.write_text(json.dumps(layouts))
    metadata = maps_tab_equals_the_script(client, scripts, runs["layout"], tmp_path, (handle_file(str(path)), None),
                                          ["--layout", path, "--H", "32", "--W", "32"],
                                          ["00000.png", "00001.png", "00002.png", "00003.png"])
    assert [m["seed"] for m in metadata] == [7, 8, 9, 10] and metadata[2]["layout"].startswith("blue triangle @")
    assert metadata[0]["sampler"] == "euler_ancestral" and metadata[0]["schedule"] == "karras"


def test_maps_tab_equals_the_script_for_label_maps(served, scripts, tmp_path):
    _, client, runs = served
    labels = np.zeros((16, 24), dtype=np.uint8)
    labels[2:10, 3:11], labels[8:14, 14:22] = 1, 2
    Image.fromarray(labels, mode="L").save(tmp_path / "map.png")
    metadata = maps_tab_equals_the_script(client, scripts, runs["semantic"], tmp_path,
                                          (None, handle_file(str(tmp_path / "map.png"))),
                                          ["--segmentation", tmp_path / "map.png"], ["00000.png", "00001.png"])
    assert metadata[0]["semantic"] == "0:272 1:64 2:48" and [m["seed"] for m in metadata] == [7, 8]
