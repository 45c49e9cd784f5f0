"""First-stage Encoder/Decoder: shapes, the original key layout, resampling details, and parity with diffusers."""
import math

import pytest
import torch
from torch import nn

from ldm.convert.diffusers_vae import (
    diffusers_vae_config,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from ldm.modules.diffusionmodules.model import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    LinAttnBlock,
    ResnetBlock,
    Upsample,
    get_timestep_embedding,
    make_attn,
)

SD_KL_F8 = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
TINY = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)


def _autoencoder(ddconfig: dict, embed_dim: int) -> nn.Module:
    """Encoder, decoder and the two 1x1 convs of the original AutoencoderKL, under its attribute names."""
    z = ddconfig["z_channels"]
    ae = nn.Module()
    ae.encoder = Encoder(**ddconfig)
    ae.decoder = Decoder(**ddconfig)
    ae.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
    ae.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
    return ae


def test_sd_kl_f8_has_248_tensors_with_original_shapes():
    with torch.device("meta"):
        ae = _autoencoder(SD_KL_F8, embed_dim=4)
    sd = ae.state_dict()
    assert len(sd) == 248
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 4, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert not any("temb_proj" in k for k in sd)


def test_tiny_key_layout_matches_original():
    enc, dec = Encoder(**TINY), Decoder(**TINY)
    enc_keys = {k.rsplit(".", 1)[0] for k in enc.state_dict()}
    assert enc_keys == {
        "conv_in", "down.0.block.0.norm1", "down.0.block.0.conv1", "down.0.block.0.norm2", "down.0.block.0.conv2",
        "down.0.downsample.conv",
        "down.1.block.0.norm1", "down.1.block.0.conv1", "down.1.block.0.norm2", "down.1.block.0.conv2",
        "down.1.block.0.nin_shortcut",
        "down.1.attn.0.norm", "down.1.attn.0.q", "down.1.attn.0.k", "down.1.attn.0.v", "down.1.attn.0.proj_out",
        "mid.block_1.norm1", "mid.block_1.conv1", "mid.block_1.norm2", "mid.block_1.conv2",
        "mid.attn_1.norm", "mid.attn_1.q", "mid.attn_1.k", "mid.attn_1.v", "mid.attn_1.proj_out",
        "mid.block_2.norm1", "mid.block_2.conv1", "mid.block_2.norm2", "mid.block_2.conv2",
        "norm_out", "conv_out",
    }
    dec_sd = dec.state_dict()
    # Level 1 (16x16) holds the 64-channel blocks and the attention; level 0 is the full-resolution output level.
    assert {k for k in dec_sd if k.startswith("up.1.attn.")} >= {"up.1.attn.0.q.weight", "up.1.attn.1.q.weight"}
    assert not any(k.startswith("up.0.attn") or k.startswith("up.0.upsample") for k in dec_sd)
    assert dec_sd["up.1.upsample.conv.weight"].shape == (64, 64, 3, 3)
    assert dec_sd["up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert len(dec.up[1].block) == TINY["num_res_blocks"] + 1
    assert list(dec_sd)[:2] == ["conv_in.weight", "conv_in.bias"] and list(dec_sd)[-1] == "conv_out.bias"


def test_encoder_decoder_shapes_and_output_options():
    torch.manual_seed(0)
    enc, dec = Encoder(**TINY), Decoder(**TINY)
    x = torch.randn(2, 3, 32, 32)
    moments = enc(x)
    assert moments.shape == (2, 8, 16, 16)
    assert Encoder(**{**TINY, "double_z": False})(x).shape == (2, 4, 16, 16)
    z = moments[:, :4]
    out = dec(z)
    assert out.shape == (2, 3, 32, 32)
    assert dec.z_shape == (1, 4, 16, 16)
    pre_end, tanh = Decoder(**TINY, give_pre_end=True), Decoder(**TINY, tanh_out=True)
    pre_end.load_state_dict(dec.state_dict())
    tanh.load_state_dict(dec.state_dict())
    pre = pre_end(z)
    assert pre.shape == (2, 32, 32, 32)
    assert torch.allclose(dec.conv_out(torch.nn.functional.silu(dec.norm_out(pre))), out, atol=1e-6)
    assert torch.allclose(tanh(z), torch.tanh(out), atol=1e-6)


def test_decoder_hands_freed_memory_back_after_each_block_and_upsampling_without_gradients(monkeypatch):
    """Each block's and level's freed activations are trimmed from the heap before the next allocates (one
    `return_freed_memory` per residual block and per upsampling), only when decoding without gradients."""
    import ldm.modules.diffusionmodules.model as model

    calls = []
    monkeypatch.setattr(model, "return_freed_memory", lambda: calls.append(1))
    dec = Decoder(**{**TINY, "ch_mult": [1, 2, 2]})
    z = torch.randn(1, 4, 8, 8)
    dec(z)
    assert calls == []
    with torch.no_grad():
        dec(z)
    assert len(calls) == sum(len(level.block) for level in dec.up) + 2 == 3 * (TINY["num_res_blocks"] + 1) + 2


def test_downsample_pads_bottom_right_only():
    down = Downsample(1, with_conv=True)
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) + 1.0
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0  # centre tap
        centre = down(x)
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap
        corner = down(x)
    assert centre.shape == (1, 1, 4, 4)
    # Window (i, j) starts at input row/col 2i, 2j: no padding was added on the top/left.
    assert torch.equal(centre[0, 0], x[0, 0, 1::2, 1::2])
    # The last window's bottom-right tap reads the zero padding on the bottom/right.
    assert corner[0, 0, -1, -1] == 0.0 and corner[0, 0, -1, :-1].eq(0).all() and corner[0, 0, :-1, -1].eq(0).all()
    assert torch.equal(corner[0, 0, :-1, :-1], x[0, 0, 2:7:2, 2:7:2])


