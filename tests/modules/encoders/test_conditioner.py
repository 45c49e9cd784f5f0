"""GeneralConditioner: embedders by batch key into roles (explicit or by rank), joined per role; seeded ucg dropout
at its rate, to zeros or to the embedder's null input; the unconditional conditioning for guidance; frozen and
trainable embedders; config errors that name the entry."""
import pytest
import torch

from ldm.modules.encoders.conditioner import GeneralConditioner
from ldm.modules.encoders.modules import ClassEmbedder
from ldm.util import ConfigError

N_CLASSES, B = 10, 32


def class_embedder(**spec):
    return {"target": "ldm.modules.encoders.modules.ClassEmbedder", "input_key": "cls",
            "params": {"embed_dim": 16, "n_classes": N_CLASSES, "ucg_rate": 0.0}, **spec}


def size_embedder(**spec):
    return {"target": "torch.nn.Linear", "input_key": "size", "params": {"in_features": 2, "out_features": 8}, **spec}


def batch(seed=0, n=B):
    gen = torch.Generator().manual_seed(seed)
    return {"cls": torch.randint(0, N_CLASSES - 1, (n,), generator=gen), "size": torch.rand(n, 2, generator=gen) + 0.5}


def test_two_embedders_give_their_roles_by_rank():
    torch.manual_seed(0)
    cond = GeneralConditioner([class_embedder(), size_embedder(is_trainable=True)]).eval()
    b = batch()
    out = cond(b)
    assert set(out) == {"crossattn", "vector"}
    classes, linear = cond.embedders
    torch.testing.assert_close(out["crossattn"], classes(b["cls"]))  # [B, 1, 16] -> crossattn
    torch.testing.assert_close(out["vector"], linear(b["size"]))  # [B, 8] -> vector
    assert cond.input_keys == ("cls", "size") and cond.is_trainable
    assert list(cond.state_dict()) == ["embedders.0.embedding.weight", "embedders.1.weight", "embedders.1.bias"]


def test_frozen_embedders_stay_frozen_and_trainable_ones_get_gradients():
    cond = GeneralConditioner([class_embedder(), size_embedder(is_trainable=True)])
    cond.train()
    classes, linear = cond.embedders
    assert not classes.training and linear.training
    assert not any(p.requires_grad for p in classes.parameters())
    out = cond(batch())
    (out["crossattn"].sum() + out["vector"].sum()).backward()
    assert linear.weight.grad is not None and classes.embedding.weight.grad is None
    assert not out["crossattn"].requires_grad


def test_embedders_of_one_role_are_joined_features_for_context_channels_for_concat():
    torch.manual_seed(0)
    wide = class_embedder(params={"embed_dim": 24, "n_classes": N_CLASSES, "ucg_rate": 0.0})
    cond = GeneralConditioner([class_embedder(), wide, size_embedder(role="vector"), size_embedder()]).eval()
    b = batch()
    out = cond(b)
    assert out["crossattn"].shape == (B, 1, 16 + 24)  # along the features, as SDXL's two text encoders
    torch.testing.assert_close(out["crossattn"][..., 16:], cond.embedders[1](b["cls"]))
    assert out["vector"].shape == (B, 16)
    image = {"target": "ldm.modules.encoders.modules.SpatialRescaler", "input_key": "img",
             "params": {"n_stages": 1, "multiplier": 0.5}}
    cond = GeneralConditioner([image, image])
    out = cond({"img": torch.rand(2, 3, 8, 8)})
    assert set(out) == {"concat"} and out["concat"].shape == (2, 6, 4, 4)  # along the channels


def drop_shares(cond, batches=200):
    """Per embedder role, the share of samples whose embedding was dropped to zero, and of both at once."""
    crossattn, vector, both = [], [], []
    for i in range(batches):
        out = cond(batch(i))
        c_zero = (out["crossattn"] == 0).flatten(1).all(1)
        v_zero = (out["vector"] == 0).flatten(1).all(1)
        crossattn.append(c_zero)
        vector.append(v_zero)
        both.append(c_zero & v_zero)
    return [torch.cat(x).float().mean().item() for x in (crossattn, vector, both)]


def test_ucg_dropout_drops_each_embedder_at_its_rate_independently_and_seeded():
    def make(seed):
        torch.manual_seed(0)
        return GeneralConditioner([class_embedder(ucg_rate=0.25), size_embedder(ucg_rate=0.5)], seed=seed).train()

    c_share, v_share, both = drop_shares(make(seed=1))
    # 6,400 samples: the binomial standard deviation of a share is below 0.007
    assert c_share == pytest.approx(0.25, abs=0.025) and v_share == pytest.approx(0.5, abs=0.025)
    assert both == pytest.approx(0.125, abs=0.02)  # independent draws per embedder
    assert drop_shares(make(seed=1), 20) == drop_shares(make(seed=1), 20)  # the seed fixes the pattern
    assert drop_shares(make(seed=2), 20) != drop_shares(make(seed=1), 20)
    torch.manual_seed(5)
    unseeded_a = drop_shares(make(seed=None), 5)
    torch.manual_seed(5)
    assert drop_shares(make(seed=None), 5) == unseeded_a  # or the global generator, which main.py seeds
    assert drop_shares(make(seed=1).eval(), 20)[:2] == [0.0, 0.0]  # no dropout outside training


