"""scripts/benchmark_training.py compares like with like: the diffusers loop's UNet, VAE and scheduler are our model's
(same outputs, same noising and target), and each loop runs and reports a rate. No timing is asserted."""
import json

import pytest
import torch

from ldm.training.throughput import StepTimer, steps_per_second
from tests.scripts.conftest import load_script

TINY = ["data.params.batch_size=2", "data.params.num_workers=0", "model.params.unet_config.params.model_channels=32"]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_training")


def test_steps_per_second_skips_warm_up():
    assert steps_per_second([0.0, 5.0, 6.0, 7.0], skip=1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        steps_per_second([0.0, 1.0], skip=1)


def test_step_timer_writes_its_times(tmp_path):
    timer = StepTimer(str(tmp_path / "t.json"), skip=0)
    for i in range(3):
        timer.on_train_batch_end(None, None, None, None, i)
    timer.on_train_end(None, None)
    record = json.loads((tmp_path / "t.json").read_text())
    assert len(record["times"]) == len(record["cpu_times"]) == 3


def test_diffusers_loop_trains_the_same_model(bench):
    config = bench.benchmark_config(bench.DEFAULT_CONFIG, TINY)
    torch.manual_seed(0)
    model = bench.build_model(config).eval()
    for p in model.model.parameters():  # off the zero initialisation, so every block counts
        p.data.add_(0.05 * torch.randn_like(p))
    unet, vae, scheduler = bench.diffusers_models(config, model)
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([3, 900]), torch.randn(2, 12, 64)
    with torch.no_grad():
        ours = model.apply_model(x, t, {"crossattn": ctx})
        theirs = unet.eval()(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
        pixels = torch.rand(2, 3, 16, 16) * 2 - 1
        torch.testing.assert_close(vae.encode(pixels).latent_dist.mean, model.encode_first_stage(pixels).mean,
                                   atol=1e-5, rtol=1e-4)
    noise = torch.randn_like(x)
    torch.testing.assert_close(scheduler.add_noise(x, noise, t), model.q_sample(x, t, noise), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scheduler.get_velocity(x, noise, t), model.get_v(x, noise, t), atol=1e-6, rtol=1e-5)


def test_in_process_loops_run_and_report(bench, capsys):
    medians = bench.main(["--loops", "bare", "diffusers", "--steps", "3", "--skip", "0", "--repeats", "1", *TINY])
    assert set(medians) == {"bare loop", "diffusers loop"}
    assert all(wall > 0 and cpu > 0 for wall, cpu in medians.values())
    assert "| bare loop |" in capsys.readouterr().out
