"""UNetModel: variants build and run, checkpointing is exact, attention blocks match the formula, errors."""
import copy

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock, UNetModel


def tiny(**overrides):
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True, context_dim=16)
    params.update(overrides)
    return UNetModel(**params)


def randomize(model, seed=0, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(batch=2, channels=4, size=8, ctx=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=gen), torch.tensor([3, 700][:batch]),
            torch.randn(batch, 5, ctx, generator=gen))


def test_output_layer_is_zero_initialised():
    torch.manual_seed(0)
    model = tiny()
    x, t, c = inputs()
    assert torch.count_nonzero(model(x, t, c)) == 0


@pytest.mark.parametrize("overrides", [
    dict(num_classes=10),
    dict(num_head_channels=8, num_heads=-1, use_linear_in_transformer=True, transformer_depth=[1, 2]),
    dict(disable_self_attentions=[True, False], num_attention_blocks=[1, 0]),
])
def test_gradient_checkpointing_gives_identical_gradients(overrides):
    plain = randomize(tiny(**overrides))
    ckpt = copy.deepcopy(plain)
    for m in ckpt.modules():  # switch every checkpoint flag on
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(m, attr, None), bool):
                setattr(m, attr, True)
    x, t, c = inputs()
    y = torch.tensor([1, 7]) if "num_classes" in overrides else None
    plain(x, t, c, y).square().mean().backward()
    ckpt(x, t, c, y).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in ckpt.parameters())


def test_checkpointing_is_inactive_without_grad():
    model = randomize(tiny(use_checkpoint=True))
    x, t, c = inputs()
    with torch.no_grad():
        out = model(x, t, c)
    assert out.shape == x.shape


def test_per_level_transformer_depth_and_attention_block_counts():
    model = tiny(transformer_depth=[1, 3], num_res_blocks=[2, 2], num_attention_blocks=[1, 2])
    keys = model.state_dict().keys()
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert not any(k.startswith("input_blocks.2.1.") for k in keys)  # only the first block of level 0 attends
    assert "input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight" in keys
    assert "middle_block.1.transformer_blocks.2.norm3.weight" in keys  # middle depth = last level's depth


def test_legacy_attention_unet_with_updown_and_scale_shift():
    model = randomize(UNetModel(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                                attention_resolutions=[2], num_res_blocks=[1, 2], channel_mult=[1, 2],
                                num_heads=2, resblock_updown=True, use_scale_shift_norm=True))
    sd = model.state_dict()
    assert sd["input_blocks.2.0.emb_layers.1.weight"].shape == (64, 128)  # scale and shift: 2x channels
    assert "input_blocks.2.0.in_layers.0.weight" in sd and "input_blocks.2.0.op.weight" not in sd
    assert sd["middle_block.1.qkv.weight"].shape == (192, 64, 1)
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([1, 2])).shape == x.shape


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_reference(new_order):
    torch.manual_seed(0)
    block = randomize(AttentionBlock(32, num_heads=4, use_new_attention_order=new_order), std=0.2)
    x = torch.randn(2, 32, 3, 3)
    b, c, hw, heads = 2, 32, 9, 4
    qkv = block.qkv(block.norm(x.reshape(b, c, hw)))
    if new_order:
        q, k, v = (t.reshape(b * heads, c // heads, hw) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * c // heads, hw).split(c // heads, dim=1)
    w = torch.einsum("bct,bcs->bts", q, k).mul((c // heads) ** -0.5).softmax(-1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, hw)
    expected = (x.reshape(b, c, hw) + block.proj_out(h)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_num_classes_variants():
    x, t, _ = inputs()
    cont = randomize(tiny(use_spatial_transformer=False, context_dim=None, num_classes="continuous"))
    assert cont.state_dict()["label_emb.weight"].shape == (128, 1)
    assert cont(x, t, y=torch.rand(2, 1)).shape == x.shape
    seq = randomize(tiny(use_spatial_transformer=False, context_dim=None, num_classes="sequential", adm_in_channels=6))
    assert seq.state_dict()["label_emb.0.0.weight"].shape == (128, 6)
    assert seq.state_dict()["label_emb.0.2.weight"].shape == (128, 128)
    out_a = seq(x, t, y=torch.zeros(2, 6))
    out_b = seq(x, t, y=torch.ones(2, 6))
    assert not torch.allclose(out_a, out_b)


def test_codebook_head():
    model = tiny(n_embed=13)
    x, t, c = inputs()
    assert model(x, t, c).shape == (2, 13, 8, 8)


def test_bf16_autocast_runs_in_bf16_and_tracks_fp32():
    model = randomize(tiny(use_bf16=True))
    x, t, c = inputs()
    ref = model(x, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, c)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_half_weights_compute_in_half():
    model = randomize(tiny(use_fp16=True))
    x, t, c = inputs()
    ref = model(x, t, c)  # fp32 weights, no autocast: computes in fp32 despite use_fp16
    half = copy.deepcopy(model).half()
    out = half(x.half(), t, c.half())
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("overrides,message", [
    (dict(context_dim=None), "needs context_dim"),
    (dict(use_spatial_transformer=False), "context_dim is set but use_spatial_transformer is False"),
    (dict(num_heads=-1), "set either num_heads or num_head_channels"),
    (dict(num_res_blocks=[1, 1, 1]), r"num_res_blocks needs one entry per level of channel_mult \(2\)"),
    (dict(num_attention_blocks=[2, 1]), "num_attention_blocks .* exceeds num_res_blocks"),
    (dict(num_classes="discrete"), "num_classes must be an int, 'continuous' or 'sequential'"),
])
def test_bad_configurations_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_labels_must_match_conditioning():
    x, t, c = inputs()
    with pytest.raises(ValueError, match="pass class labels y exactly when the model is class-conditional"):
        tiny()(x, t, c, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y missing"):
        tiny(num_classes=3)(x, t, c)


def test_resblock_skip_connection_kinds():
    assert isinstance(ResBlock(32, 64, 0.0).skip_connection, torch.nn.Identity)
    assert ResBlock(32, 64, 0.0, out_channels=64).skip_connection.kernel_size == (1, 1)
    assert ResBlock(32, 64, 0.0, out_channels=64, use_conv=True).skip_connection.kernel_size == (3, 3)
