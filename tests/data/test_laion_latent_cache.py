"""The latent cache: scripts/cache_latents.py encodes tiny shards once; LatentCacheDataModule trains from the moments
with the same loss as training from the images under the same posterior noise, resumes exactly, drops captions to the
cached null context, and refuses a model whose autoencoder or text encoder is not the one the cache recorded."""
import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

HELPERS = Path(__file__).resolve().parents[1] / "reliability"
sys.path.insert(0, str(HELPERS))
from run_helpers import read_records, run_main, write_fixture_shards  # noqa: E402

from ldm.data.laion import WebDataModuleFromConfig  # noqa: E402
from ldm.data.latent_cache import LatentCacheDataModule, check_model_matches, read_cache_info  # noqa: E402
from ldm.data.shards import sample_seed  # noqa: E402
from ldm.modules.cached import CachedConditioning, FirstStageLatent  # noqa: E402
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution  # noqa: E402
from ldm.util import ConfigError, instantiate_from_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
AUTOENCODER = {"target": "ldm.models.autoencoder.AutoencoderKL",
               "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                          "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                       "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1,
                                       "attn_resolutions": [], "dropout": 0.0}}}
TEXT = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
        "params": {"n_embed": 32, "n_layer": 1, "vocab_size": 128, "max_seq_len": 12,
                   "tokenizer_path": str(REPO / "configs" / "latent-diffusion" / "shapes-tokenizer")}}


def ldm_config(shards, ae_ckpt, text_ckpt=None):
    """A tiny text-conditioned LatentDiffusion (16x16 -> 4x4x4, a frozen 1-layer text transformer) on the shards."""
    first = copy.deepcopy(AUTOENCODER)
    first["params"]["ckpt_path"] = str(ae_ckpt)
    cond = copy.deepcopy(TEXT)
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                       "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                       "num_head_channels": 16, "use_spatial_transformer": True, "transformer_depth": 1,
                       "context_dim": 32, "legacy": False}}
    params = {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "first_stage_key": "jpg",
              "cond_stage_key": "txt", "cond_stage_trainable": False, "conditioning_key": "crossattn",
              "image_size": 4, "channels": 4, "scale_factor": 0.7, "first_stage_config": first,
              "cond_stage_config": cond, "unet_config": unet}
    if text_ckpt is not None:
        params["ckpt_path"] = str(text_ckpt)
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params},
            "data": {"target": "ldm.data.laion.WebDataModuleFromConfig",
                     "params": {"tar_base": str(shards), "batch_size": 4, "num_workers": 0,
                                "train": {"shards": "{00000..00003}.tar", "size": 16}}}}


def save_autoencoder(path, seed):
    torch.manual_seed(seed)
    torch.save({"state_dict": instantiate_from_config(AUTOENCODER).state_dict()}, path)
    return path


def load_script():
    spec = importlib.util.spec_from_file_location("cache_latents", REPO / "scripts" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    shards = root / "shards"
    write_fixture_shards(shards, shards=4, per_shard=4, size=16)
    ae = save_autoencoder(root / "ae.ckpt", seed=0)
    config = root / "ldm.yaml"
    OmegaConf.save(OmegaConf.create(ldm_config(shards, ae)), config)
    torch.manual_seed(1)
    model = instantiate_from_config(OmegaConf.load(config).model).eval()
    whole = root / "ldm.ckpt"  # the whole model (its text encoder too) as the cache script and training load it
    torch.save({"state_dict": model.state_dict()}, whole)
    out = root / "latents"
    assert load_script().main(["-b", str(config), "--ckpt", str(whole), "--out", str(out), "--dtype", "fp32",
                               "--text", "--samples-per-shard", "8", "--batch-size", "3"]) == 0
    return {"root": root, "shards": shards, "config": config, "model": model, "out": out, "ckpt": whole}


def cache_module(out, **params):
    train = {"cache": str(out), "shuffle": params.pop("shuffle", 0)}
    return LatentCacheDataModule(batch_size=4, num_workers=0, train=train, **params)


def test_cache_json_records_the_encoders_and_the_data(setup, capsys):
    info = read_cache_info(str(setup["out"]))
    assert info["num_samples"] == 16 and info["shards"] == ["00000.tar", "00001.tar"]
    assert info["first_stage"]["key"] == "jpg" and info["cond_stage"]["key"] == "txt"
    assert info["scale_factor"] == pytest.approx(0.7) and info["dtype"] == "fp32"
    assert info["data"]["config"]["params"]["train"]["size"] == 16
    check_model_matches(setup["model"], info, str(setup["out"]))  # the model it was made with passes


def test_training_from_the_cache_gives_the_loss_of_training_from_images(setup, monkeypatch):
    model = setup["model"]
    images = WebDataModuleFromConfig(tar_base=str(setup["shards"]), batch_size=4, num_workers=0,
                                     train={"shards": "{00000..00003}.tar", "size": 16}).make_loader("train")
    image_batch = next(iter(images))
    cached = next(iter(cache_module(setup["out"]).make_loader("train")))
    assert cached["__key__"] == image_batch["__key__"]
    assert isinstance(cached["jpg"], FirstStageLatent) and isinstance(cached["txt"], CachedConditioning)
    # the posterior noise the cache drew for each sample (seeded by seed, epoch, shard, key)
    eps = []
    for url, key in zip(cached["__url__"], cached["__key__"]):
        seed = int(np.random.SeedSequence(sample_seed(0, 0, url, key)).generate_state(1)[0])
        eps.append(torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(seed))[0])
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * torch.stack(eps))
    torch.manual_seed(5)
    loss_images, _ = model.shared_step(dict(image_batch))
    torch.manual_seed(5)
    loss_cache, _ = model.shared_step(dict(cached))
    assert loss_cache.item() == pytest.approx(loss_images.item(), rel=1e-5)
    with torch.no_grad():
        context = model.get_learned_conditioning(image_batch["txt"])
    torch.testing.assert_close(model.get_learned_conditioning(cached["txt"]), context)
    assert type(model.get_learned_conditioning(cached["txt"])) is torch.Tensor


