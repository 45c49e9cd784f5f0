"""Learning-rate schedules: warm-up, cosine and linear decay, cycles, and use inside LambdaLR."""
import math

import pytest
import torch

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2


def test_warmup_cosine_absolute_lr():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(0) == 0.0
    assert math.isclose(s(5), 0.5)
    assert math.isclose(s(10), 1.0)
    assert math.isclose(s(60), 0.55)  # half way through the decay: (min+max)/2
    assert math.isclose(s(110), 0.1) and math.isclose(s(10_000), 0.1)


def test_cycles_restart_warmup():
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[2, 4], f_min=[0.0, 0.5], f_max=[1.0, 2.0], f_start=[0.0, 1.0],
                                     cycle_lengths=[10, 20])
    assert math.isclose(s(1), 0.5)
    assert math.isclose(s(10), 0.0)  # end of first cycle
    assert s.find_in_interval(11) == 1
    assert math.isclose(s(12), 1.5)  # second cycle: 2 of 4 warm-up steps from 1.0 to 2.0
    assert math.isclose(s(10 + 20), 0.5)
    assert math.isclose(s(10**6), 0.5)  # past the last cycle: stays at its end


def test_linear_scheduler_is_the_sd_schedule():
    # the Stable Diffusion config: 10000 warm-up steps, then constant (cycle length 1e13)
    s = LambdaLinearScheduler(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.0e-6],
                              f_max=[1.0], f_min=[1.0])
    assert math.isclose(s(0), 1e-6)
    assert math.isclose(s(5000), 0.5 + 0.5e-6)
    assert s(20000) == 1.0
    lin = LambdaLinearScheduler(warm_up_steps=[0], cycle_lengths=[100], f_start=[1.0], f_max=[1.0], f_min=[0.0])
    assert math.isclose(lin(25), 0.75)


def test_mismatched_cycle_lists_are_rejected():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[1, 2], cycle_lengths=[10], f_start=[0.0], f_max=[1.0], f_min=[0.0])


def test_drives_lambda_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LambdaLinearScheduler(warm_up_steps=[4], cycle_lengths=[100], f_start=[0.0], f_max=[1.0], f_min=[1.0]).schedule)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
