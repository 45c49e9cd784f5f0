"""Speed switches: channels_last and torch.compile give the eager UNet's output with the same state_dict keys; the
compile-by-default rule; the one-line bf16 message; weights kept
in the autocast dtype give autocast's outputs; lightning.speed with main.py's flags over it."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm import acceleration
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.training.config import UsageError
from ldm.training.trainer import speed_options

UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
            num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
            context_dim=16, legacy=False)


def tiny_unet(**changes) -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(**{**UNET, **changes}).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.1)
    return unet


def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([1, 500]), torch.randn(2, 5, 16, generator=gen)


def test_channels_last_unet_matches_contiguous():
    unet = tiny_unet()
    x, t, ctx = inputs()
    with torch.no_grad():
        reference = unet(x, t, context=ctx)
        keys = list(unet.state_dict())
        acceleration.to_channels_last(unet)
        assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(unet(x, t, context=ctx), reference, atol=1e-5, rtol=1e-5)
    assert list(unet.state_dict()) == keys


@pytest.mark.slow
def test_compiled_unet_matches_eager_and_keeps_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(acceleration.CACHE_ENV, str(tmp_path / "inductor"))
    unet = tiny_unet(channel_mult=[1], attention_resolutions=[1])  # one level: fewer kernels to compile
    x, t, ctx = inputs()
    with torch.no_grad():
        reference = unet(x, t, context=ctx)
    keys = list(unet.state_dict())
    acceleration.compile_unet(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=ctx), reference, atol=1e-5, rtol=1e-5)
    assert list(unet.state_dict()) == keys
    assert any((tmp_path / "inductor").iterdir())  # the on-disk cache a second run reuses


def test_weights_stored_for_autocast_give_autocasts_outputs_bit_for_bit():
    unet = tiny_unet()
    x, t, ctx = inputs()
    fp32_bytes = sum(p.numel() * 4 for m in unet.modules() if isinstance(m, acceleration.AUTOCAST_LAYERS)
                     for p in m.parameters(recurse=False))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = unet(x, t, context=ctx)
        assert acceleration.store_for_autocast(unet, torch.bfloat16) == fp32_bytes // 2
        stored = unet(x, t, context=ctx)
    assert reference.dtype == stored.dtype
    assert torch.equal(stored, reference)
    assert unet.input_blocks[0][0].weight.dtype == unet.out[2].bias.dtype == torch.bfloat16
    assert unet.out[0].weight.dtype == torch.float32  # GroupNorm: autocast uses it in fp32
    assert acceleration.store_for_autocast(unet, torch.bfloat16) == 0  # already stored


def test_compile_pays_only_for_big_runs():
    unet = tiny_unet()  # ~0.4 M parameters
    n = sum(p.numel() for p in unet.parameters())
    assert not acceleration.compile_pays(unet, unet_calls=1000)
    calls = int(acceleration.COMPILE_PAYS_AT / n) + 1
    assert acceleration.compile_pays(unet, unet_calls=calls)
    assert not acceleration.compile_pays(unet, unet_calls=calls - 2)
    # the SD v1 UNet's 860 M parameters: a 50-step image stays eager, three of them compile
    assert 50 * 860e6 < acceleration.COMPILE_PAYS_AT <= 150 * 860e6


def test_bf16_message_on_cpus_without_native_bf16(monkeypatch):
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: False)
    message = acceleration.bf16_warning("cpu")
    assert message and "\n" not in message and "emulated" in message
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: True)
    assert acceleration.bf16_warning("cpu") is None


def test_cpu_bf16_detection_reads_cpuinfo_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu avx2 fma", False), ("fpu avx512f amx_bf16 amx_tile", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        assert acceleration.cpu_has_native_bf16() is expected


def test_speed_options_flags_over_config():
    config = OmegaConf.create({"speed": {"compile": True}})
    assert speed_options(config, {"compile": None, "channels_last": None}) == {"compile": True, "channels_last": False}
    assert speed_options(config, {"compile": False, "channels_last": True}) == {"compile": False, "channels_last": True}
    assert speed_options(OmegaConf.create({}), {}) == {"compile": False, "channels_last": False}
    with pytest.raises(UsageError, match="lightning.speed.compil"):
        speed_options(OmegaConf.create({"speed": {"compil": True}}), {})


def test_main_py_speed_flags():
    import main

    opt, _ = main.get_parser().parse_known_args(["--compile", "--no-channels_last"])
    assert (opt.compile, opt.channels_last) == (True, False)
    opt, _ = main.get_parser().parse_known_args([])
    assert (opt.compile, opt.channels_last) == (None, None)  # lightning.speed decides


def test_lightning_speed_is_a_section_main_py_reads(tmp_path):
    from ldm.training.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {target: torch.nn.Identity}\nlightning: {speed: {channels_last: true}}\n")
    _, lightning = load_config([str(path)], ["lightning.speed.compile=true"])
    assert speed_options(lightning, {}) == {"compile": True, "channels_last": True}
