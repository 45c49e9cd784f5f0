"""Our UNetModel against diffusers' UNet2DConditionModel with converted weights, and the key mapping itself."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.convert.diffusers_unet import (
    UnsupportedUNetConfig,
    diffusers_unet_config,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from ldm.modules.diffusionmodules.openaimodel import UNetModel

import diffusers  # the test-only reference (setup.py test extra): missing, the suite fails

TINY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
    use_spatial_transformer=True,
)
VARIANTS = {
    # SD1: fixed head count, 1x1-conv projections, attention only at the top level
    "sd1": dict(TINY, attention_resolutions=[1], num_heads=4, context_dim=32),
    # SD2: fixed head width, linear projections, per-level transformer depth, two res blocks per level
    "sd2": dict(
        TINY, num_res_blocks=2, attention_resolutions=[1, 2], num_head_channels=8, use_linear_in_transformer=True,
        transformer_depth=[1, 2], context_dim=48, legacy=False,
    ),
    # class-conditional with scale-shift norm (ADM-style), 16x16 latents
    "classes": dict(
        TINY, image_size=16, attention_resolutions=[2], num_heads=2, context_dim=32, num_classes=10,
        use_scale_shift_norm=True,
    ),
    # SD2-unCLIP-style ADM vector conditioning
    "sequential": dict(TINY, attention_resolutions=[1, 2], num_heads=4, context_dim=32, num_classes="sequential",
                       adm_in_channels=12),
}


def _randomised_unet(params: dict) -> UNetModel:
    """Our UNet with every parameter random (the zero-initialised output layers too), seed fixed."""
    model = UNetModel(**params).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight"))
            if p.ndim == 1 and is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)  # norm gains around 1
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))  # unit-variance activations
    return model


def _inputs(params: dict) -> dict:
    """A batch of 2 latents, timesteps, a length-7 context and labels for the variant."""
    gen = torch.Generator().manual_seed(1)
    size = params["image_size"]
    inputs = {
        "x": torch.randn(2, 4, size, size, generator=gen),
        "timesteps": torch.tensor([3, 917]),
        "context": torch.randn(2, 7, params["context_dim"], generator=gen),
    }
    if isinstance(params.get("num_classes"), int):
        inputs["y"] = torch.tensor([1, 7])
    elif params.get("num_classes") == "sequential":
        inputs["y"] = torch.randn(2, params["adm_in_channels"], generator=gen)
    return inputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers(variant: str) -> None:
    params = VARIANTS[variant]
    ours = _randomised_unet(params)
    theirs = diffusers.UNet2DConditionModel(**diffusers_unet_config(params)).eval()
    theirs.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), params), strict=True)
    inp = _inputs(params)
    with torch.no_grad():
        expected = theirs(
            inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"], class_labels=inp.get("y")
        ).sample
        got = ours(**inp)
    assert expected.std() > 0.3, "outputs too small for the comparison to mean anything"
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_round_trip(variant: str) -> None:
    params = VARIANTS[variant]
    sd = UNetModel(**params).state_dict()
    there = unet_state_dict_to_diffusers(sd, params)
    back = unet_state_dict_from_diffusers(there, params)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_sd2_head_counts_per_level() -> None:
    sd2 = dict(
        VARIANTS["sd2"], model_channels=320, channel_mult=[1, 2, 4, 4], transformer_depth=1, num_head_channels=64
    )
    config = diffusers_unet_config(sd2)
    # diffusers reads `attention_head_dim` as a head count: SD2's fixed 64-wide heads give one count per level
    assert config["attention_head_dim"] == (5, 10, 20, 20)
    assert config["use_linear_projection"] is True
    assert diffusers_unet_config(VARIANTS["sd2"])["transformer_layers_per_block"] == (1, 2)


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(use_spatial_transformer=False, context_dim=None), "use_spatial_transformer"),
        (dict(resblock_updown=True), "resblock_updown"),
        (dict(conv_resample=False), "conv_resample"),
        (dict(n_embed=16), "n_embed"),
        (dict(disable_middle_self_attn=True), "disable_middle_self_attn"),
        (dict(num_attention_blocks=[1, 1]), "num_attention_blocks"),
        (dict(num_classes="continuous"), "num_classes"),
        (dict(num_heads=-1, num_head_channels=12), "num_head_channels"),
    ],
)
def test_inexpressible_configs_name_the_parameter(override: dict, name: str) -> None:
    with pytest.raises(UnsupportedUNetConfig, match=name):
        diffusers_unet_config(dict(VARIANTS["sd1"], **override))


def test_foreign_key_is_reported() -> None:
    params = VARIANTS["sd1"]
    with pytest.raises(KeyError, match="input_blocks.9.0.in_layers.0.weight"):
        unet_state_dict_to_diffusers({"input_blocks.9.0.in_layers.0.weight": torch.zeros(1)}, params)
