"""Layout-to-image and semantic synthesis end to end: the built-in configs (shapes-layout2img.yaml,
shapes-semantic.yaml, shrunk) train a few steps on ShapesScenes, their conditioning steers the samples, per-sample
seeds hold, and scripts/sample_conditional.py samples them from --from-data, a --layout file or a --segmentation
map (also larger than trained), with one error line for a wrong input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from task_runs import (
    SAMPLER_FLAGS,
    assert_sampler_flags_reached,
    map_run,
    spy_sampling,
)
from ldm.data.shapes import ShapesScenesTrain
from ldm.pipelines import MapToImage

BASE = ["--steps", "4", "--device", "cpu", "--n_samples", "2"]


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    """Both tasks trained 3 steps (their cond stages train with the UNet), saved as main.py runs."""
    root = tmp_path_factory.mktemp("map_runs")
    return {name: map_run(root, name) for name in ("layout2img", "semantic")}


def pixels(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


@pytest.mark.parametrize("name", ["layout2img", "semantic"])
def test_conditioning_steers_samples_and_seeds_are_per_sample(task_runs, name):
    run, model = task_runs[name]
    batch = next(iter(torch.utils.data.DataLoader(ShapesScenesTrain(size=16, length=4), batch_size=4)))
    inputs = batch[model.cond_stage_key]
    job = MapToImage(model, str(run.ckpt), steps=4, height=16, width=16)
    both = job(inputs[:2], [5, 6])
    alone = job(inputs[1:2], [6])
    torch.testing.assert_close(both.images[1:], alone.images, atol=1e-5, rtol=0)  # sample 1 alone == in the batch
    other = job(inputs[2:4], [5, 6])
    assert not torch.allclose(both.images, other.images)  # another layout / map, other images
    assert both.images.shape == (2, 3, 16, 16) and both.metadata[1]["seed"] == 6
    key = "layout" if name == "layout2img" else "semantic"
    assert both.metadata[0][key]  # the conditioning is in the metadata
    with pytest.raises(Exception, match="no unconditional conditioning to guide with"):
        MapToImage(model, str(run.ckpt), steps=4, scale=3.0)


def test_script_samples_layouts_from_data_and_from_a_file_beyond_the_training_size(task_runs, scripts, tmp_path):
    run, _ = task_runs["layout2img"]
    main = scripts("sample_conditional").main
    assert main(["-r", str(run.logdir), "--from-data", "2", "--outdir", str(tmp_path / "a"), *BASE]) == 0
    samples = sorted((tmp_path / "a" / "samples").glob("*.png"))
    assert len(samples) == 4 and (tmp_path / "a" / "grid-0000.png").exists()
    image, meta = pixels(samples[0])
    assert image.shape == (16, 16, 3) and meta["seed"] == "42" and " @ " in meta["layout"]
    assert pixels(samples[3])[1]["seed"] == "45"
    layout = [{"class": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4]}, {"class": 19, "bbox": [0.5, 0.5, 0.4, 0.4]}]
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    assert main(["-r", str(run.logdir), "--layout", str(tmp_path / "layout.json"), "--H", "32", "--W", "32",
                 "--outdir", str(tmp_path / "b"), *BASE]) == 0
    image, meta = pixels(sorted((tmp_path / "b" / "samples").glob("*.png"))[0])
    assert image.shape == (32, 32, 3)  # a 8x8 latent from a model trained on 4x4
    assert meta["layout"].startswith("red circle @ 0.13,0.13,0.40,0.40; blue triangle @")  # grid-rounded boxes


def test_script_samples_a_label_map_at_its_size(task_runs, scripts, tmp_path):
    run, _ = task_runs["semantic"]
    labels = np.zeros((32, 24), dtype=np.uint8)
    labels[4:14, 4:14], labels[18:28, 8:20] = 1, 3
    Image.fromarray(labels, mode="L").save(tmp_path / "map.png")
    main = scripts("sample_conditional").main
    assert main(["-r", str(run.logdir), "--segmentation", str(tmp_path / "map.png"), "--outdir", str(tmp_path / "o"),
                 *BASE]) == 0
    image, meta = pixels(sorted((tmp_path / "o" / "samples").glob("*.png"))[0])
    assert image.shape == (32, 24, 3) and meta["semantic"] == "0:548 1:100 3:120"
    grid, _ = pixels(tmp_path / "o" / "grid-0000.png")
    assert grid.shape == (2 + 34, 2 + 3 * 26, 3)  # the map drawn, then the 2 samples


@pytest.mark.parametrize("case, message", [
    ("labels", "holds labels 0..9; the model reads label maps with values in [0, 4)"),
    ("odd", "is 18x16; both sides must be multiples of 8"),
    ("layout-on-semantic", "--layout: the model reads label maps; use --segmentation"),
    ("bad-json", "holds no layout the model reads (KeyError: 'bbox')"),
    ("scale", "--scale 2.0: layout and label-map models have no unconditional conditioning"),
])
def test_wrong_inputs_are_one_error_line(task_runs, scripts, tmp_path, capsys, case, message):
    name = "layout2img" if case in ("bad-json", "scale") else "semantic"
    run, _ = task_runs[name]
    labels = np.zeros((16, 16), dtype=np.uint8)
    if case == "labels":
        labels[0, 0] = 9
    Image.fromarray(labels if case != "odd" else np.zeros((16, 18), dtype=np.uint8), mode="L").save(tmp_path / "m.png")
    (tmp_path / "l.json").write_text(json.dumps([{"class": 0}]))
    flag = {"layout-on-semantic": ["--layout", str(tmp_path / "l.json")], "bad-json": ["--layout", str(tmp_path / "l.json")],
            "scale": ["--from-data", "1", "--scale", "2.0"]}.get(case, ["--segmentation", str(tmp_path / "m.png")])
    assert scripts("sample_conditional").main(["-r", str(run.logdir), *flag, "--outdir", str(tmp_path / "o"),
                                               *BASE]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o").exists()  # nothing written


def test_script_takes_the_sampler_flags_of_txt2img(task_runs, scripts, tmp_path, monkeypatch):
    run, _ = task_runs["semantic"]
    main = scripts("sample_conditional").main
    seen = spy_sampling(monkeypatch)
    argv = ["-r", str(run.logdir), "--from-data", "1", *BASE]
    assert main([*argv, *SAMPLER_FLAGS, "--outdir", str(tmp_path / "e")]) == 0
    assert_sampler_flags_reached(seen, pixels(tmp_path / "e" / "samples" / "00000.png")[1])
    assert main([*argv, "--plms", "--outdir", str(tmp_path / "p")]) == 0
    assert pixels(tmp_path / "p" / "samples" / "00000.png")[1]["sampler"] == "plms"  # the original flag stays
