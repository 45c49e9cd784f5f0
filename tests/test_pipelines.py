"""ldm.pipelines on tiny models (the script tests' configs): which tasks each kind of model supports, per-sample seeds,
progress and stopping from it, the negative prompt, and the checks made before anything is sampled."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import inference as inf
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampler import Sampler
from ldm.pipelines import Img2Img, Inpaint, SuperRes, Txt2Img, inpaint_input
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a white background"


def _script_conftest():
    """tests/scripts/conftest.py, whose tiny configs these tests share."""
    spec = importlib.util.spec_from_file_location("ldm_tiny_runs", REPO / "tests" / "scripts" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _script_conftest()


@pytest.fixture(scope="module")
def models():
    """Tiny models by kind (the text model trained a few steps), built once for the module."""
    built = {}

    def get(kind):
        if kind not in built:
            torch.manual_seed(0)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(REPO)  # the tokenizer path is relative to the repository root
                model = instantiate_from_config(OmegaConf.create(TINY.model_config(kind)).model)
            if kind == "text":  # a few steps, so the zero-initialised output layers let the prompt matter
                TINY.train_text_model(model)
            built[kind] = model.eval()
        return built[kind]

    return get


@pytest.mark.parametrize("kind, tasks", [
    ("text", {"Txt2Img", "Img2Img", "Inpaint"}),
    ("uncond", {"Img2Img", "Inpaint"}),
    ("class", set()),
    ("inpaint", {"Inpaint"}),
    ("ldm-inpaint", {"Inpaint"}),
    ("concat", {"SuperRes"}),
    ("upscale", {"SuperRes"}),
])
def test_each_kind_of_model_supports_its_tasks(models, kind, tasks):
    model = models(kind)
    assert {task.__name__ for task in (Txt2Img, Img2Img, Inpaint, SuperRes) if task.supports(model)} == tasks


def test_txt2img_sample_i_depends_on_its_seed_only_and_reports_every_step(models):
    model = models("text")
    job = Txt2Img(model, "run/last.ckpt", steps=4, scale=3.0, height=16, width=16)
    steps = []
    batch = job([PROMPT] * 3, [5, 6, 7], progress=lambda done, total: steps.append((done, total)))
    alone = job([PROMPT], [6])
    assert batch.images.shape == (3, 3, 16, 16) and batch.images.dtype == torch.float32
    assert np.array_equal(inf.to_uint8(batch.images[1:2]), inf.to_uint8(alone.images))  # floats differ in ulps
    assert not np.array_equal(inf.to_uint8(batch.images[:1]), inf.to_uint8(batch.images[1:2]))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert batch.metadata[2] == {"prompt": PROMPT, "seed": 7, "sampler": "ddim", "steps": 4, "scale": 3.0, "eta": 0.0,
                                 "checkpoint": "last.ckpt", "H": 16, "W": 16}


def test_an_exception_from_progress_stops_the_sampler(models):
    class Stop(Exception):
        pass

    calls = []

    def progress(done, total):
        calls.append(done)
        if done == 2:
            raise Stop

    job = Txt2Img(models("text"), "x.ckpt", steps=10, scale=1.0, height=16, width=16)
    with pytest.raises(Stop):
        job([PROMPT], [1], progress=progress)
    assert calls == [1, 2]


def test_the_negative_prompt_is_the_unconditional_side_of_guidance(models):
    model = models("text")
    negative = "a blue square on a black background"
    job = Txt2Img(model, "x.ckpt", steps=4, scale=3.0, height=16, width=16, negative_prompt=negative)
    samples = job([PROMPT], [3])
    with torch.no_grad():  # the same sampling by hand, uc from the negative prompt
        c = model.get_learned_conditioning([PROMPT])
        uc = model.get_learned_conditioning([negative])
        z, _ = DDIMSampler(model).sample(S=4, conditioning=c, batch_size=1, shape=[4, 4, 4], verbose=False,
                                         unconditional_guidance_scale=3.0, unconditional_conditioning=uc, seeds=[3])
        expected = model.decode_first_stage(z).clamp(-1, 1)
    assert torch.equal(samples.images, expected)
    assert samples.metadata[0]["negative_prompt"] == negative
    plain = Txt2Img(model, "x.ckpt", steps=4, scale=3.0, height=16, width=16)([PROMPT], [3])
    assert "negative_prompt" not in plain.metadata[0] and not torch.equal(plain.images, samples.images)


def test_txt2img_runs_a_registered_sampler_with_its_schedule_and_guidance_rescale(models):
    model = models("text")
    options = dict(steps=4, scale=3.0, height=16, width=16)
    job = Txt2Img(model, "x.ckpt", sampler="dpmpp_2m", spacing="exponential", guidance_rescale=0.7, **options)
    samples = job([PROMPT], [3])
    with torch.no_grad():  # the same sampling by hand, through the registry's sampler object
        c, uc = inf.text_conditioning(model, [PROMPT], 3.0)
        z, _ = Sampler(model, "dpmpp_2m", spacing="exponential").sample(
            4, 1, [4, 4, 4], c, unconditional_guidance_scale=3.0, unconditional_conditioning=uc, seeds=[3],
            guidance_rescale=0.7, verbose=False)
        expected = model.decode_first_stage(z).clamp(-1, 1)
    assert torch.equal(samples.images, expected)
    assert samples.metadata[0] == {"prompt": PROMPT, "seed": 3, "sampler": "dpmpp_2m", "schedule": "exponential",
                                   "steps": 4, "scale": 3.0, "guidance_rescale": 0.7, "checkpoint": "x.ckpt",
                                   "H": 16, "W": 16}
    unrescaled = Txt2Img(model, "x.ckpt", sampler="dpmpp_2m", spacing="exponential", **options)([PROMPT], [3])
    assert not torch.equal(unrescaled.images, samples.images)
    # eta None is the sampler's own: 0 for ddim (the original --ddim_eta default), 1 inside the ancestral samplers
    assert Txt2Img(model, "x.ckpt", **options).eta == 0.0
    assert Txt2Img(model, "x.ckpt", sampler="euler_ancestral", **options).eta is None
    with pytest.raises(inf.ScriptError, match="--eta 0.5: sampler 'euler' draws no noise"):
        Txt2Img(model, "x.ckpt", sampler="euler", eta=0.5, **options)


def test_img2img_crops_to_the_downsampling_factor(models):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (19, 21, 3), dtype=np.uint8))
    job = Img2Img(models("text"), "x.ckpt", steps=4, scale=2.0, image=image, image_path="in/odd.png", strength=0.5)
    assert job.cropped_from == (21, 19) and job.size == (16, 16) and job.t_enc == 2
    samples = job(["", PROMPT], [1, 2])
    assert samples.images.shape == (2, 3, 16, 16)
    assert samples.metadata[1]["init_image"] == "odd.png" and samples.metadata[1]["t_enc"] == 2


def test_inpaint_keeps_the_unmasked_pixels(models):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    job = inpaint_input(image, Image.fromarray(mask), "in/x.png", "drawn", 8, torch.device("cpu"))
    result = Inpaint(models("inpaint"), "x.ckpt", steps=4, scale=2.0, prompt=PROMPT)(job, 9)
    pixels = inf.to_uint8(result.images)[0]
    keep = mask == 0
    assert np.array_equal(pixels[keep], np.asarray(image)[keep]) and not np.array_equal(pixels, np.asarray(image))
    assert result.metadata[0]["mode"] == "inpainting" and result.metadata[0]["mask"] == "drawn"


@pytest.mark.parametrize("make, message", [
    (lambda m: Txt2Img(m("class"), "c.ckpt", height=16, width=16), "the model of 'c.ckpt' is not conditioned on text"),
    (lambda m: Txt2Img(m("inpaint"), "i.ckpt", height=16, width=16), "the model of 'i.ckpt' reads 5 concatenated"),
    (lambda m: Txt2Img(m("text"), "t.ckpt", height=16, width=20), "--W 20 must be a positive multiple of 8"),
    (lambda m: Txt2Img(m("text"), "t.ckpt", steps=900, height=16, width=16), "--steps 900"),
    (lambda m: Img2Img(m("text"), "t.ckpt", image=Image.new("RGB", (16, 16)), strength=1.5),
     "--strength must lie in [0, 1], got 1.5"),
    (lambda m: Img2Img(m("text"), "t.ckpt", image=Image.new("RGB", (4, 4)), image_path="tiny.png"),
     "--init-img: 'tiny.png' is 4x4; both sides must be at least 8 pixels"),
    (lambda m: inpaint_input(Image.new("RGB", (16, 16)), Image.new("L", (8, 8)), "a.png", "a_mask.png", 8, "cpu"),
     "--mask: 'a_mask.png' is 8x8 but its image 'a.png' is 16x16"),
    (lambda m: SuperRes(m("text"), "t.ckpt"), "the model of 't.ckpt' is not a super-resolution model"),
    (lambda m: SuperRes(m("upscale"), "u.ckpt", noise_level=400).prepare(Image.new("RGB", (4, 4)), "low.png", 1),
     "--noise_level must lie in [0, 350), got 400"),
], ids=["class-model", "inpainting-model", "size", "steps", "strength", "tiny-image", "mask-size", "not-sr", "noise"])
def test_settings_are_checked_before_sampling_with_the_scripts_messages(models, make, message):
    with pytest.raises(inf.ScriptError, match="^" + re.escape(message)):
        make(models)