def test_downsample_odd_size_and_last_row_matters():
    torch.manual_seed(0)
    down = Downsample(4, with_conv=True)
    x = torch.randn(1, 4, 7, 7)
    assert down(x).shape == (1, 4, 3, 3)  # floor((7 + 1 - 3) / 2) + 1
    x_even = torch.randn(1, 4, 8, 8)
    changed = x_even.clone()
    changed[..., -1, :] += 1.0
    changed[..., :, -1] += 1.0
    diff = (down(changed) - down(x_even)).abs()
    assert diff[..., -1, :].gt(0).all() and diff[..., :, -1].gt(0).all()
    assert diff[..., :-1, :-1].eq(0).all()
    pooled = Downsample(4, with_conv=False)(x_even)
    assert torch.allclose(pooled, x_even.reshape(1, 4, 4, 2, 4, 2).mean(dim=(3, 5)))


def test_upsample_nearest_then_conv():
    up = Upsample(2, with_conv=False)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).repeat(1, 2, 1, 1)
    assert torch.equal(up(x)[0, 0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    conv_up = Upsample(2, with_conv=True)
    assert torch.allclose(conv_up(x), conv_up.conv(up(x)))


def test_resnet_block_temb_and_shortcut():
    torch.manual_seed(0)
    block = ResnetBlock(in_channels=32, out_channels=64, dropout=0.0, temb_channels=16)
    assert isinstance(block.nin_shortcut, nn.Conv2d) and block.nin_shortcut.kernel_size == (1, 1)
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    assert not torch.allclose(block(x, temb), block(x, None))
    conv_block = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, dropout=0.0, temb_channels=0)
    assert conv_block.conv_shortcut.kernel_size == (3, 3) and not hasattr(conv_block, "temb_proj")
    with pytest.raises(ValueError, match="temb_channels=0"):
        conv_block(x, temb)


def test_attn_block_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = AttnBlock(32)
    x = torch.randn(2, 32, 4, 5)
    h = attn.norm(x)
    q, k, v = (m(h).flatten(2) for m in (attn.q, attn.k, attn.v))  # (B, C, HW)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # (B, HW, HW)
    expected = x + attn.proj_out((v @ weights.transpose(1, 2)).reshape(2, 32, 4, 5))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_make_attn_types():
    torch.manual_seed(0)
    assert isinstance(make_attn(32, "vanilla"), AttnBlock)
    assert isinstance(make_attn(32, "vanilla-xformers"), AttnBlock)
    assert isinstance(make_attn(32, "none"), nn.Identity)
    linear = make_attn(32, "linear")
    assert isinstance(linear, LinAttnBlock)
    assert set(linear.state_dict()) == {"to_qkv.weight", "to_out.weight", "to_out.bias"}
    x = torch.randn(1, 32, 3, 4)
    q, k, v = linear.to_qkv(x).flatten(2).chunk(3, dim=1)
    expected = linear.to_out((torch.softmax(k, -1) @ v.transpose(1, 2)).transpose(1, 2).matmul(q).reshape(1, 32, 3, 4))
    assert torch.allclose(linear(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="'softmax'"):
        make_attn(32, "softmax")


def test_attn_type_none_and_linear_in_coders():
    enc_none = Encoder(**TINY, attn_type="none")
    assert not any(".q." in k for k in enc_none.state_dict())
    dec_lin = Decoder(**TINY, use_linear_attn=True)
    assert "mid.attn_1.to_qkv.weight" in dec_lin.state_dict()
    assert dec_lin(torch.randn(1, 4, 16, 16)).shape == (1, 3, 32, 32)


def test_timestep_embedding():
    t = torch.tensor([0.0, 10.0])
    emb = get_timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    assert torch.allclose(emb[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))
    assert torch.equal(emb[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))
    odd = get_timestep_embedding(t, 9)
    assert odd.shape == (2, 9) and odd[:, -1].eq(0).all()


def _randomised_tiny_autoencoder() -> nn.Module:
    """TINY autoencoder with every parameter (GroupNorm affines included) moved off its initial value."""
    torch.manual_seed(0)
    ae = _autoencoder(TINY, embed_dim=4).eval()
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ae


def test_state_dict_round_trip_through_diffusers_layout():
    sd = _randomised_tiny_autoencoder().state_dict()
    theirs = vae_state_dict_to_diffusers(sd)
    assert "decoder.up_blocks.0.attentions.1.to_q.weight" in theirs  # our up.1 (16x16) comes first in diffusers
    assert theirs["encoder.down_blocks.1.attentions.0.to_out.0.weight"].shape == (64, 64)
    back = vae_state_dict_from_diffusers(theirs)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_unknown_keys_are_named():
    sd = _randomised_tiny_autoencoder().state_dict()
    sd["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        vae_state_dict_to_diffusers(sd)
    with pytest.raises(ValueError, match="ch_mult must start with 1"):
        diffusers_vae_config({**TINY, "ch_mult": [2, 2]}, embed_dim=4)


def test_numerical_parity_with_diffusers_autoencoder_kl():
    import diffusers  # the test-only reference (setup.py test extra)
    ours = _randomised_tiny_autoencoder()
    theirs = diffusers.AutoencoderKL(**diffusers_vae_config(TINY, embed_dim=4)).eval()
    theirs.load_state_dict(vae_state_dict_to_diffusers(ours.state_dict()), strict=True)
    assert theirs.config.up_block_types[0] == "AttnUpDecoderBlock2D"  # the attention path is exercised
    torch.manual_seed(1)
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        enc_diff = (ours.encoder(x) - theirs.encoder(x)).abs().max().item()
        dec_diff = (ours.decoder(z) - theirs.decoder(z)).abs().max().item()
        mean_diff = (ours.quant_conv(ours.encoder(x))[:, :4] - theirs.encode(x).latent_dist.mean).abs().max().item()
        out_diff = (ours.decoder(ours.post_quant_conv(z)) - theirs.decode(z).sample).abs().max().item()
    assert enc_diff <= 1e-4 and dec_diff <= 1e-4 and mean_diff <= 1e-4 and out_diff <= 1e-4
    # Each output is sensitive enough that a layout mistake would show: a small weight change moves it far more.
    with torch.no_grad():
        theirs.decoder.up_blocks[0].attentions[0].to_v.weight.mul_(1.5)
        assert (ours.decoder(z) - theirs.decoder(z)).abs().max().item() > 1e-3
