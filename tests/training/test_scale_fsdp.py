"""Sharded training (ldm.training.sharding.FSDPStrategy: FSDP2 fully_shard over gloo on two CPU processes) gives
the weights and EMA of one process with the doubled batch, also across a resume from a sharded checkpoint, and
scripts/consolidate_checkpoint.py turns that checkpoint into one file load_model_from_config loads."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "reliability"))
from run_helpers import run_main, sharded_config  # noqa: E402

from ldm.training.config import is_sharded_checkpoint, remove_stale_temp_files  # noqa: E402
from ldm.training.sharding import FSDPStrategy, swap_in  # noqa: E402
from ldm.util import ConfigError  # noqa: E402

FSDP = {"target": "ldm.training.sharding.FSDPStrategy",
        "params": {"wrap": ["ldm.modules.diffusionmodules.openaimodel.TimestepEmbedSequential"],
                   "shard": ["model.diffusion_model"], "state_dict_type": "sharded"}}


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dir(where):
    (run,) = (where / "logs").iterdir()
    return run


@pytest.mark.slow
def test_two_sharded_processes_match_one_process_with_the_doubled_batch(tmp_path, monkeypatch):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for where, config in ((single, sharded_config(tmp_path / "rec1", 4)),
                          (sharded, sharded_config(tmp_path / "rec2", 2, strategy=FSDP))):
        where.mkdir()
        OmegaConf.save(OmegaConf.create(config), where / "c.yaml")
    one = run_main(single, "-b", "c.yaml", "-t", "--no-test", "--max_steps", "6")
    assert one.returncode == 0, one.output[-3000:]
    flags = ["-t", "--no-test", "--accelerator", "cpu", "--devices", "2"]
    first = run_main(sharded, "-b", "c.yaml", *flags, "--max_steps", "3")
    assert first.returncode == 0, first.output[-3000:]
    assert "FSDP: 10 units over 2 processes" in first.output
    last = run_dir(sharded) / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(str(last)) and len(list(last.glob("*.distcp"))) == 2
    resumed = run_main(sharded, "-r", str(run_dir(sharded).relative_to(sharded)), *flags, "--max_steps", "6")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    out = tmp_path / "full.ckpt"
    assert load_script("consolidate_checkpoint").main([str(run_dir(sharded)), "--out", str(out)]) == 0
    merged = torch.load(out, map_location="cpu", weights_only=True)
    reference = torch.load(run_dir(single) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert merged["global_step"] == reference["global_step"] == 6
    keys = [k for k in reference["state_dict"] if k.startswith(("model.", "model_ema."))]
    assert any(k.startswith("model_ema.") for k in keys) and set(keys) <= set(merged["state_dict"])
    # reductions in another order: nearly every tensor agrees to 1e-6; Adam's normalised update of the few biases
    # whose gradients are near zero (the zero-initialised output convolutions) amplifies that to ~2e-5 of the
    # ~2.4e-3 that 6 steps at lr 4e-4 can move a weight
    close = [torch.allclose(merged["state_dict"][k], reference["state_dict"][k], rtol=1e-4, atol=1e-6) for k in keys]
    assert sum(close) >= 0.95 * len(keys), [k for k, ok in zip(keys, close) if not ok]
    for key in keys:
        torch.testing.assert_close(merged["state_dict"][key], reference["state_dict"][key], rtol=1e-3, atol=1e-4,
                                   msg=key)
    ema = "model_ema.diffusion_modelinput_blocks00weight"
    raw = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(merged["state_dict"][ema], merged["state_dict"][raw])
    # the consolidated files load as any checkpoint does
    monkeypatch.syspath_prepend(str(REPO / "tests" / "reliability"))
    from ldm.util import load_model_from_config

    model = load_model_from_config(OmegaConf.load(single / "c.yaml"), str(out))
    assert torch.equal(model.state_dict()[ema], merged["state_dict"][ema])
    weights = tmp_path / "ema.safetensors"
    assert load_script("consolidate_checkpoint").main([str(run_dir(sharded)), "--out", str(weights), "--ema"]) == 0
    model = load_model_from_config(OmegaConf.load(single / "c.yaml"), str(weights))
    assert torch.equal(model.state_dict()[raw], merged["state_dict"][ema])


def test_strategy_config_mistakes_are_one_line():
    with pytest.raises(ConfigError, match="state_dict_type: expected sharded or full"):
        FSDPStrategy(state_dict_type="both")
    with pytest.raises(ConfigError, match="param_dtype: expected bf16, fp16, fp32 or null"):
        FSDPStrategy(param_dtype="int8")
    with pytest.raises(ConfigError, match="is not a torch.nn.Module class"):
        FSDPStrategy(wrap=["ldm.util.instantiate_from_config"])


def test_a_sharded_checkpoint_swap_never_loses_the_last_one(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "last.ckpt").mkdir(parents=True)
    (ckpts / "last.ckpt" / "meta.pt").write_bytes(b"old")
    new = ckpts / ".last.ckpt.1.abc.tmp"
    new.mkdir()
    (new / "meta.pt").write_bytes(b"new")
    swap_in(new, ckpts / "last.ckpt")
    assert (ckpts / "last.ckpt" / "meta.pt").read_bytes() == b"new" and sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt"]
    # a kill between the two renames: only the set-aside previous folder and the new temporary one exist
    (ckpts / "last.ckpt").rename(ckpts / ".last.ckpt.0a1b2c3d.prev")
    (ckpts / ".last.ckpt.7.def.tmp").mkdir()
    remove_stale_temp_files(str(ckpts))
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert is_sharded_checkpoint(str(ckpts / "last.ckpt"))


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint(tmp_path, capsys):
    assert load_script("consolidate_checkpoint").main([str(tmp_path)]) == 2
    assert "is not a sharded checkpoint" in capsys.readouterr().err


SD_TRAIN = REPO / "configs" / "stable-diffusion" / "train" / "v1-train-fsdp.yaml"


def test_the_sd_v1_fsdp_config_builds_its_strategy_and_plans_26_units_on_the_meta_device():
    from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(SD_TRAIN)
    strategy = instantiate_from_config(config.lightning.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy._save_distributed_checkpoint
    assert strategy.wrap == (TimestepEmbedSequential,) and strategy.param_dtype == torch.bfloat16
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 866e6  # SD v1's 859.5M-parameter UNet
    assert sum(isinstance(m, TimestepEmbedSequential) for m in unet.modules()) + 1 == 26


def tiny_clip(folder):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.frozen import write_clip_tokenizer

    write_clip_tokenizer(folder)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=49408, max_position_embeddings=77, projection_dim=32, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=1)).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_sd_v1_fsdp_config_shrunk_trains_on_two_cpu_processes_from_shards(tmp_path):
    from run_helpers import write_fixture_shards

    write_fixture_shards(tmp_path / "shards", shards=8, per_shard=4, size=16)
    clip = tiny_clip(tmp_path / "clip")
    unet = "model.params.unet_config.params"
    ae = "model.params.first_stage_config.params.ddconfig"
    overrides = [f"{unet}.model_channels=32", f"{unet}.channel_mult=[1,2]", f"{unet}.attention_resolutions=[2]",
                 f"{unet}.num_res_blocks=1", f"{unet}.num_heads=2", f"{unet}.context_dim=32",
                 "model.params.image_size=4",
                 f"{ae}.ch=32", f"{ae}.ch_mult=[1,1,1]", f"{ae}.num_res_blocks=1",
                 f"model.params.cond_stage_config.params.version={clip}",
                 f"data.params.tar_base={tmp_path / 'shards'}", "data.params.train.shards='{00000..00007}.tar'",
                 "data.params.min_size=16", "data.params.batch_size=2", "data.params.num_workers=0",
                 "data.params.train.image_transforms=[{target: torchvision.transforms.Resize, params: {size: 16}}, "
                 "{target: torchvision.transforms.RandomCrop, params: {size: 16}}]",
                 "lightning.callbacks.image_logger=null",
                 "lightning.modelcheckpoint.params.every_n_train_steps=2", "lightning.trainer.accelerator=cpu",
                 "lightning.trainer.benchmark=false"]
    proc = run_main(tmp_path, "-b", str(SD_TRAIN), "-t", "--no-test", "--devices", "2", "--max_steps", "2",
                    *overrides)
    assert proc.returncode == 0, proc.output[-4000:]
    assert "FSDP: 10 units over 2 processes" in proc.output  # 4 input, 1 middle, 4 output blocks, the UNet
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(str(last))
    out = tmp_path / "sd.safetensors"
    assert load_script("consolidate_checkpoint").main([str(last), "--out", str(out), "--ema", "--dtype", "fp16"]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(out))
    assert weights["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_gpu_smoke_dry_run_plans_the_sd_v1_fsdp_run_on_cpu(capsys):
    assert load_script("gpu_smoke_fsdp").main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "FSDPStrategy: 26 FSDP units, 859.5M trained and 83.7M frozen first-stage parameters" in printed


def test_gpu_smoke_batches_train_the_smoke_model_without_encoders():
    smoke = load_script("gpu_smoke_fsdp")
    config = smoke.smoke_config(str(SD_TRAIN))
    unet = config.model.params.unet_config.params
    unet.update(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2], num_res_blocks=1, num_heads=2,
                context_dim=32)
    config.model.params.first_stage_config.params.ddconfig.update(ch=32, ch_mult=[1, 1], num_res_blocks=1)
    from ldm.util import instantiate_from_config

    model = instantiate_from_config(config.model)
    batch = next(iter(smoke.SyntheticLatents(2, latent=(8, 8, 4), context=(77, 32))))
    loss, _ = model.shared_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.model.diffusion_model.out[2].weight.grad is not None
