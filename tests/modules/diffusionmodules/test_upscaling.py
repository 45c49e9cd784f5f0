"""Low-scale models of the latent upscaler: noise augmentation at given/random levels, the constant-level
concat, and the original buffer names."""
import pytest
import torch

from ldm.modules.diffusionmodules.upscaling import (
    AbstractLowScaleModel,
    ImageConcatWithNoiseAugmentation,
    SimpleImageConcat,
)
from ldm.modules.diffusionmodules.util import make_beta_schedule

SCHEDULE = {"linear_start": 0.0001, "linear_end": 0.02}


def test_noise_augmentation_at_given_levels_is_q_sample():
    model = ImageConcatWithNoiseAugmentation(SCHEDULE, max_noise_level=350)
    x, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    levels = torch.tensor([0, 20, 349])
    z, returned = model(x, noise_level=levels, noise=noise)
    assert torch.equal(returned, levels)
    alpha_bar = torch.cumprod(1 - torch.from_numpy(make_beta_schedule("linear", 1000, 0.0001, 0.02)), 0)
    a = alpha_bar[levels].reshape(-1, 1, 1, 1)
    expected = (a.sqrt() * x.double() + (1 - a).sqrt() * noise.double()).float()
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.q_sample(x, levels, noise), z)
    # level 0 barely changes the image, level 349 mixes in a lot of noise
    assert (z[0] - x[0]).abs().max() < 0.05 and (z[2] - x[2]).abs().mean() > 0.3
    # a scalar level applies to the whole batch
    z_scalar, lv = model(x, noise_level=torch.tensor(20), noise=noise)
    assert torch.equal(lv, torch.full((3,), 20)) and torch.allclose(z_scalar[1], z[1])


def test_noise_augmentation_draws_levels_below_max():
    torch.manual_seed(0)
    model = ImageConcatWithNoiseAugmentation(SCHEDULE, max_noise_level=5)
    x = torch.zeros(200, 1, 2, 2)
    z, levels = model(x)
    assert levels.dtype == torch.long and levels.min() >= 0 and levels.max() == 4
    assert len(levels.unique()) == 5 and z.std() > 0
    with pytest.raises(ValueError, match="max_noise_level=1001"):
        ImageConcatWithNoiseAugmentation(SCHEDULE, max_noise_level=1001)
    with pytest.raises(TypeError, match="noise_level"):
        model(x, noise_level=3)


def test_buffers_keep_the_original_names_and_follow_the_module():
    model = ImageConcatWithNoiseAugmentation(SCHEDULE, max_noise_level=350)
    keys = set(model.state_dict())
    assert {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"} == keys
    assert model.betas.shape == (1000,) and model.betas[0].item() == pytest.approx(1e-4)
    assert model.to(torch.float64).betas.dtype == torch.float64


def test_simple_concat_and_abstract_model_pass_the_image_through():
    x = torch.randn(2, 3, 4, 4)
    z, level = SimpleImageConcat()(x)
    assert z is x and torch.equal(level, torch.zeros(2, dtype=torch.long))
    z, level = AbstractLowScaleModel()(x)
    assert z is x and level is None and AbstractLowScaleModel().decode(x) is x
    with pytest.raises(ValueError, match="noise_schedule_config"):
        AbstractLowScaleModel().q_sample(x, torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- unCLIP's CLIP embedding augmentation

KARLO = {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def test_clip_embedding_augmentation_noises_in_standardised_units(tmp_path):
    from diffusers import DDPMScheduler

    from ldm.modules.diffusionmodules.util import timestep_embedding
    from ldm.modules.encoders.modules import CLIPEmbeddingNoiseAugmentation

    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5
    torch.save((mean, std), tmp_path / "stats.th")
    aug = CLIPEmbeddingNoiseAugmentation(noise_schedule_config=KARLO, clip_stats_path=str(tmp_path / "stats.th"),
                                         timestep_dim=8, max_noise_level=1000)
    assert "data_mean" not in aug.state_dict()  # the statistics are not checkpoint state, as the original
    x, noise = torch.randn(3, 8, generator=gen) * std + mean, torch.randn(3, 8, generator=gen)
    levels = torch.tensor([0, 300, 999])
    z, level_emb = aug(x, noise_level=levels, noise=noise)
    # the Karlo cosine schedule as diffusers computes it; q_sample of the standardised embedding
    a = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod[levels][:, None]
    expected = (a.sqrt() * (x - mean) / std + (1 - a).sqrt() * noise) * std + mean
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(level_emb, timestep_embedding(levels, 8))
    torch.testing.assert_close(aug.unscale(aug.scale(x)), x)
    # level 0 leaves the embedding nearly as it was; the last level is nearly pure (rescaled) noise
    assert (z[0] - x[0]).abs().max() < 0.05 and torch.allclose(z[2], noise[2] * std + mean, atol=0.05)
    drawn, emb = aug(x.repeat(100, 1))
    assert drawn.shape == (300, 8) and emb.shape == (300, 8) and torch.isfinite(drawn).all()


def test_clip_embedding_augmentation_errors(tmp_path):
    from ldm.modules.encoders.modules import CLIPEmbeddingNoiseAugmentation
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match=r"clip_stats_path '.*ViT-L-14_stats.th': no such file"):
        CLIPEmbeddingNoiseAugmentation(noise_schedule_config=KARLO, clip_stats_path=str(tmp_path / "ViT-L-14_stats.th"))
    torch.save({"mean": torch.zeros(4)}, tmp_path / "bad.th")
    with pytest.raises(ConfigError, match=r"expected a \(mean, std\) pair"):
        CLIPEmbeddingNoiseAugmentation(noise_schedule_config=KARLO, clip_stats_path=str(tmp_path / "bad.th"))
    aug = CLIPEmbeddingNoiseAugmentation(noise_schedule_config=KARLO, timestep_dim=16)
    with pytest.raises(ValueError, match=r"expects embeddings \[B, 16\]"):
        aug(torch.randn(2, 8))
