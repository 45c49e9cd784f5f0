"""ldm.util.load_model_from_config: checkpoint formats, EMA weights, key reports and refused pickles."""
import logging
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.util import CheckpointError, ConfigError, ema_state_dict, load_model_from_config

UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                   "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1], "num_heads": 1}}


def ddpm_config(**params):
    return {"model": {"target": "ldm.models.diffusion.ddpm.DDPM",
                      "params": {"timesteps": 10, "image_size": 8, "channels": 3, "unet_config": UNET, **params}}}


@pytest.fixture(scope="module")
def trained():
    """A tiny DDPM whose EMA differs from its weights, and its state dict."""
    torch.manual_seed(0)
    from ldm.util import instantiate_from_config

    model = instantiate_from_config(OmegaConf.create(ddpm_config()).model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn_like(p))
    model.model_ema(model.model)  # one EMA step: the averages lie between the old and the new weights
    return {k: v.clone() for k, v in model.state_dict().items()}


def params_of(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("model.")}


def test_lightning_bare_and_safetensors_checkpoints_load_alike(trained, tmp_path, caplog):
    torch.save({"state_dict": trained, "global_step": 1234, "epoch": 2, "optimizer_states": []}, tmp_path / "a.ckpt")
    torch.save(trained, tmp_path / "b.pt")
    save_file(trained, str(tmp_path / "c.safetensors"), metadata={"global_step": "77"})
    config = OmegaConf.create(ddpm_config())
    with caplog.at_level(logging.INFO, logger="ldm.util"):
        models = [load_model_from_config(config, str(tmp_path / n)) for n in ("a.ckpt", "b.pt", "c.safetensors")]
    assert "Global Step: 1234" in caplog.text and "Global Step: 77" in caplog.text
    for model in models:
        assert not model.training and model.device.type == "cpu"
        for key, value in trained.items():
            assert torch.equal(model.state_dict()[key], value), key
    assert "missing" not in caplog.text and "unexpected" not in caplog.text


def test_config_as_path_dict_or_model_section(trained, tmp_path):
    torch.save(trained, tmp_path / "m.pt")
    OmegaConf.save(OmegaConf.create(ddpm_config()), tmp_path / "c.yaml")
    for config in (str(tmp_path / "c.yaml"), ddpm_config(), ddpm_config()["model"]):
        model = load_model_from_config(config, str(tmp_path / "m.pt"), device=None)
        assert torch.equal(model.model.diffusion_model.out[2].weight, trained["model.diffusion_model.out.2.weight"])
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_model_from_config(str(tmp_path / "nope.yaml"), str(tmp_path / "m.pt"))
    with pytest.raises(ConfigError, match="no 'model' section"):
        load_model_from_config({"data": {}}, str(tmp_path / "m.pt"))


def test_use_ema_loads_the_averaged_weights(trained, tmp_path, caplog):
    torch.save({"state_dict": trained}, tmp_path / "m.ckpt")
    raw = load_model_from_config(ddpm_config(), str(tmp_path / "m.ckpt"))
    ema = load_model_from_config(ddpm_config(), str(tmp_path / "m.ckpt"), use_ema=True)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    shadow = trained["model_ema.diffusion_modelinput_blocks00weight"]
    assert not torch.equal(trained[key], shadow)
    assert torch.equal(raw.state_dict()[key], trained[key])
    assert torch.equal(ema.state_dict()[key], shadow)
    # a config without EMA (as the SD inference configs) takes the EMA weights too
    with caplog.at_level(logging.WARNING, logger="ldm.util"):
        no_ema = load_model_from_config(ddpm_config(use_ema=False), str(tmp_path / "m.ckpt"), use_ema=True,
                                        verbose=True)
    assert torch.equal(no_ema.state_dict()[key], shadow)
    assert "unexpected keys" in caplog.text and "model_ema.diffusion_modelinput_blocks00weight" in caplog.text


def test_use_ema_without_ema_weights_is_one_clear_error(trained, tmp_path):
    bare = {k: v for k, v in trained.items() if not k.startswith("model_ema.")}
    torch.save(bare, tmp_path / "pruned.pt")
    with pytest.raises(CheckpointError, match=r"pruned.pt' holds no EMA weights .* without use_ema"):
        load_model_from_config(ddpm_config(), str(tmp_path / "pruned.pt"), use_ema=True)
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        ema_state_dict(bare, "x")
    # loaded without use_ema, a model that keeps an EMA starts it from the loaded weights, not from its random init
    model = load_model_from_config(ddpm_config(), str(tmp_path / "pruned.pt"))
    with model.ema_scope():
        assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight,
                           bare["model.diffusion_model.input_blocks.0.0.weight"])