def test_a_fresh_posterior_sample_each_epoch_and_exact_resume(setup):
    loader = cache_module(setup["out"], shuffle=3).make_loader("train")
    it = iter(loader)
    first = [next(it) for _ in range(4)]  # one data epoch of 16
    second = [next(it) for _ in range(4)]
    z = {(k, e): v for b in first + second for k, e, v in zip(b["__key__"], b["__epoch__"].tolist(), b["jpg"])}
    assert any(not torch.equal(z[(k, 0)], z[(k, 1)]) for k, _ in list(z) if (k, 1) in z)
    state = loader.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = cache_module(setup["out"], shuffle=3).make_loader("train")
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(3), resumed)]
    assert all(torch.equal(a["jpg"], b["jpg"]) and a["__key__"] == b["__key__"] for a, b in zip(got, expected))


def test_p_uncond_serves_the_cached_null_context(setup):
    batch = next(iter(cache_module(setup["out"], p_uncond=1.0).make_loader("train")))
    with torch.no_grad():
        null = setup["model"].get_learned_conditioning([""])[0]
    for context in batch["txt"]:
        torch.testing.assert_close(context.as_subclass(torch.Tensor), null)


def test_another_autoencoder_or_text_encoder_is_a_one_line_error(setup, tmp_path):
    info = read_cache_info(str(setup["out"]))
    other = instantiate_from_config(OmegaConf.load(setup["config"]).model)
    other.cond_stage_model.load_state_dict(setup["model"].cond_stage_model.state_dict())
    torch.manual_seed(9)
    other.first_stage_model = instantiate_from_config(AUTOENCODER)
    with pytest.raises(ConfigError, match="was encoded by another autoencoder") as err:
        check_model_matches(other, info, str(setup["out"]))
    assert "\n" not in str(err.value)
    other.first_stage_model = setup["model"].first_stage_model
    other.cond_stage_model = instantiate_from_config(TEXT)
    with pytest.raises(ConfigError, match="another text encoder"):
        check_model_matches(other, info, str(setup["out"]))
    other.cond_stage_model, other.ucg_training = setup["model"].cond_stage_model, {"txt": {"p": 0.1}}
    with pytest.raises(ConfigError, match="data.params.p_uncond instead"):
        check_model_matches(other, info, str(setup["out"]))


def test_cache_latents_user_mistakes(setup, tmp_path, capsys):
    script = load_script()
    assert script.main(["--out", str(tmp_path / "x")]) == 2
    assert "no config" in capsys.readouterr().err
    assert script.main(["-b", str(setup["config"]), "--out", str(tmp_path / "x"), "--text",
                        "model.params.cond_stage_trainable=true"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --text: the model's cond stage is trained")
    with pytest.raises(ConfigError, match="is not a latent cache"):
        cache_module(tmp_path)


@pytest.mark.slow
def test_main_trains_from_the_cache_and_rejects_another_autoencoder(setup, tmp_path):
    config = OmegaConf.load(setup["config"])
    config.model.params.ckpt_path = str(setup["ckpt"])
    config.data = {"target": "ldm.data.latent_cache.LatentCacheDataModule",
                   "params": {"batch_size": 4, "num_workers": 0, "p_uncond": 0.2,
                              "train": {"cache": str(setup["out"]), "shuffle": 4}}}
    config.lightning = {"callbacks": {"image_logger": {"params": {"batch_frequency": 3, "max_images": 2,
                                                                 "increase_log_steps": False,
                                                                 "log_images_kwargs": {"ddim_steps": 2,
                                                                                       "plot_progressive_rows": False,
                                                                                       "plot_diffusion_rows": False,
                                                                                       "inpaint": False}}},
                                      "recorder": {"target": "run_helpers.BatchRecorder",
                                                   "params": {"out_dir": str(tmp_path / "rec")}}},
                        "trainer": {"enable_model_summary": False, "num_sanity_val_steps": 0,
                                    "enable_progress_bar": False}}
    OmegaConf.save(config, tmp_path / "c.yaml")
    proc = run_main(tmp_path, "-b", "c.yaml", "-t", "--no-test", "--max_steps", "6")
    assert proc.returncode == 0, proc.output[-3000:]
    assert len(read_records(tmp_path / "rec" / "rank0.jsonl")) == 6
    (run,) = (tmp_path / "logs").iterdir()
    assert list((run / "images" / "train").glob("inputs_gs-000003*.png"))  # decoded from the cached latent
    other = save_autoencoder(tmp_path / "other-ae.ckpt", seed=3)
    proc = run_main(tmp_path, "-b", "c.yaml", "-t", "--no-test", "--max_steps", "6",
                    f"model.params.first_stage_config.params.ckpt_path={other}", "model.params.ckpt_path=null")
    assert proc.returncode == 2, proc.output[-3000:]
    errors = [line for line in proc.output.splitlines() if line.startswith("main.py: error:")]
    assert len(errors) == 1 and "was encoded by another autoencoder" in errors[0]
