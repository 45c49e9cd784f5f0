"""EncoderUNetModel (the UNet's encoder half with a pooled head), AttentionPool2d, and the float16 torso conversion
(`convert_to_fp16` / `convert_to_fp32`) of UNetModel and EncoderUNetModel.

The expected state_dict keys are enumerated from the hyper-parameters alone; the attention pool is checked against
an explicit einsum of CLIP's attention pooling."""
import math

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import AttentionPool2d, EncoderUNetModel, UNetModel

TINY = dict(image_size=16, in_channels=4, model_channels=32, out_channels=10, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16)
TORSO = ("input_blocks.", "middle_block.", "output_blocks.")


def resblock_keys(prefix, skip):
    names = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"] + (["skip_connection"] if skip
                                                                                                else [])
    return {f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")}


def attention_keys(prefix):
    return {f"{prefix}.{n}.{p}" for n in ("norm", "qkv", "proj_out") for p in ("weight", "bias")}


def expected_keys(pool):
    """TINY's keys: time MLP, input conv, level 0 (ResBlock 32->32, downsample), level 1 (ResBlock 32->64 with a
    skip conv, attention at ds=2), the middle block, then the pool's head."""
    keys = {f"time_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    keys |= {"input_blocks.0.0.weight", "input_blocks.0.0.bias", "input_blocks.2.0.op.weight", "input_blocks.2.0.op.bias"}
    keys |= resblock_keys("input_blocks.1.0", skip=False) | resblock_keys("input_blocks.3.0", skip=True)
    keys |= attention_keys("input_blocks.3.1") | attention_keys("middle_block.1")
    keys |= resblock_keys("middle_block.0", False) | resblock_keys("middle_block.2", False)
    heads = {"adaptive": ["out.0", "out.3"], "attention": ["out.0", "out.2.qkv_proj", "out.2.c_proj"],
             "spatial": ["out.0", "out.2"], "spatial_v2": ["out.0", "out.1", "out.3"]}[pool]
    keys |= {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    return keys | ({"out.2.positional_embedding"} if pool == "attention" else set())


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_unet_keys_and_output_shape(pool):
    torch.manual_seed(0)
    model = EncoderUNetModel(**TINY, pool=pool)
    assert set(model.state_dict()) == expected_keys(pool)
    out = model(torch.randn(3, 4, 16, 16), torch.tensor([0, 10, 999]))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    if pool == "adaptive":
        assert not out.any()  # the head's conv starts at zero, as the original
    if pool.startswith("spatial"):  # the MLP reads the mean features of the 4 input blocks and the middle block
        assert model.out[0].in_features == 32 + 32 + 32 + 64 + 64


def test_encoder_unet_learns_to_classify_noisy_inputs():
    """A few Adam steps on two classes (bright vs dark images, noised at random levels) lower the loss."""
    torch.manual_seed(0)
    model = EncoderUNetModel(**{**TINY, "out_channels": 2}, pool="attention")
    labels = torch.tensor([0, 1] * 4)
    x = (labels * 2.0 - 1.0).reshape(-1, 1, 1, 1).expand(-1, 4, 16, 16) + 0.3 * torch.randn(8, 4, 16, 16)
    t = torch.randint(0, 1000, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x, t), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_attention_pool_is_clip_attention_pooling():
    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=4, embed_dim=32, num_heads_channels=8, output_dim=6)
    x = torch.randn(2, 32, 4, 4)
    seq = torch.cat([x.flatten(2).mean(-1, keepdim=True), x.flatten(2)], dim=-1) + pool.positional_embedding
    qkv = torch.einsum("oc,nct->not", pool.qkv_proj.weight[..., 0], seq) + pool.qkv_proj.bias[:, None]
    q, k, v = (part.reshape(2, 4, 8, 17) for part in qkv.chunk(3, dim=1))  # 4 heads of 8 channels
    weights = torch.softmax(torch.einsum("nhct,nhcs->nhts", q, k) / math.sqrt(8), dim=-1)
    attended = torch.einsum("nhts,nhcs->nhct", weights, v).reshape(2, 32, 17)
    expected = (torch.einsum("oc,nct->not", pool.c_proj.weight[..., 0], attended) + pool.c_proj.bias[:, None])[:, :, 0]
    torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="built for 16 positions"):
        pool(torch.randn(1, 32, 8, 8))


def test_encoder_unet_parameter_checks():
    unet_params = dict(use_spatial_transformer=True, context_dim=16, legacy=False, num_classes=None)
    assert isinstance(EncoderUNetModel(**TINY, **unet_params), EncoderUNetModel)  # a UNet config's extras: ignored
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['poool'\]"):
        EncoderUNetModel(**TINY, poool="adaptive")
    with pytest.raises(ValueError, match="pool must be one of"):
        EncoderUNetModel(**TINY, pool="max")
    with pytest.raises(ValueError, match="needs num_head_channels"):
        EncoderUNetModel(**{**TINY, "num_head_channels": -1}, pool="attention")


def randomise(model):
    torch.manual_seed(1)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.05)
    return model


@pytest.mark.parametrize("kind", ["unet", "encoder"])
def test_convert_to_fp16_halves_the_torso_only_and_back(kind):
    if kind == "unet":
        model = randomise(UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                                    attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16,
                                    use_spatial_transformer=True, context_dim=16, num_classes=5))
        args = (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16), torch.tensor([1, 2]))
    else:
        model = randomise(EncoderUNetModel(**TINY, pool="attention"))
        args = (torch.randn(2, 4, 16, 16), torch.tensor([3, 700]))
    keys = list(model.state_dict())
    reference = model(*args)
    model.convert_to_fp16()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.startswith(TORSO)} == {torch.float16}
    assert {d for n, d in dtypes.items() if not n.startswith(TORSO)} == {torch.float32}  # embeddings and head
    assert list(model.state_dict()) == keys
    half = model(*args)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=0, atol=2e-2 * reference.abs().max().item())
    assert not torch.equal(half, reference)  # it really ran in float16
    model.convert_to_fp32()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model(*args), reference, rtol=0, atol=2e-2 * reference.abs().max().item())
