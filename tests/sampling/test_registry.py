"""The sampler registry: every entry follows the contract; a new sampler is one function + one registry line and
then runs through ldm.inference, the scripts' --sampler flag, the sampler classes and log_images."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ldm.inference as inf
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampler import Sampler
from ldm.sampling import ALIASES, SAMPLERS, SamplerSpec
from ldm.sampling.samplers.base import batch_sigma, report, setup, to_d
from ldm.sampling.schedule import FINALS, SPACINGS, NoiseSchedule
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 8, 8)


def toy_midpoint(denoise, sigmas, x, *, noise=None, callback=None, mask=None, x0=None, pull=1.0):
    """A made-up sampler for the test: each step moves to the level between D and the Euler step by `pull`."""
    levels, noise = setup(sigmas, x, noise, mask, x0)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = denoise(x, batch_sigma(sigma, x))
        x = denoised + pull * sigma_next * to_d(x, sigma, denoised)
        report(callback, i, sigma, sigma_next, x, denoised)
    return x


class FakeModel:
    """The interface samplers use (apply_model, schedule, parameterization, num_timesteps, device)."""

    def __init__(self):
        self.schedule = NoiseSchedule.from_config("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.parameterization, self.num_timesteps, self.device = "eps", 1000, torch.device("cpu")
        self.seen: list[float] = []

    def apply_model(self, x, t, cond):
        self.seen.append(float(t[0]))
        return torch.tanh(x) * 0.5 + (0.0 if cond is None else 0.1 * cond.mean())


@pytest.fixture()
def toy(monkeypatch):
    """Register the toy sampler: this one line is all a new sampler needs besides its function."""
    monkeypatch.setitem(SAMPLERS, "toy", SamplerSpec(toy_midpoint, False, "karras", "zero", None, None, "Toy"))
    return "toy"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_entry_follows_the_contract(name: str) -> None:
    spec = SAMPLERS[name]
    params = inspect.signature(spec.fn).parameters
    assert list(params)[:3] == ["denoise", "sigmas", "x"]
    for keyword in ("noise", "callback", "mask", "x0"):
        assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY and params[keyword].default is None
    assert spec.spacing in SPACINGS and spec.final in FINALS and inspect.getdoc(spec.fn)
    assert (spec.k_diffusion or spec.diffusers or spec.a1111) and name in inf.SAMPLERS
    assert set(ALIASES.values()) <= set(SAMPLERS)


def test_make_sampler_picks_the_original_classes_and_a_generic_one_for_the_rest() -> None:
    model = FakeModel()
    assert type(inf.make_sampler("ddim", model)) is DDIMSampler
    assert type(inf.make_sampler("plms", model)) is PLMSSampler
    assert type(inf.make_sampler("dpm", model)) is DPMSolverSampler
    for name in set(SAMPLERS) - {"ddim", "plms"}:
        assert type(inf.make_sampler(name, model)) is Sampler
    with pytest.raises(inf.ScriptError, match="sampler 'nope' unknown; expected one of ddim"):
        inf.make_sampler("nope", model)
    with pytest.raises(inf.ScriptError, match="has no option"):
        inf.make_sampler("dpmpp_2m", model, churn=1.0)


def test_a_new_sampler_is_one_function_and_one_registry_line(toy) -> None:
    assert "toy" in inf.SAMPLERS
    model = FakeModel()
    inf.check_steps("toy", 5, None, model)
    with pytest.raises(inf.ScriptError, match="'toy' draws no noise"):
        inf.check_steps("toy", 5, 0.5, model)
    sampler = inf.make_sampler("toy", model, pull=0.5)
    cond = torch.ones(2, 3)
    z = inf.sample_latents(sampler, 5, cond, torch.zeros(2, 3), 3.0, None, SHAPE, [1, 2], guidance_rescale=0.5)
    assert z.shape == (2, *SHAPE) and torch.isfinite(z).all()
    assert len(model.seen) == 5 and model.seen[0] > model.seen[-1]  # Karras levels, high to low
    alone = inf.sample_latents(inf.make_sampler("toy", FakeModel(), pull=0.5), 5, cond[:1], torch.zeros(1, 3), 3.0,
                               None, SHAPE, [2], guidance_rescale=0.5)
    torch.testing.assert_close(alone[0], z[1])  # seeds: sample 2 alone is sample 2 of the batch
    # and it reaches a script's command line
    spec = importlib.util.spec_from_file_location("txt2img_for_test", REPO / "scripts" / "txt2img.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.get_parser().parse_args(["--sampler", "toy", "--schedule", "exponential"])
    assert inf.sampler_name(args) == "toy" and inf.sampler_options(args) == {"spacing": "exponential"}


def test_flags_aliases_and_their_errors() -> None:
    spec = importlib.util.spec_from_file_location("txt2img_flags", REPO / "scripts" / "txt2img.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parse = script.get_parser().parse_args
    assert inf.sampler_name(parse([])) == "ddim" and inf.sampler_name(parse(["--plms"])) == "plms"
    assert inf.sampler_name(parse(["--dpm"])) == "dpm" == inf.sampler_name(parse(["--dpm_solver"]))
    assert inf.sampler_name(parse(["--sampler", "dpmpp_2m"])) == "dpmpp_2m"
    assert parse(["--guidance_rescale", "0.7"]).guidance_rescale == 0.7
    with pytest.raises(inf.ScriptError, match="--plms and --dpm exclude each other"):
        inf.sampler_name(parse(["--plms", "--dpm"]))
    with pytest.raises(inf.ScriptError, match="--sampler ddpm and --plms exclude each other"):
        inf.sampler_name(parse(["--sampler", "ddpm", "--plms"]))
    assert inf.sampler_eta(parse([]), "ddim") == 0.0 and inf.sampler_eta(parse([]), "ddpm") is None
    assert inf.sampler_eta(parse(["--eta", "0.3"]), "ddim") == 0.3
    with pytest.raises(inf.ScriptError, match="--ddim_eta 0.5: PLMS is deterministic"):
        inf.check_steps("plms", 10, 0.5, FakeModel())
    with pytest.raises(inf.ScriptError, match="--steps 600"):
        inf.check_steps("ddim", 600, 0.0, FakeModel())


def test_the_sampler_classes_take_a_spacing() -> None:
    model = FakeModel()
    sampler = DDIMSampler(model, spacing="trailing", final="zero")
    sampler.make_schedule(10, verbose=False)
    assert sampler.ddim_timesteps.tolist() == list(range(99, 1000, 100))
    torch.testing.assert_close(sampler.ddim_alphas, model.schedule.buffers()["alphas_cumprod"][sampler.ddim_timesteps])
    assert sampler.ddim_alphas_prev[0] == 1.0  # final "zero": diffusers' set_alpha_to_one
    karras = DPMSolverSampler(model, spacing="karras")
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    out, inter = karras.sample(6, 2, SHAPE, verbose=False, x_T=x_T)
    assert inter is None and model.seen[-6:] != sorted(model.seen[-6:]) and not float(model.seen[-1]).is_integer()


def tiny_ldm():
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[],
                           num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16)}
    first = {"target": "ldm.models.autoencoder.AutoencoderKL",
             "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                        "ddconfig": dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                                         ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)}}
    params = dict(linear_start=0.0015, linear_end=0.0195, timesteps=100, first_stage_key="image", image_size=8,
                  channels=4, monitor=None, cond_stage_config="__is_unconditional__", unet_config=unet,
                  first_stage_config=first, parameterization="v")
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.create({"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                                     "params": params})).eval()


@pytest.mark.slow
def test_log_images_draws_with_the_registry_sampler() -> None:
    model = tiny_ldm()
    batch = {"image": torch.rand(2, 16, 16, 3) * 2 - 1}
    calls: list[str] = []
    original = Sampler.run

    def spy(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    Sampler.run = spy
    try:
        torch.manual_seed(1)
        log = model.log_images(batch, N=2, sampler="euler_ancestral", ddim_steps=4, inpaint=False,
                               plot_progressive_rows=False, plot_diffusion_rows=False)
        assert log["samples"].shape == (2, 3, 16, 16) and bool(torch.isfinite(log["samples"]).all())
        model.log_images(batch, N=2, ddim_steps=4, inpaint=False, plot_progressive_rows=False,
                         plot_diffusion_rows=False)
    finally:
        Sampler.run = original
    assert calls == ["euler_ancestral", "ddim"]
    with pytest.raises(ValueError, match="needs ddim_steps"):
        model.log_images(batch, N=2, sampler="ddim", ddim_steps=None)