def test_legacy_ucg_value_drops_the_input_to_the_null_class():
    torch.manual_seed(0)
    cond = GeneralConditioner([class_embedder(ucg_rate=0.3, legacy_ucg_value=N_CLASSES - 1)], seed=0).train()
    null = cond.embedders[0].embedding.weight[-1]
    b = batch(n=4000)
    out = cond(b)["crossattn"][:, 0]
    is_null = (out == null).all(-1)
    assert is_null.float().mean().item() == pytest.approx(0.3, abs=0.03)
    torch.testing.assert_close(out[~is_null], cond.embedders[0].embedding.weight[b["cls"][~is_null]])
    assert not (b["cls"] == N_CLASSES - 1).any()  # the batch itself is left alone


def test_unconditional_conditioning_is_the_trained_null():
    torch.manual_seed(0)
    cond = GeneralConditioner([class_embedder(ucg_rate=0.1, legacy_ucg_value=N_CLASSES - 1), size_embedder(ucg_rate=0.2),
                               size_embedder(role="vector")], seed=0).train()
    b = batch(n=6)
    c, uc = cond.get_unconditional_conditioning(b)
    classes, linear, unused = cond.embedders
    torch.testing.assert_close(c["crossattn"], classes(b["cls"]))  # no dropout in c, even in training mode
    torch.testing.assert_close(uc["crossattn"], classes.embedding.weight[[-1] * 6][:, None])  # its null input
    assert not uc["vector"][:, :8].any()  # zeros for an embedder dropped to zero
    torch.testing.assert_close(uc["vector"][:, 8:], unused(b["size"]))  # an embedder never dropped keeps its input
    # sgm's form: only the listed embedders give zeros, the others embed batch_uc (default batch_c)
    c2, uc2 = cond.get_unconditional_conditioning(b, force_uc_zero_embeddings=[], force_cond_zero_embeddings=["cls"])
    torch.testing.assert_close(uc2["crossattn"], classes(b["cls"]))
    assert not c2["crossattn"].any()
    _, uc3 = cond.get_unconditional_conditioning(b, {"cls": torch.full((6,), 3)}, force_uc_zero_embeddings=["size"])
    torch.testing.assert_close(uc3["crossattn"], classes(torch.full((6,), 3)))
    assert not uc3["vector"].any()
    # without force_uc_zero_embeddings, a batch_uc entry is embedded rather than nulled
    _, uc4 = cond.get_unconditional_conditioning(b, {"cls": torch.full((6,), 3)})
    torch.testing.assert_close(uc4["crossattn"], classes(torch.full((6,), 3)))


@pytest.mark.parametrize("entry, message", [
    (class_embedder(input_keys=["cls"]), "exactly one of input_key and input_keys"),
    ({**class_embedder(), "ucg": 0.1}, r"unknown key\(s\) \['ucg'\]"),
    (class_embedder(ucg_rate=1.5), r"ucg_rate must lie in \[0, 1\]"),
    (class_embedder(role="context"), "role 'context' unknown"),
    ({"target": "torch.nn.Linear", "input_keys": ["a", "b"], "legacy_ucg_value": 0, "params": {"in_features": 1,
                                                                                              "out_features": 1}},
     "legacy_ucg_value replaces one input"),
    ({"target": "builtins.dict", "input_key": "x"}, "builds a dict, not a torch module"),
])
def test_config_errors_name_the_embedder(entry, message):
    with pytest.raises(ConfigError, match=r"emb_models\[1\].*" + message):
        GeneralConditioner([class_embedder(), entry])


def test_runtime_errors_name_the_embedder_and_the_key():
    cond = GeneralConditioner([class_embedder()])
    with pytest.raises(KeyError, match="emb_models\\[0\\].*has no key 'cls'"):
        cond({"label": torch.zeros(2)})
    labels = GeneralConditioner([{"target": "torch.nn.Identity", "input_key": "cls", "ucg_rate": 0.5}]).train()
    with pytest.raises(ValueError, match="integer outputs .* cannot be dropped to zero; set legacy_ucg_value"):
        labels({"cls": torch.arange(4)})
    assert GeneralConditioner.declared_roles([class_embedder(role="crossattn"), size_embedder(role="vector")]) == (
        "crossattn", "vector")
    assert GeneralConditioner.declared_roles([class_embedder(role="crossattn"), size_embedder()]) is None
    assert isinstance(cond.embedders[0], ClassEmbedder)
