"""The role dict is built identically from every original conditioning form: for each conditioning_key, a tensor,
a list and the original {c_concat, c_crossattn, c_adm} dict give the UNet exactly the output of the original
routing (LatentDiffusion.apply_model + DiffusionWrapper.forward before the role dict, kept below as the
reference), and so does the role dict itself."""
import pytest
import torch

from ldm.models.diffusion.ddpm import DiffusionWrapper
from ldm.modules.encoders.roles import to_roles

B, C, HW, D = 2, 4, 8, 16


def original_route(unet, key, sequential, x, t, cond):
    """The original code path: apply_model's wrapping of a bare cond, then DiffusionWrapper's string chains."""
    if not isinstance(cond, dict):
        cond = {"c_concat" if key == "concat" else "c_crossattn": cond if isinstance(cond, list) else [cond]}
    c_concat, c_crossattn, c_adm = cond.get("c_concat"), cond.get("c_crossattn"), cond.get("c_adm")
    if key is None:
        return unet(x, t)
    if key in ("concat", "hybrid", "hybrid-adm"):
        x = torch.cat([x, *c_concat], dim=1)
    context = None
    if key in ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm"):
        context = list(c_crossattn) if sequential else torch.cat(c_crossattn, 1)
    y = None
    if key in ("hybrid-adm", "crossattn-adm"):
        y = c_adm
    if key == "adm":
        y = c_crossattn[0]
    if context is None and y is None:
        return unet(x, t)
    if y is None:
        return unet(x, t, context=context)
    return unet(x, t, context=context, y=y)


def unet_config(key, sequential=False):
    concat = key in ("concat", "hybrid", "hybrid-adm")
    params = dict(image_size=HW, in_channels=C + (3 if concat else 0), out_channels=C, model_channels=32,
                  attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16)
    if key in ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm"):
        params.update(use_spatial_transformer=True, context_dim=D, transformer_depth=2 if sequential else 1)
    if key == "adm":
        params.update(num_classes=10)  # the first c_crossattn entry is a batch of class labels
    elif key in ("hybrid-adm", "crossattn-adm"):
        params.update(num_classes="sequential", adm_in_channels=6)
    config = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
    if sequential:
        config["sequential_crossattn"] = True
    return config


def wrapper_for(key, sequential=False):
    torch.manual_seed(0)
    wrapper = DiffusionWrapper(unet_config(key, sequential), key).eval()
    with torch.no_grad():  # the zero-initialised convs would hide the conditioning
        for p in wrapper.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return wrapper


def parts():
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return {"concat": [rand(B, 2, HW, HW), rand(B, 1, HW, HW)], "context": [rand(B, 5, D), rand(B, 3, D)],
            "labels": torch.tensor([3, 7]), "adm": rand(B, 6)}


def forms(key):
    """(name, conditioning) in every original form the key accepts."""
    p = parts()
    if key is None:
        return [("none", None), ("tensor", p["context"][0])]
    if key == "concat":
        return [("tensor", torch.cat(p["concat"], 1)), ("list", p["concat"]),
                ("dict", {"c_concat": p["concat"], "c_crossattn": p["context"]})]
    if key == "crossattn":
        return [("tensor", p["context"][0]), ("list", p["context"]),
                ("dict", {"c_crossattn": p["context"], "c_adm": p["adm"]})]
    if key == "adm":
        return [("tensor", p["labels"]), ("list", [p["labels"], p["context"][0]]), ("dict", {"c_crossattn": [p["labels"]]})]
    cond = {"c_crossattn": p["context"]}
    if key in ("hybrid", "hybrid-adm"):
        cond["c_concat"] = p["concat"]
    if key in ("hybrid-adm", "crossattn-adm"):
        cond["c_adm"] = p["adm"]
    return [("dict", cond)]


KEYS = [None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm"]


@pytest.mark.parametrize("key", KEYS)
def test_every_original_form_gives_the_original_unet_output(key):
    wrapper = wrapper_for(key)
    x, t = torch.randn(B, C, HW, HW, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 500])
    with torch.no_grad():
        for name, cond in forms(key):
            expected = original_route(wrapper.diffusion_model, key, False, x, t, cond)
            assert torch.equal(wrapper(x, t, cond=cond), expected), name
            roles = wrapper.roles(cond)
            assert set(roles) == {None: set(), "concat": {"concat"}, "crossattn": {"crossattn"},
                                  "hybrid": {"concat", "crossattn"}, "adm": {"vector"},
                                  "hybrid-adm": {"concat", "crossattn", "vector"},
                                  "crossattn-adm": {"crossattn", "vector"}}[key]
            assert torch.equal(wrapper(x, t, cond=roles), expected), name  # the role dict itself
            if isinstance(cond, dict):  # and the original keyword call
                assert torch.equal(wrapper(x, t, **cond), expected), name


def test_sequential_cross_attention_keeps_one_context_per_block():
    wrapper = wrapper_for("crossattn", sequential=True)
    context = parts()["context"]
    x, t = torch.randn(B, C, HW, HW), torch.tensor([3, 900])
    with torch.no_grad():
        expected = original_route(wrapper.diffusion_model, "crossattn", True, x, t, context)
        assert torch.equal(wrapper(x, t, cond=context), expected)
        assert isinstance(wrapper.roles(context)["crossattn"], list)
        swapped = wrapper(x, t, cond=context[::-1])
    assert not torch.allclose(swapped, expected)  # each block reads its own context


def test_role_dict_is_checked_against_the_conditioning_key():
    wrapper = wrapper_for("hybrid")
    p = parts()
    x, t = torch.randn(B, C, HW, HW), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"reads the roles \['concat', 'crossattn'\].*missing \['concat'\]"):
        wrapper(x, t, cond={"crossattn": p["context"][0]})
    with pytest.raises(ValueError, match=r"not read: \['vector'\]"):
        wrapper(x, t, cond={"crossattn": p["context"][0], "concat": p["concat"][0], "vector": p["adm"]})
    with pytest.raises(ValueError, match="not a mix"):
        wrapper(x, t, cond={"crossattn": p["context"][0], "c_concat": p["concat"]})
    with pytest.raises(ValueError, match="either as cond= or as c_concat"):
        wrapper(x, t, c_concat=p["concat"], cond={"concat": p["concat"][0]})
    with pytest.raises(ValueError, match="conditioning_key 'hybrid' needs c_concat, got None"):
        wrapper(x, t, cond=p["context"][0])  # a bare tensor is a c_crossattn entry, as in the original


def test_a_role_list_is_a_conditioning_key():
    torch.manual_seed(0)
    config = unet_config("crossattn-adm")
    wrapper = DiffusionWrapper(config, ["crossattn", "vector"]).eval()
    p = parts()
    x, t = torch.randn(B, C, HW, HW), torch.tensor([4, 40])
    roles = {"crossattn": p["context"][0], "vector": p["adm"]}
    with torch.no_grad():
        out = wrapper(x, t, cond=roles)
        assert torch.equal(out, wrapper.diffusion_model(x, t, context=p["context"][0], y=p["adm"]))
        assert torch.equal(out, wrapper(x, t, cond={"c_crossattn": [p["context"][0]], "c_adm": p["adm"]}))
    with pytest.raises(ValueError, match=r"conditioning_key '\[crossattn, vector\]' needs c_adm"):
        to_roles(p["context"][0], ("crossattn", "vector"))
    assert to_roles(p["concat"], ("concat",))["concat"].shape == (B, 3, HW, HW)  # a bare list joins its channels
