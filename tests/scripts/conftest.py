"""Tiny latent diffusion checkpoints for the script tests, built once per session and laid out as main.py lays out
a run: `<logs>/<now>_<name>/configs/<now>-project.yaml` and `checkpoints/last.ckpt` (Lightning's dict)."""
import copy
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.data.shapes import ShapesTrain
from ldm.util import instantiate_from_config

sys.path.insert(0, str(Path(__file__).parent))  # task_runs, the task tests' helpers

REPO = Path(__file__).resolve().parents[2]
NOW = "2024-01-01T00-00-00"
TRAIN_STEPS = 3

AUTOENCODER = {  # 16x16x3 -> 4x4x4 (f4)
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
                            "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                            "dropout": 0.0}},
}


BERT = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
        "params": {"n_embed": 32, "n_layer": 1, "vocab_size": 128, "max_seq_len": 12,
                   "tokenizer_path": "configs/latent-diffusion/shapes-tokenizer"}}


def unet(in_channels=4, context_dim=None):
    params = {"image_size": 4, "in_channels": in_channels, "out_channels": 4, "model_channels": 32,
              "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2}
    if context_dim:
        params.update(attention_resolutions=[2], num_head_channels=16, use_spatial_transformer=True,
                      transformer_depth=1, context_dim=context_dim, legacy=False)
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}


def model_config(kind):
    """A tiny LatentDiffusion: `text` (captions, cross-attention), `class` (3 labels), `cin` (3 labels + the null
    class), `uncond`, `concat` (an
    SR model conditioned on a 4x4 low-resolution image, concatenated to the latent), `inpaint`
    (LatentInpaintDiffusion), `upscale` (LatentUpscaleDiffusion) or `ldm-inpaint`."""
    params = {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "first_stage_key": "image",
              "image_size": 4, "channels": 4, "scale_factor": 0.5, "monitor": "val/loss_simple_ema",
              "first_stage_config": copy.deepcopy(AUTOENCODER)}
    if kind == "text":
        params.update(cond_stage_key="caption", cond_stage_trainable=True, conditioning_key="crossattn",
                      parameterization="v", unet_config=unet(context_dim=32),
                      cond_stage_config=BERT)
    elif kind == "class":
        params.update(cond_stage_key="class_label", cond_stage_trainable=True, conditioning_key="crossattn",
                      unet_config=unet(context_dim=32),
                      cond_stage_config={"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                         "params": {"embed_dim": 32, "n_classes": 3, "key": "class_label"}})
    elif kind == "cin":  # cin256-v2 in small: 3 classes and the null class 3, dropped to in training
        params.update(cond_stage_key="class_label", cond_stage_trainable=True, conditioning_key="crossattn",
                      unet_config=unet(context_dim=32),
                      cond_stage_config={"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                         "params": {"embed_dim": 32, "n_classes": 4, "key": "class_label",
                                                    "ucg_rate": 0.1}})
    elif kind == "uncond":  # 100 timesteps: ancestral sampling runs through all of them
        params.update(cond_stage_config="__is_unconditional__", unet_config=unet(), timesteps=100)
    elif kind == "concat":
        params.update(cond_stage_key="LR_image", conditioning_key="concat", unet_config=unet(in_channels=7),
                      cond_stage_config={"target": "torch.nn.Identity"})
    elif kind == "inpaint":  # SD 2 inpainting: mask + masked-image latent concatenated, captions cross-attended
        params.update(cond_stage_key="caption", cond_stage_trainable=False, conditioning_key="hybrid",
                      unet_config=unet(in_channels=9, context_dim=32), cond_stage_config=BERT)
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion", "params": params}}
    elif kind == "upscale":  # SD x4 upscaler: noise-augmented low-res image concatenated, its level as class label
        params.update(cond_stage_key="caption", cond_stage_trainable=False, conditioning_key="hybrid-adm",
                      parameterization="v", low_scale_key="lr", cond_stage_config=BERT,
                      unet_config=unet(in_channels=7, context_dim=32),
                      low_scale_config={"target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                                        "params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                                                   "max_noise_level": 350}})
        params["unet_config"]["params"]["num_classes"] = 1000
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", "params": params}}
    elif kind == "conditioner":  # captions through a GeneralConditioner, dropped to zeros for guidance
        embedder = {**BERT, "input_key": "caption", "ucg_rate": 0.1, "is_trainable": True}
        params.update(conditioning_key="crossattn", unet_config=unet(context_dim=32),
                      cond_stage_config={"target": "ldm.modules.encoders.conditioner.GeneralConditioner",
                                         "params": {"emb_models": [embedder]}})
    elif kind == "ldm-inpaint":  # latent-diffusion's inpainting model: masked image through the first stage + mask
        params.update(cond_stage_key="masked_image", conditioning_key="concat", unet_config=unet(in_channels=9),
                      cond_stage_config="__is_first_stage__")
    else:
        raise ValueError(kind)
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def train_text_model(model):
    """A few AdamW steps on shapes captions with EMA updates, so the EMA and the raw weights differ."""
    loader = DataLoader(ShapesTrain(size=16, length=4 * TRAIN_STEPS), batch_size=4)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    batches = iter(loader)
    for _ in range(TRAIN_STEPS):
        loss, _ = model.shared_step(next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.model_ema(model.model)
    return optimizer


@dataclass
class TinyRun:
    """A main.py-like run directory of a tiny model."""

    kind: str
    logdir: Path
    config: Path
    ckpt: Path
    state_dict: dict


def make_run(root, kind, name=None):
    torch.manual_seed(0)
    config = OmegaConf.create(model_config(kind))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the tokenizer path is relative to the repository root, as main.py runs there
        model = instantiate_from_config(config.model)
    optimizer = train_text_model(model) if kind in ("text", "conditioner") else None
    logdir = Path(root) / f"{NOW}_{name or kind}"
    (logdir / "configs").mkdir(parents=True)
    (logdir / "checkpoints").mkdir()
    project = logdir / "configs" / f"{NOW}-project.yaml"
    OmegaConf.save(config, project)
    OmegaConf.save(OmegaConf.create({"lightning": {"trainer": {"max_steps": TRAIN_STEPS}}}),
                   logdir / "configs" / f"{NOW}-lightning.yaml")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    ckpt = logdir / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 0, "global_step": TRAIN_STEPS if optimizer else 0, "pytorch-lightning_version": "2.6.0",
                "state_dict": state, "optimizer_states": [optimizer.state_dict()] if optimizer else [],
                "lr_schedulers": []}, ckpt)
    return TinyRun(kind, logdir, project, ckpt, state)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Lazily built tiny runs by kind (text, class, uncond, concat), one build per kind and session."""
    root = tmp_path_factory.mktemp("tiny_runs")
    runs = {}

    def get(kind):
        if kind not in runs:
            runs[kind] = make_run(root, kind)
        return runs[kind]

    return get


@pytest.fixture(scope="session")
def text_run(tiny_runs):
    return tiny_runs("text")


def load_script(name):
    """scripts/<name>.py as a module (scripts are not a package)."""
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ldm_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def scripts():
    """Loaded script modules by name."""
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_script(name)
        return loaded[name]

    return get
