"""VectorQuantizer: nearest-code lookup, straight-through gradients, losses, remapping and perplexity."""
import math

import numpy as np
import pytest
import torch

from ldm.modules.vqvae.quantize import VectorQuantizer, VectorQuantizer2


def _quantizer(**kwargs) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(n_e=8, e_dim=4, beta=0.25, **kwargs)


def _brute_force_indices(vq: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    flat = z.permute(0, 2, 3, 1).reshape(-1, vq.e_dim)
    return torch.cdist(flat, vq.embedding.weight).argmin(dim=1)


def test_init_and_alias():
    vq = _quantizer()
    assert VectorQuantizer2 is VectorQuantizer
    assert vq.embedding.weight.abs().max() <= 1.0 / 8
    assert vq.re_embed == 8 and set(vq.state_dict()) == {"embedding.weight"}


def test_nearest_code_and_bchw_output():
    vq = _quantizer()
    z = torch.randn(2, 4, 3, 5) * 0.1
    z_q, _, (_, min_encodings, indices) = vq(z)
    assert z_q.shape == z.shape and min_encodings is None
    assert torch.equal(indices, _brute_force_indices(vq, z))
    codes = vq.embedding.weight[indices].view(2, 3, 5, 4).permute(0, 3, 1, 2)
    assert torch.allclose(z_q, codes, atol=1e-6)
    assert torch.allclose(vq.get_codebook_entry(indices, (2, 3, 5, 4)), z_q, atol=1e-6)


def test_straight_through_gradient_is_identity():
    vq = _quantizer()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = vq(z)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert vq.embedding.weight.grad is None or vq.embedding.weight.grad.eq(0).all()


def test_codebook_gets_gradient_only_from_loss():
    vq = _quantizer()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, loss, (_, _, indices) = vq(z)
    loss.backward()
    grad = vq.embedding.weight.grad
    used = torch.zeros(8, dtype=torch.bool)
    used[indices] = True
    assert grad[used].abs().sum() > 0 and grad[~used].eq(0).all()


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_weighting(legacy):
    vq = _quantizer(legacy=legacy)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, (_, _, indices) = vq(z)
    mse = torch.mean((z_q.detach() - z.detach()) ** 2)
    assert torch.allclose(loss, 1.25 * mse)  # value is the same; only where beta goes differs
    (z_grad,) = torch.autograd.grad(loss, z, retain_graph=True)
    code_grad = torch.autograd.grad(loss, vq.embedding.weight)[0]
    z_weight = 1.0 if legacy else 0.25
    code_weight = 0.25 if legacy else 1.0
    expected_z_grad = z_weight * 2 * (z - z_q).detach() / z.numel()
    assert torch.allclose(z_grad, expected_z_grad, atol=1e-7)
    per_position = -(code_weight / z_weight) * expected_z_grad.permute(0, 2, 3, 1).reshape(-1, 4)
    expected_code_grad = torch.zeros(8, 4).index_add_(0, indices, per_position)
    assert torch.allclose(code_grad, expected_code_grad, atol=1e-7)


def test_sane_index_shape():
    vq = _quantizer(sane_index_shape=True)
    z_q, _, (_, _, indices) = vq(torch.randn(2, 4, 3, 5))
    assert indices.shape == (2, 3, 5)


def test_perplexity_counts_codes_in_use():
    vq = _quantizer()
    codes = vq.embedding.weight.detach()
    uniform = codes.repeat(2, 1).T.reshape(1, 4, 4, 4)  # every one of the 8 codes used twice
    _, _, (perplexity, _, indices) = vq(uniform)
    assert torch.equal(torch.bincount(indices, minlength=8), torch.full((8,), 2))
    assert math.isclose(perplexity.item(), 8.0, rel_tol=1e-4)
    single = codes[3].view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    assert math.isclose(vq(single)[2][0].item(), 1.0, rel_tol=1e-4)


def _remap_file(tmp_path, used) -> str:
    path = tmp_path / "used.npy"
    np.save(path, np.array(used, dtype=np.int64))
    return str(path)


def _codes_input(vq: VectorQuantizer, code_ids: list[int]) -> torch.Tensor:
    return vq.embedding.weight.detach()[code_ids].T.reshape(1, 4, 1, len(code_ids)).contiguous()


def test_remap_into_used_set_and_back(tmp_path):
    vq = _quantizer(remap=_remap_file(tmp_path, [1, 4, 6]), unknown_index=0)
    assert torch.equal(vq.used, torch.tensor([1, 4, 6])) and vq.re_embed == 3
    z = _codes_input(vq, [6, 1, 4, 2])
    z_q, _, (_, _, indices) = vq(z)
    assert indices.shape == (4, 1)
    assert indices.flatten().tolist() == [2, 0, 1, 0]  # code 2 is not in use → unknown_index 0
    entry = vq.get_codebook_entry(indices.flatten()[:3], (1, 1, 3, 4))
    assert torch.allclose(entry, z_q[..., :3], atol=1e-6)
    assert torch.allclose(vq.get_codebook_entry(indices.flatten()[3:], (1, 1, 1, 4)), z[..., 1:2], atol=1e-6)


def test_remap_unknown_extra_and_random(tmp_path):
    path = _remap_file(tmp_path, [1, 4, 6])
    extra = _quantizer(remap=path, unknown_index="extra")
    assert extra.re_embed == 4 and extra.unknown_index == 3
    _, _, (_, _, indices) = extra(_codes_input(extra, [2, 4]))
    assert indices.flatten().tolist() == [3, 1]
    assert extra.unmap_to_all(torch.tensor([[3, 1]])).tolist() == [[1, 4]]  # the extra token falls back to used[0]

    rand = _quantizer(remap=path, unknown_index="random")
    torch.manual_seed(1)
    _, _, (_, _, indices) = rand(_codes_input(rand, [0, 2, 3, 5, 7, 6]))
    assert indices[:5].flatten().ge(0).all() and indices[:5].flatten().lt(3).all()
    assert indices[5].item() == 2
    _, _, (_, _, many) = rand(_codes_input(rand, [0] * 60))
    assert set(many.flatten().tolist()) == {0, 1, 2}  # unknown codes spread over the used vocabulary


def test_remap_errors(tmp_path):
    missing = str(tmp_path / "nope.npy")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        _quantizer(remap=missing)
    with pytest.raises(ValueError, match="unknown_index"):
        _quantizer(remap=_remap_file(tmp_path, [0]), unknown_index="sometimes")
    with pytest.raises(ValueError, match="e_dim"):
        _quantizer()(torch.randn(1, 3, 2, 2))