def test_missing_unexpected_and_mismatched_keys_are_reported(trained, tmp_path, caplog):
    partial = dict(trained)
    del partial["model.diffusion_model.out.2.bias"]
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with caplog.at_level(logging.WARNING, logger="ldm.util"):
        load_model_from_config(ddpm_config(), str(tmp_path / "partial.pt"))
    assert "1 missing keys" in caplog.text and "model.diffusion_model.out.2.bias" in caplog.text
    assert "1 unexpected keys" in caplog.text and "extra.weight" in caplog.text
    wrong = dict(trained)
    wrong["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong.pt' does not fit DDPM: size mismatch for model.diffusion_model"):
        load_model_from_config(ddpm_config(), str(tmp_path / "wrong.pt"))
    torch.save({"unet.conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt' has none of the keys of DDPM .* 'unet.conv.weight'"):
        load_model_from_config(ddpm_config(), str(tmp_path / "other.pt"))


def test_weights_are_drawn_only_where_the_checkpoint_lacks_some(trained, tmp_path, caplog):
    """Loading builds the model without drawing initial weights; a checkpoint that lacks one of them makes it build
    again with initial weights, so the missing tensor holds an initialisation, not uninitialised memory."""
    torch.save(trained, tmp_path / "full.pt")
    with caplog.at_level(logging.INFO, logger="ldm.util"):
        load_model_from_config(ddpm_config(), str(tmp_path / "full.pt"))
    assert "building it with initial weights" not in caplog.text
    key = "model.diffusion_model.input_blocks.0.0.weight"  # a 3x3 conv: kaiming-uniform within 1/sqrt(fan_in)
    partial = {k: v for k, v in trained.items() if k != key}
    torch.save(partial, tmp_path / "partial.pt")
    with caplog.at_level(logging.INFO, logger="ldm.util"):
        model = load_model_from_config(ddpm_config(), str(tmp_path / "partial.pt"))
    assert f"lacks 1 of the model's tensors (e.g. '{key}'): building it with initial weights" in caplog.text
    weight = model.state_dict()[key]
    bound = (weight[0].numel()) ** -0.5
    assert weight.abs().max() <= bound and abs(weight.std().item() / (bound / 3**0.5) - 1) < 0.15
    for k, v in partial.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_skipped_initialisation_leaves_tensors_unset_and_restores_torch_nn_init():
    from ldm.util import skipped_initialisation, uninitialised_tensors

    uniform = torch.nn.init.uniform_
    with skipped_initialisation() as skipped:
        layer = torch.nn.Linear(64, 64)
        torch.nn.init.normal_(layer.weight)
    assert torch.nn.init.uniform_ is uniform
    assert {layer.weight.data_ptr(), layer.bias.data_ptr()} <= skipped
    assert uninitialised_tensors(layer, skipped, ["bias"]) == ["weight"]
    layer.weight = torch.nn.Parameter(torch.zeros(64, 64))
    assert uninitialised_tensors(layer, skipped, []) == ["bias"]
    assert torch.nn.Linear(4, 4).weight.abs().sum() > 0  # drawn again outside the block


def test_ckpt_path_in_the_config_is_not_read(trained, tmp_path):
    torch.save(trained, tmp_path / "m.pt")
    config = ddpm_config(ckpt_path=str(tmp_path / "gone.ckpt"))  # a run's config may name a file that is gone
    model = load_model_from_config(config, str(tmp_path / "m.pt"))
    assert torch.equal(model.state_dict()["model.diffusion_model.out.2.weight"],
                       trained["model.diffusion_model.out.2.weight"])
    assert config["model"]["params"]["ckpt_path"] == str(tmp_path / "gone.ckpt")  # the caller's config untouched


class Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(trained, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": trained, "hook": Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil.ckpt' contains pickled objects .* weights_only=False"):
        load_model_from_config(ddpm_config(), str(tmp_path / "evil.ckpt"))
    assert not marker.exists()
    # the file is really malicious: opting out (for trusted files only) runs its code
    load_model_from_config(ddpm_config(), str(tmp_path / "evil.ckpt"), weights_only=False)
    assert marker.is_dir()


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint '.*absent.ckpt' does not exist"):
        load_model_from_config(ddpm_config(), str(tmp_path / "absent.ckpt"))


def test_use_ema_of_an_autoencoder_whose_ema_covers_the_whole_module(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(double_z=True, z_channels=2, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    ae_config = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 2, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}, "ema_decay": 0.9}}}
    torch.manual_seed(0)
    ae = AutoencoderKL(embed_dim=2, ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, ema_decay=0.9)
    with torch.no_grad():  # the averages differ from the weights, as after training
        for shadow in ae.model_ema.buffers():
            if shadow.is_floating_point() and shadow.dim() > 0:
                shadow.add_(1.0)
    torch.save({"state_dict": ae.state_dict()}, tmp_path / "ae.ckpt")
    ema = load_model_from_config(ae_config, str(tmp_path / "ae.ckpt"), use_ema=True)
    raw = load_model_from_config(ae_config, str(tmp_path / "ae.ckpt"))
    assert torch.equal(ema.encoder.conv_in.weight, ae.encoder.conv_in.weight + 1.0)
    assert torch.equal(ema.post_quant_conv.bias, ae.post_quant_conv.bias + 1.0)
    assert torch.equal(raw.encoder.conv_in.weight, ae.encoder.conv_in.weight)
