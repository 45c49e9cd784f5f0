"""DummyLoss: the inference-only first-stage loss that models/ldm/inpainting_big names."""
import pytest
import torch

from ldm.modules.losses.contperceptual import DummyLoss
from ldm.util import instantiate_from_config


def test_dummy_loss_has_no_state_and_refuses_to_compute():
    loss = instantiate_from_config({"target": "ldm.modules.losses.contperceptual.DummyLoss"})
    assert isinstance(loss, DummyLoss) and isinstance(loss, torch.nn.Module)
    assert loss.state_dict() == {} and not list(loss.parameters())
    with pytest.raises(RuntimeError, match="placeholder for inference-only autoencoders"):
        loss(torch.zeros(1), torch.zeros(1))


def test_a_vq_first_stage_with_dummy_loss_holds_only_autoencoder_keys():
    ddconfig = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = instantiate_from_config({
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": ddconfig,
                   "lossconfig": {"target": "ldm.modules.losses.contperceptual.DummyLoss"}},
    })
    assert not [k for k in model.state_dict() if k.startswith("loss.")]
    assert model.decode(model.encode(torch.zeros(1, 3, 16, 16))).shape == (1, 3, 16, 16)
