"""LitEma: warm-up decay, buffer naming, checkpoint round trip, and swapping weights in and out."""
import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    return model


def _set_all(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_buffers_names_and_untracked_params():
    model = _model()
    ema = LitEma(model)
    assert ema.m_name2s_name == {"0.weight": "0weight", "0.bias": "0bias", "1.weight": "1weight",
                                 "1.bias": "1bias", "2.weight": "2weight"}
    keys = set(ema.state_dict())
    assert keys == {"decay", "num_updates", "0weight", "0bias", "1weight", "1bias", "2weight"}
    assert not any("." in k for k in keys)  # BatchNorm running stats and the frozen bias are not tracked
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32
    assert ema.num_updates.item() == 0 and LitEma(model, use_num_upates=False).num_updates.item() == -1
    assert torch.equal(ema.get_buffer("0weight"), model[0].weight) and ema.get_buffer("0weight") is not model[0].weight


def test_warmup_decay_by_hand():
    model = _model()
    _set_all(model, 0.0)
    ema = LitEma(model, decay=0.5)
    shadow = 0.0
    for n, target in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        _set_all(model, target)
        ema(model)
        decay = min(0.5, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, 5/14, 6/15: all below 0.5
        shadow = decay * shadow + (1 - decay) * target
        assert ema.num_updates.item() == n
        assert torch.allclose(ema.get_buffer("0weight"), torch.full((4, 3), shadow))
    for _ in range(20):  # (1+n)/(10+n) passes 0.5 at n = 8, after which the fixed decay applies
        ema(model)
    before = ema.get_buffer("2weight").clone()
    _set_all(model, 0.0)
    ema(model)
    assert torch.allclose(ema.get_buffer("2weight"), 0.5 * before)


def test_fixed_decay_without_warmup_and_reset():
    model = _model()
    _set_all(model, 0.0)
    ema = LitEma(model, decay=0.9, use_num_upates=False)
    _set_all(model, 1.0)
    ema(model)
    assert ema.num_updates.item() == -1
    assert torch.allclose(ema.get_buffer("0bias"), torch.full((4,), 0.1))
    ema.reset_num_updates()
    assert ema.num_updates.item() == 0
    ema(model)  # warm-up decay 2/11 now applies
    assert torch.allclose(ema.get_buffer("0bias"), torch.full((4,), 2 / 11 * 0.1 + 9 / 11))


def test_state_dict_round_trip():
    model = _model()
    ema = LitEma(model, decay=0.99)
    for step in range(3):
        _set_all(model, float(step))
        ema(model)
    fresh = LitEma(_model(), decay=0.5, use_num_upates=False)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.decay.item() == pytest.approx(0.99) and fresh.num_updates.item() == 3
    for name, buf in ema.named_buffers():
        assert torch.equal(fresh.get_buffer(name), buf)


def test_copy_to_store_restore():
    model = _model()
    ema = LitEma(model)
    _set_all(model, 0.0)
    ema(model)  # shadow = 2/11 * initial weights
    expected = {n: b.clone() for n, b in ema.named_buffers()}
    _set_all(model, 7.0)
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.equal(model[0].weight, expected["0weight"]) and torch.equal(model[1].bias, expected["1bias"])
    assert model[2].bias.eq(7.0).all()  # not tracked, so left alone
    ema.restore(model.parameters())
    assert all(p.eq(7.0).all() for p in model.parameters())
    with pytest.raises(ValueError, match="store"):
        ema.restore(list(model.parameters())[:2])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="between 0 and 1"):
        LitEma(_model(), decay=1.5)
    ema = LitEma(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="0.weight"):
        ema(nn.Sequential(nn.Linear(2, 2)))
