"""Cross-attention blocks: SDPA matches the textbook formula; masks; fp16 does not overflow; layouts."""
import math

import pytest
import torch

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer


def reference_attention(layer: CrossAttention, x, context=None, mask=None):
    """softmax(q kᵀ / sqrt(d)) v written out with einsum, as the original LDM code did it."""
    context = x if context is None else context
    h = layer.heads
    q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(context)
    b, n, inner = q.shape
    d = inner // h
    q, k, v = (t.reshape(b, -1, h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * layer.scale
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
    return layer.to_out(out.permute(0, 2, 1, 3).reshape(b, n, inner))


def test_cross_attention_matches_reference():
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=24, context_dim=10, heads=3, dim_head=8)
    x, ctx = torch.randn(2, 9, 24), torch.randn(2, 5, 10)
    torch.testing.assert_close(layer(x, ctx), reference_attention(layer, x, ctx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(CrossAttention(24, heads=2, dim_head=4)(x).shape, x.shape)


def test_cross_attention_mask_hides_tokens():
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=16, context_dim=8, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = layer(x, ctx, mask=mask)
    torch.testing.assert_close(out, reference_attention(layer, x, ctx, mask), atol=1e-5, rtol=1e-5)
    # changing a masked-out token must not change the output of that sample
    ctx2 = ctx.clone()
    ctx2[1, 4] += 10
    torch.testing.assert_close(layer(x, ctx2, mask=mask)[1], out[1])


def test_half_precision_attention_does_not_overflow():
    # q·kᵀ here is ~7e5, beyond fp16's 65504: a naive fp16 einsum gives inf/nan; SD2 upcast for this reason.
    layer = CrossAttention(query_dim=64, heads=1, dim_head=64)
    with torch.no_grad():
        layer.to_q.weight.copy_(torch.eye(64) * 300)
        layer.to_k.weight.copy_(torch.eye(64) * 300)
    x = torch.ones(1, 3, 64) / 8
    x[0, 1] *= -1
    ref = layer(x)
    out = layer.half()(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    naive_logits = layer.to_q(x.half())[0] @ layer.to_k(x.half())[0].T
    assert not torch.isfinite(naive_logits).all()


def test_transformer_block_keys_and_disable_self_attn():
    block = BasicTransformerBlock(32, n_heads=4, d_head=8, context_dim=12, disable_self_attn=True)
    sd = block.state_dict()
    assert sd["attn1.to_k.weight"].shape == (32, 12)  # self-attention replaced by attention to the context
    assert sd["attn2.to_k.weight"].shape == (32, 12)
    assert sd["ff.net.0.proj.weight"].shape == (2 * 4 * 32, 32)  # GEGLU doubles the projection
    assert sd["ff.net.2.weight"].shape == (32, 4 * 32)
    assert {"norm1.weight", "norm2.weight", "norm3.weight"} <= set(sd)
    out = block(torch.randn(2, 5, 32), context=torch.randn(2, 3, 12))
    assert out.shape == (2, 5, 32)


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_layouts_and_zero_init(use_linear):
    st = SpatialTransformer(32, n_heads=2, d_head=16, depth=2, context_dim=[12, 20], use_linear=use_linear)
    sd = st.state_dict()
    assert sd["proj_in.weight"].shape == ((32, 32) if use_linear else (32, 32, 1, 1))
    assert sd["transformer_blocks.1.attn2.to_k.weight"].shape == (32, 20)
    assert sd["transformer_blocks.0.attn2.to_k.weight"].shape == (32, 12)
    assert torch.count_nonzero(sd["proj_out.weight"]) == 0
    x = torch.randn(2, 32, 4, 4)
    out = st(x, context=[torch.randn(2, 3, 12), torch.randn(2, 5, 20)])
    torch.testing.assert_close(out, x)  # zero-initialised output projection: identity at init


def test_spatial_transformer_conv_and_linear_projections_agree():
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=False)
    lin = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=True)
    for p in conv.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sd = {k: (v.flatten(1) if k.startswith("proj_") and v.ndim == 4 else v) for k, v in conv.state_dict().items()}
    lin.load_state_dict(sd)
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 8)
    torch.testing.assert_close(conv(x, ctx), lin(x, ctx), atol=1e-5, rtol=1e-5)


def test_spatial_transformer_rejects_context_list_of_wrong_length():
    with pytest.raises(ValueError, match="context_dim has 3 entries but the transformer depth is 2"):
        SpatialTransformer(32, 2, 16, depth=2, context_dim=[8, 8, 8])


def test_scale_is_inverse_sqrt_head_dim():
    assert math.isclose(CrossAttention(8, heads=2, dim_head=16).scale, 16**-0.5)
