"""The speed fusions give the unfused results: packed q/k/v projections, GEGLU and GroupNorm+SiLU in place, residuals
written into the block output — in fp32 to ~1e-6, with the original state_dict keys and gradients unchanged."""
import copy

import torch

from ldm.modules.attention import GEGLU, CrossAttention, SpatialTransformer, set_fused_projections
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel

TOL = dict(atol=1e-6, rtol=1e-5)
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                 num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
                 context_dim=24, legacy=False)


def pair(layer: CrossAttention) -> tuple[CrossAttention, CrossAttention]:
    """(fused, unfused) copies of a layer with the same weights."""
    fused, plain = copy.deepcopy(layer), copy.deepcopy(layer)
    fused.fused, plain.fused = True, False
    return fused, plain


def test_fused_projections_match_separate_ones_with_and_without_context():
    torch.manual_seed(0)
    fused, plain = pair(CrossAttention(query_dim=32, context_dim=20, heads=4, dim_head=8))
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 5, 20)
    self_fused, self_plain = pair(CrossAttention(query_dim=32, heads=4, dim_head=8))
    with torch.no_grad():
        torch.testing.assert_close(fused(x, ctx), plain(x, ctx), **TOL)
        torch.testing.assert_close(self_fused(x), self_plain(x), **TOL)
    # the weights now live in one packed tensor: no second copy, and still the original parameters and keys
    packed = self_fused._packed[("to_q", "to_k", "to_v")]
    assert self_fused.to_k.weight.data_ptr() == packed[32:].data_ptr()
    assert list(self_fused.state_dict()) == list(self_plain.state_dict())
    assert all(v.shape == self_plain.state_dict()[k].shape for k, v in self_fused.state_dict().items())


def test_fused_projections_train_every_parameter_like_separate_ones():
    torch.manual_seed(1)
    fused, plain = pair(CrossAttention(query_dim=16, heads=2, dim_head=8))
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        fused(x)  # packs the weights first (as sampling during training does), then trains
    for layer in (fused, plain):
        layer(x).square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)


def test_packed_weights_follow_load_state_dict_and_dtype_changes():
    torch.manual_seed(2)
    fused, plain = pair(CrossAttention(query_dim=16, context_dim=12, heads=2, dim_head=8))
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 3, 12)
    with torch.no_grad():
        fused(x, ctx)
        new = {k: torch.randn_like(v) for k, v in plain.state_dict().items()}
        fused.load_state_dict(new)
        plain.load_state_dict(new)
        torch.testing.assert_close(fused(x, ctx), plain(x, ctx), **TOL)
        fused.double(), plain.double()
        torch.testing.assert_close(fused(x.double(), ctx.double()), plain(x.double(), ctx.double()))
        fused.load_state_dict({k: v.double() + 1 for k, v in new.items()}, assign=True)
        plain.load_state_dict({k: v.double() + 1 for k, v in new.items()}, assign=True)
        torch.testing.assert_close(fused(x.double(), ctx.double()), plain(x.double(), ctx.double()))


def test_geglu_in_place_product_matches_training_path():
    torch.manual_seed(3)
    layer, x = GEGLU(16, 24), torch.randn(2, 5, 16)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, layer(x).detach(), **TOL)


def test_unet_inference_path_matches_gradient_path_and_unfused():
    """no_grad runs every fusion (packed projections, in-place SiLU / GEGLU); with gradients none."""
    torch.manual_seed(4)
    unet = UNetModel(**TINY_UNET).eval()
    for p in unet.parameters():  # zero-initialised output convs would hide the attention branches
        p.data.normal_(0, 0.2)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 7, 24)
    reference = unet(x, t, context=ctx).detach()
    x_before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=ctx), reference, **TOL)
        set_fused_projections(unet, False)
        torch.testing.assert_close(unet(x, t, context=ctx), reference, **TOL)
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)  # nothing wrote into the input


def test_spatial_transformer_keeps_its_input():
    torch.manual_seed(5)
    block = SpatialTransformer(32, 2, 16, context_dim=8).eval()
    x, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 3, 8)
    x_before = x.clone()
    with torch.no_grad():
        out = block(x, ctx)
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)
    torch.testing.assert_close(out, block(x, ctx).detach(), **TOL)


def test_autoencoder_coders_inference_path_matches_gradient_path():
    torch.manual_seed(6)
    dd = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3,
              resolution=16, z_channels=4)
    encoder, decoder = Encoder(**dd).eval(), Decoder(**dd).eval()
    img = torch.randn(1, 3, 16, 16)
    moments = encoder(img)
    with torch.no_grad():
        torch.testing.assert_close(encoder(img), moments.detach(), **TOL)
        z = moments[:, :4].detach()
        out = decoder(z)
    torch.testing.assert_close(out, decoder(z).detach(), **TOL)


def test_in_place_residual_keeps_the_layout_and_dtype_of_x_plus_h():
    """h.add_(x) only where it is x + h: a channels_last block output beside a contiguous residual (an attention
    block's) or a bf16 one beside fp32 gets a new tensor, so the latent's layout, and with it randn_like's noise, and
    its dtype are the out-of-place sum's."""
    from ldm.modules.diffusionmodules.util import add_residual

    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        h = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
        out = add_residual(x, h.clone(memory_format=torch.preserve_format))
        assert out.stride() == (x + h).stride() == x.stride()
        torch.manual_seed(0)
        noise = torch.randn_like(out)
        torch.manual_seed(0)
        assert torch.equal(noise, torch.randn_like(x))
        h16 = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
        assert add_residual(x, h16).dtype == torch.float32
        fresh = torch.randn(2, 4, 3, 3)
        written = add_residual(x, fresh)
        assert written is fresh  # the plain case still saves the activation


def test_compiled_residual_is_the_functional_sum_skip_first():
    """Under torch.compile the residual is traced as x + h, the skip first, not h.add_(x): inductor then fuses the
    sum into the block's last 3x3 convolution as an in-place accumulation, as it does for diffusers' input + hidden
    (traced in place, the sum went into the 1x1 skip convolution instead)."""
    from ldm.modules.diffusionmodules.util import add_residual

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        out = torch.compile(add_residual, backend=backend, fullgraph=True)(x, h)
    torch.testing.assert_close(out, x + h, rtol=0, atol=0)
    adds = [node for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert len(adds) == 1 and "add_" not in str(adds[0].target)
    inputs = [node.name for node in graphs[0].graph.nodes if node.op == "placeholder"]
    assert [arg.name for arg in adds[0].args] == inputs  # x first, as passed
