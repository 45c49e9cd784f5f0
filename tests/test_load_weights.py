"""load_model_from_config takes a mapped checkpoint's tensors over (no second copy of the model in memory) and loads
exactly what copying did: the checkpoint's values, the model's dtypes, tied weights kept tied."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ldm.util import _load_weights, load_model_from_config, read_checkpoint

AUTOENCODER = {"target": "ldm.models.autoencoder.AutoencoderKL",
               "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                          "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                       "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                       "attn_resolutions": [], "dropout": 0.0}}}


def mapped_file(address: int) -> str | None:
    """The file mapped at a memory address of this process (from /proc/self/maps), None for anonymous memory."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(v, 16) for v in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else None
    return None


def test_a_mapped_checkpoint_is_loaded_without_copying_and_gives_its_values(tmp_path):
    config = OmegaConf.create({"model": AUTOENCODER})
    torch.manual_seed(0)
    source = load_model_from_config.__globals__["instantiate_from_config"](config.model)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": source.state_dict(), "global_step": 3}, path)
    model = load_model_from_config(config, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # the weights live in the file's pages: a mapping of the checkpoint, not a fresh allocation
    weight = model.encoder.conv_in.weight
    assert mapped_file(weight.data_ptr()) == str(path)
    state = read_checkpoint(str(path), mmap=True)[0]
    _load_weights(model, model.state_dict(), state)
    assert weight is not model.encoder.conv_in.weight
    assert model.encoder.conv_in.weight.data_ptr() == state["encoder.conv_in.weight"].data_ptr()  # taken, not copied
    weight = model.encoder.conv_in.weight
    with torch.no_grad():  # writes stay private to the process: the file keeps its values
        weight.add_(1.0)
    assert torch.equal(read_checkpoint(str(path))[0]["encoder.conv_in.weight"], source.encoder.conv_in.weight)


def test_other_dtypes_are_converted_and_the_model_keeps_its_own():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    state = {k: v.detach().clone().half() + 1 for k, v in model.state_dict().items()}
    missing, unexpected = _load_weights(model, model.state_dict(), state)
    assert not missing and not unexpected
    assert model[0].weight.dtype == torch.float32 and model[0].weight.requires_grad
    assert torch.equal(model[0].weight, state["0.weight"].float())


def test_tied_weights_stay_tied():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3, bias=False), "b": torch.nn.Linear(3, 3, bias=False)})
    model["b"].weight = model["a"].weight
    state = {"a.weight": torch.ones(3, 3), "b.weight": torch.ones(3, 3)}
    _load_weights(model, model.state_dict(), state)
    assert model["a"].weight is model["b"].weight
    assert torch.equal(model["a"].weight, torch.ones(3, 3))
