"""AutoencoderKL / VQModel: state_dict layout, checkpoint round trips, API, optimisers, and short Lightning
training runs in which the reconstruction loss falls and the discriminator switches on at disc_start."""
from __future__ import annotations

import logging
import sys
import types

import pytorch_lightning as pl
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ldm.models.autoencoder import (
    DEFAULT_LEARNING_RATE,
    AutoencoderKL,
    IdentityFirstStage,
    VQModel,
    VQModelInterface,
)
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

SIZE = 16
DDCONFIG = dict(double_z=True, z_channels=4, resolution=SIZE, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
KL_LOSS = "ldm.modules.losses.LPIPSWithDiscriminator"
VQ_LOSS = "ldm.modules.losses.VQLPIPSWithDiscriminator"
STEPS, DISC_START, BATCH = 24, 8, 4  # training runs: one fixed batch of BATCH images


def kl_model(disc_start: int = 100, **kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    loss = {"target": KL_LOSS, "params": {"disc_start": disc_start, "perceptual_weight": 0, "kl_weight": 1e-6,
                                          "disc_num_layers": 2, "disc_weight": 0.1}}
    return AutoencoderKL(DDCONFIG, loss, embed_dim=4, **kwargs)


def vq_model(disc_start: int = 100, cls=VQModel, **kwargs) -> VQModel:
    torch.manual_seed(0)
    loss = {"target": VQ_LOSS, "params": {"disc_start": disc_start, "perceptual_weight": 0, "disc_num_layers": 2,
                                          "disc_ndf": 16, "disc_weight": 0.1}}
    return cls(ddconfig={**DDCONFIG, "double_z": False}, lossconfig=loss, n_embed=32, embed_dim=4, **kwargs)


def patterns(n: int, size: int = SIZE) -> list[dict[str, torch.Tensor]]:
    """Two-colour images split by a vertical or horizontal edge, (H, W, C) in [-1, 1] like the datasets give."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for i in range(n):
        c1, c2 = torch.rand(2, 3, generator=g) * 2 - 1
        cut = int(torch.randint(size // 4, size - size // 4, (), generator=g))
        mask = (xx < cut) if i % 2 else (yy < cut)
        items.append({"image": torch.where(mask[..., None], c1, c2)})
    return items


def batch_of(n: int = 2) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([p["image"] for p in patterns(n)])}


# ---------------------------------------------------------------------------------------------
# layout and checkpoints
# ---------------------------------------------------------------------------------------------
def test_kl_state_dict_layout():
    state = kl_model(ema_decay=0.999).state_dict()
    prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.", "model_ema.")
    assert all(k.startswith(prefixes) for k in state), [k for k in state if not k.startswith(prefixes)]
    assert state["quant_conv.weight"].shape == (8, 8, 1, 1) and state["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert state["encoder.conv_in.weight"].shape == (32, 3, 3, 3) and "decoder.conv_out.weight" in state
    assert state["loss.discriminator.main.0.weight"].shape == (64, 3, 4, 4)
    assert state["loss.logvar"].shape == ()
    # EMA over every trainable parameter, loss included, as the original LitEma(self)
    assert {"model_ema.decay", "model_ema.num_updates", "model_ema.encoderconv_inweight", "model_ema.losslogvar",
            "model_ema.lossdiscriminatormain0weight"} <= set(state)
    assert state["model_ema.decay"].item() == pytest.approx(0.999)
    assert not any(k.startswith("model_ema.") for k in kl_model().state_dict())


def test_vq_state_dict_layout():
    state = vq_model(use_ema=True).state_dict()
    assert state["quantize.embedding.weight"].shape == (32, 4)
    assert state["quant_conv.weight"].shape == (4, 4, 1, 1) and state["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert state["loss.discriminator.main.0.weight"].shape == (16, 3, 4, 4)
    assert "model_ema.quantizeembeddingweight" in state
    assert not any(k.startswith("loss.perceptual_loss") for k in state)  # perceptual_weight 0: no LPIPS


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_save_and_load_give_identical_outputs(tmp_path, fmt, kind, caplog):
    build = kl_model if kind == "kl" else vq_model
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from a fresh initialisation
    path = tmp_path / f"model.{fmt}"
    state = model.state_dict()
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 7}, path)

    with caplog.at_level(logging.INFO, logger="ldm.models.autoencoder"):
        loaded = build(ckpt_path=str(path), ignore_keys=["loss.discriminator"]).eval()
    assert "Missing keys" in caplog.text and "loss.discriminator.main.0.weight" in caplog.text
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        if kind == "kl":
            expected, actual = model(x, sample_posterior=False)[0], loaded(x, sample_posterior=False)[0]
        else:
            expected, actual = model(x)[0], loaded(x)[0]
    assert torch.equal(expected, actual)
    assert not torch.equal(loaded.loss.discriminator.main[0].weight, model.loss.discriminator.main[0].weight)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": vq_model().state_dict()}, path)
    with pytest.raises(RuntimeError, match="does not fit the AutoencoderKL"):
        kl_model(ckpt_path=str(path))


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------
def test_kl_encode_decode_forward():
    model = kl_model().eval()
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussianDistribution) and posterior.mean.shape == (2, 4, 8, 8)
    assert model.decode(posterior.mode()).shape == x.shape
    dec, post = model(x, sample_posterior=False)
    assert torch.allclose(dec, model.decode(post.mode()))
    torch.manual_seed(1)
    sampled, _ = model(x)
    assert not torch.allclose(sampled, dec)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**DDCONFIG, "double_z": False}, {"target": "torch.nn.Identity"}, embed_dim=4)


def test_vq_encode_decode_and_interface():
    model = vq_model().eval()
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    quant, emb_loss, (perplexity, _, indices) = model.encode(x)
    assert quant.shape == (2, 4, 8, 8) and emb_loss.ndim == 0 and indices.shape == (2 * 8 * 8,)
    dec, diff, ind = model(x, return_pred_indices=True)
    assert torch.allclose(dec, model.decode(quant)) and torch.equal(ind, indices)
    assert torch.allclose(model.decode_code(indices.view(2, 8, 8)), dec, atol=1e-5)

    iface = vq_model(cls=VQModelInterface, remap=None).eval()
    iface.load_state_dict(model.state_dict())
    h = iface.encode(x)
    assert torch.allclose(h, model.encode_to_prequant(x))
    assert torch.allclose(iface.decode(h), dec, atol=1e-5)  # quantised first
    assert not torch.allclose(iface.decode(h, force_not_quantize=True), dec)
    assert torch.allclose(iface(x)[0], dec, atol=1e-5)

    ident = IdentityFirstStage(vq_interface=True)
    assert ident.encode(x) is x and ident.decode(x) is x and ident(x) is x
    assert ident.quantize(x)[0] is x and IdentityFirstStage().quantize(x) is x


def test_get_input_makes_contiguous_channels_first_floats():
    model = kl_model()
    x = model.get_input({"image": torch.zeros(2, 8, 6, 3, dtype=torch.float64)}, "image")
    assert x.shape == (2, 3, 8, 6) and x.dtype == torch.float32 and x.is_contiguous()
    assert model.get_input({"image": torch.zeros(2, 8, 6)}, "image").shape == (2, 1, 8, 6)
    with pytest.raises(KeyError, match="image_key"):
        model.get_input({"jpg": torch.zeros(2, 8, 8, 3)}, "image")


def test_batch_resize_range_only_in_training():
    model = vq_model(batch_resize_range=[16, 32])
    batch = {"image": torch.zeros(2, 24, 24, 3)}
    assert model.train().get_input(batch, "image").shape[-1] == 32  # largest size during the first steps
    assert model.eval().get_input(batch, "image").shape[-1] == 24


def test_log_images():
    model = kl_model(use_ema=True).eval()
    log = model.log_images(batch_of(), plot_ema=True)
    assert set(log) == {"inputs", "reconstructions", "samples", "reconstructions_ema", "samples_ema"}
    assert all(v.shape == (2, 3, SIZE, SIZE) for v in log.values())
    assert set(model.log_images(batch_of(), only_inputs=True)) == {"inputs"}
    assert set(vq_model().eval().log_images(batch_of())) == {"inputs", "reconstructions"}

    seg = AutoencoderKL({**DDCONFIG, "in_channels": 5, "out_ch": 5}, {"target": "torch.nn.Identity"}, embed_dim=4,
                        image_key="segmentation", colorize_nlabels=5).eval()
    labels = torch.nn.functional.one_hot(torch.randint(0, 5, (2, SIZE, SIZE)), 5).float()
    log = seg.log_images({"segmentation": labels})
    assert all(v.shape[1] == 3 and v.min() >= -1 and v.max() <= 1 for v in log.values())


def test_optimizers(caplog):
    model = kl_model(learn_logvar=True, lr_g_factor=0.5)
    with caplog.at_level(logging.WARNING, logger="ldm.models.autoencoder"):
        opt_ae, opt_disc = model.configure_optimizers()
    assert "learning_rate is not set" in caplog.text and model.learning_rate == DEFAULT_LEARNING_RATE
    assert opt_ae.defaults["betas"] == (0.5, 0.9) and opt_disc.defaults["betas"] == (0.5, 0.9)
    assert opt_ae.defaults["lr"] == pytest.approx(0.5 * DEFAULT_LEARNING_RATE)
    assert opt_disc.defaults["lr"] == pytest.approx(DEFAULT_LEARNING_RATE)
    ae_params = {id(p) for p in opt_ae.param_groups[0]["params"]}
    assert id(model.loss.logvar) in ae_params and id(model.encoder.conv_in.weight) in ae_params
    assert {id(p) for p in opt_disc.param_groups[0]["params"]} == {id(p) for p in model.loss.discriminator.parameters()}

    vq = vq_model()
    vq.learning_rate = 1e-4
    opt_ae, _ = vq.configure_optimizers()
    assert id(vq.quantize.embedding.weight) in {id(p) for p in opt_ae.param_groups[0]["params"]}
    with pytest.raises(ValueError, match="lossconfig"):
        AutoencoderKL(DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4).configure_optimizers()


def test_adam_betas_reach_both_optimizers_and_are_checked():
    for model in (kl_model(adam_betas=[0.9, 0.999]), vq_model(adam_betas=(0.9, 0.999))):
        model.learning_rate = 1e-4
        opt_ae, opt_disc = model.configure_optimizers()
        assert opt_ae.defaults["betas"] == (0.9, 0.999) and opt_disc.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="adam_betas"):
        kl_model(adam_betas=[0.9])
    with pytest.raises(ValueError, match="adam_betas"):
        kl_model(adam_betas=[0.9, 1.5])


# ---------------------------------------------------------------------------------------------
# training with Lightning
# ---------------------------------------------------------------------------------------------
class Recorder(pl.Callback):
    """Per batch: the logged train/ metrics and whether the discriminator's weights moved."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.disc_changed: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.disc0 = [p.detach().clone() for p in pl_module.loss.discriminator.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        moved = [not torch.equal(a, b) for a, b in zip(self.disc0, pl_module.loss.discriminator.parameters())]
        self.disc_changed.append(any(moved))

    def series(self, key: str) -> list[float]:
        return [row[f"train/{key}"] for row in self.rows]


class HalveAfter:
    """LR multiplier 1 for the first `steps` steps, then 0.5."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def schedule(self, n: int) -> float:
        return 1.0 if n < self.steps else 0.5


def fit(model, steps: int, **trainer_kwargs) -> tuple[pl.Trainer, Recorder, DataLoader]:
    model.learning_rate = 1e-3
    recorder = Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder], **trainer_kwargs)
    loader = DataLoader(patterns(BATCH), batch_size=BATCH)  # the loss must fall within a few dozen steps
    trainer.fit(model, loader)
    return trainer, recorder, loader


def check_training(trainer, recorder, steps: int, disc_start: int) -> tuple[float, float]:
    rec = recorder.series("rec_loss")
    assert trainer.global_step == steps and len(rec) == steps  # global_step counts batches, not optimizer steps
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.8 * first, rec
    assert recorder.series("disc_factor") == [0.0] * disc_start + [1.0] * (steps - disc_start)
    disc_loss = recorder.series("disc_loss")
    assert all(v == 0.0 for v in disc_loss[:disc_start]) and disc_loss[disc_start] > 0.0  # hinge may reach 0 later
    assert recorder.disc_changed == [False] * disc_start + [True] * (steps - disc_start)
    return first, last


@pytest.mark.slow
def test_autoencoder_kl_trains(monkeypatch):
    schedules = types.ModuleType("ae_test_schedules")
    schedules.HalveAfter = HalveAfter
    monkeypatch.setitem(sys.modules, "ae_test_schedules", schedules)
    steps, disc_start = STEPS, DISC_START
    model = kl_model(disc_start=disc_start, learn_logvar=True,
                     scheduler_config={"target": "ae_test_schedules.HalveAfter", "params": {"steps": STEPS - 5}})
    trainer, recorder, _ = fit(model, steps)
    first, last = check_training(trainer, recorder, steps, disc_start)
    logging.getLogger(__name__).info("KL rec_loss first 5 %.3f, last 5 %.3f", first, last)
    assert model.loss.logvar.item() != 0.0  # learn_logvar: trained with the autoencoder
    assert [opt.param_groups[0]["lr"] for opt in trainer.optimizers] == [pytest.approx(5e-4)] * 2


@pytest.mark.slow
def test_vq_model_trains_with_ema_and_validates(tmp_path):
    steps, disc_start = STEPS, DISC_START
    model = vq_model(disc_start=disc_start, use_ema=True)
    trainer, recorder, loader = fit(model, steps)
    first, last = check_training(trainer, recorder, steps, disc_start)
    logging.getLogger(__name__).info("VQ rec_loss first 5 %.3f, last 5 %.3f", first, last)
    assert all(p >= 1.0 for p in recorder.series("perplexity")) and recorder.series("cluster_usage")[-1] >= 1
    assert model.model_ema.num_updates.item() == steps
    assert not torch.equal(model.model_ema.encoderconv_inweight, model.encoder.conv_in.weight)

    metrics = trainer.validate(model, loader, verbose=False)[0]
    assert {"val/rec_loss", "val/aeloss", "val/disc_loss", "val/perplexity", "val_ema/rec_loss"} <= set(metrics)
    assert metrics["val/rec_loss"] == pytest.approx(last, rel=0.5)

    path = tmp_path / "last.ckpt"  # a checkpoint written by Lightning loads through ckpt_path
    trainer.save_checkpoint(path)
    restored = vq_model(ckpt_path=str(path), use_ema=True).eval()
    x = loader.dataset[0]["image"].permute(2, 0, 1)[None]
    with torch.no_grad():
        assert torch.equal(restored(x)[0], model.eval()(x)[0])


# ---------------------------------------------------------------------------------------------
# gradient accumulation (lightning.trainer.accumulate_grad_batches of the published KL configs)
# ---------------------------------------------------------------------------------------------
def separable_gan(model) -> None:
    """Make the GAN terms per-sample: ActNorm already initialised (no batch statistics) and a fixed generator weight.

    The adaptive weight |grad nll| / |grad g| and BatchNorm are functions of the whole batch, in the original too, so
    only with these two fixed can batch 1 x 2 accumulated equal batch 2.
    """
    for module in model.loss.discriminator.modules():
        if hasattr(module, "initialized"):
            module.initialized.fill_(1)
    model.loss.calculate_adaptive_weight = lambda *args, **kwargs: torch.tensor(0.3)


ACC_DDCONFIG = {**DDCONFIG, "resolution": 8, "ch_mult": [1]}


def accumulation_model(kind: str, disc_start: int, accumulate: int):
    torch.manual_seed(0)
    loss = {"disc_start": disc_start, "perceptual_weight": 0, "disc_num_layers": 1, "use_actnorm": True}
    if kind == "kl":
        model = AutoencoderKL(ACC_DDCONFIG, {"target": KL_LOSS, "params": {**loss, "kl_weight": 1e-3}}, embed_dim=4,
                              use_ema=True)
    else:
        model = VQModel({**ACC_DDCONFIG, "double_z": False}, {"target": VQ_LOSS, "params": {**loss, "disc_ndf": 16}},
                        n_embed=32,
                        embed_dim=4, use_ema=True)
    separable_gan(model)
    model.accumulate_grad_batches = accumulate
    model.learning_rate = 1e-3
    return model


def record_gradients(model) -> list[list[torch.Tensor]]:
    """Every optimizer step of `model` appends the gradients it is about to apply (Adam hides their scale)."""
    seen: list[list[torch.Tensor]] = []
    configure = model.configure_optimizers

    def configure_and_record():
        optimizers = configure()
        for opt in optimizers:
            def step(*args, _step=opt.step, _opt=opt, **kwargs):
                seen.append([p.grad.clone() for g in _opt.param_groups for p in g["params"] if p.grad is not None])
                return _step(*args, **kwargs)
            opt.step = step
        return optimizers

    model.configure_optimizers = configure_and_record
    return seen


def train_on(model, batch_size: int, n_images: int, steps: int, seed: int = 0) -> pl.Trainer:
    """Fit on `n_images` fixed images in order, in float64 (Adam's first steps are lr * g / (|g| + eps): in float32 the
    rounding noise of gradients that are zero in exact arithmetic, e.g. of attention key biases, would move weights by
    up to lr / 100); the KL posterior noise is drawn from a seeded global generator."""
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        precision="64-true")
    torch.manual_seed(seed)
    trainer.fit(model, DataLoader(patterns(n_images, size=8), batch_size=batch_size, shuffle=False))
    return trainer


@pytest.mark.parametrize(("kind", "disc_start"), [("kl", 0), ("kl", 100), ("vq", 0)],
                         ids=["kl-disc-on", "kl-disc-off", "vq-disc-on"])
def test_two_accumulated_batches_of_one_equal_one_batch_of_two(kind, disc_start):
    accumulated, single = accumulation_model(kind, disc_start, 2), accumulation_model(kind, disc_start, 1)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    acc_grads, one_grads = record_gradients(accumulated), record_gradients(single)
    acc_trainer = train_on(accumulated, batch_size=1, n_images=4, steps=2)
    one_trainer = train_on(single, batch_size=2, n_images=4, steps=2)
    # global_step counts optimisation steps: 4 batches of 1 accumulated by 2 are 2 steps, as 2 batches of 2
    assert acc_trainer.global_step == one_trainer.global_step == 2
    # the summed gradients of the two halves are the mean-loss gradients of the whole batch (autoencoder and
    # discriminator, both steps), not twice them
    assert len(acc_grads) == len(one_grads) == 4
    for acc_step, one_step in zip(acc_grads, one_grads):
        assert len(acc_step) == len(one_step) > 0
        for a, b in zip(acc_step, one_step):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert accumulated.model_ema.num_updates.item() == single.model_ema.num_updates.item() == 2
    moved = 0
    for (name, a), b in zip(accumulated.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=name)
        moved += not torch.equal(a, before[name])
    assert moved > 20
    disc = [k for k in before if k.startswith("loss.discriminator.") and k.endswith("weight")]
    disc_moved = any(not torch.equal(single.state_dict()[k], before[k]) for k in disc)
    assert disc_moved == (disc_start == 0)


def test_accumulating_differs_from_stepping_every_batch():
    """The control: the same 4 batches of 1 without accumulation take 4 steps and end elsewhere."""
    accumulated, every_batch = accumulation_model("vq", 100, 2), accumulation_model("vq", 100, 1)
    train_on(accumulated, batch_size=1, n_images=4, steps=2)
    trainer = train_on(every_batch, batch_size=1, n_images=4, steps=4)
    assert trainer.global_step == 4
    a, b = accumulated.encoder.conv_in.weight, every_batch.encoder.conv_in.weight
    assert (a - b).abs().max() > 1e-4


def test_accumulation_steps_at_the_last_batch_of_an_epoch_and_is_validated():
    model = accumulation_model("vq", 100, 2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(patterns(3, size=8), batch_size=1))
    assert trainer.global_step == 2  # batches 1+2, then batch 3 alone at the end of the epoch
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="accumulate_grad_batches must be a positive integer"):
            model.accumulate_grad_batches = bad


def test_main_hands_accumulation_to_the_autoencoder_and_scales_the_lr(caplog):
    from omegaconf import OmegaConf

    from ldm.training.config import drop_manual_optimization_options, learning_rate

    model = kl_model()
    options = {"accumulate_grad_batches": 2, "max_steps": 5}
    with caplog.at_level(logging.WARNING):
        assert drop_manual_optimization_options(options, model) == ["accumulate_grad_batches"]
    assert options == {"max_steps": 5} and model.accumulate_grad_batches == 2
    assert "ignoring" not in caplog.text
    # main.py's rule, as the original: 2 (accumulate) x 1 (device) x 1 (node) x 12 (batch) x 4.5e-6
    published = OmegaConf.load("configs/autoencoder/autoencoder_kl_32x32x4.yaml")
    assert published.lightning.trainer.accumulate_grad_batches == 2
    lr, rule = learning_rate(published, model.accumulate_grad_batches, 1, 1, scale=True)
    assert lr == pytest.approx(2 * 12 * 4.5e-6) and "2 (accumulate_grad_batches)" in rule
