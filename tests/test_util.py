"""instantiate_from_config: the original semantics and the errors users see."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import ConfigError, MissingTargetError, get_obj_from_str, instantiate_from_config


def test_builds_target_with_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 5}})
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (5, 3)


def test_params_are_optional_and_none_means_empty():
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity", "params": None}), torch.nn.Identity)


@pytest.mark.parametrize("sentinel", ["__is_first_stage__", "__is_unconditional__"])
def test_sentinels_give_none(sentinel):
    assert instantiate_from_config(sentinel) is None


def test_get_obj_from_str_imports_attribute():
    assert get_obj_from_str("torch.nn.Linear") is torch.nn.Linear


def test_missing_target_names_the_config_path_and_is_a_key_error():
    cfg = OmegaConf.create({"model": {"params": {"unet_config": {"params": {"x": 1}}}}})
    with pytest.raises(KeyError) as info:
        instantiate_from_config(cfg.model.params.unet_config)
    assert isinstance(info.value, MissingTargetError)
    assert "Expected key `target`" in str(info.value)
    assert "model.params.unet_config" in str(info.value)


def test_unimportable_module_names_module_attribute_and_path():
    cfg = OmegaConf.create({"model": {"target": "ldm.does_not_exist.Model"}})
    with pytest.raises(ConfigError) as info:
        instantiate_from_config(cfg.model)
    msg = str(info.value)
    assert "module 'ldm.does_not_exist' could not be imported" in msg
    assert "'model'" in msg


def test_missing_attribute_names_module_and_attribute():
    with pytest.raises(ConfigError, match=r"config 'first_stage_config'.*module 'torch.nn' has no attribute 'Linearr'"):
        instantiate_from_config({"target": "torch.nn.Linearr"}, path="first_stage_config")


def test_target_without_dot_is_rejected():
    with pytest.raises(ConfigError, match="not a dotted import path"):
        instantiate_from_config({"target": "Linear"})


def test_unknown_params_are_named_with_the_accepted_ones():
    cfg = OmegaConf.create({"net": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 2, "out_features": 2, "in_channels": 4, "zz": 1}}})
    with pytest.raises(ConfigError) as info:
        instantiate_from_config(cfg.net)
    msg = str(info.value)
    assert "config 'net'" in msg
    assert "does not accept parameter(s) in_channels, zz" in msg
    assert "accepted: in_features, out_features, bias, device, dtype" in msg


def test_var_kwargs_targets_accept_anything():
    # Encoder-style **ignore_kwargs: unknown keys pass through to the callable
    out = instantiate_from_config({"target": "builtins.dict", "params": {"a": 1}})
    assert out == {"a": 1}


def test_extra_kwargs_override_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 5}},
                                    out_features=7)
    assert layer.out_features == 7


# ---------------------------------------------------------------- checkpoint loading
import os  # noqa: E402
import pickle  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from ldm.util import CheckpointError, load_state_dict  # noqa: E402


def test_load_state_dict_reads_lightning_bare_and_safetensors(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "model.ckpt")
    torch.save(sd, tmp_path / "bare.pt")
    save_file(sd, str(tmp_path / "model.safetensors"))
    for name in ("model.ckpt", "bare.pt", "model.safetensors"):
        loaded = load_state_dict(str(tmp_path / name))
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_state_dict_refuses_code_running_pickles(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(CheckpointError, match=r"evil.ckpt' contains pickled objects .* weights_only=False"):
        load_state_dict(str(path))


def test_load_state_dict_names_missing_and_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="'nope.ckpt' does not exist"):
        load_state_dict("nope.ckpt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(str(bad))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict"):
        load_state_dict(str(tmp_path / "list.pt"))


def test_fused_adam_kwargs_only_for_floating_cpu_or_cuda_parameters():
    import torch

    from ldm.util import fused_adam_kwargs

    weights = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    assert fused_adam_kwargs(weights) == {"fused": True}
    assert fused_adam_kwargs([]) == {}
    assert fused_adam_kwargs([torch.randn(2, device="meta")]) == {}
    # the fused kernel takes the same steps as the loop, to float tolerance
    reference = [w.detach().clone().requires_grad_(True) for w in weights]
    for params, kwargs in ((weights, fused_adam_kwargs(weights)), (reference, {})):
        opt = torch.optim.AdamW(params, lr=1e-2, **kwargs)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (i + step + 1))
            opt.step()
    for fused, looped in zip(weights, reference):
        torch.testing.assert_close(fused, looped)


# ---------------------------------------------------------------- the original's small helpers
import threading  # noqa: E402

import numpy as np  # noqa: E402

from ldm.util import caption_font, isimage, ismap, log_txt_as_img, mean_flat, parallel_data_prefetch  # noqa: E402


def test_ismap_and_isimage_follow_the_channel_count():
    assert isimage(torch.zeros(2, 3, 4, 4)) and isimage(torch.zeros(1, 1, 4, 4))
    assert not isimage(torch.zeros(2, 4, 4, 4)) and not isimage(torch.zeros(3, 4, 4))
    assert ismap(torch.zeros(2, 4, 4, 4)) and ismap(torch.zeros(2, 182, 8, 8))
    assert not ismap(torch.zeros(2, 3, 4, 4)) and not ismap(torch.zeros(4, 4, 4))
    assert not ismap(np.zeros((2, 5, 4, 4))) and not isimage(np.zeros((2, 3, 4, 4)))  # tensors only


def test_mean_flat_averages_every_non_batch_dimension():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert mean_flat(x).tolist() == [5.5, 17.5]
    assert mean_flat(torch.ones(5, 1, 2, 2, 2)).shape == (5,)
    from ldm.modules.diffusionmodules.util import mean_flat as original_path

    assert original_path is mean_flat


def test_log_txt_as_img_draws_wrapped_black_text_on_white():
    out = log_txt_as_img((128, 64), ["", "a" * 20, "hello world " * 3], size=10)
    assert out.shape == (3, 3, 64, 128) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.all(out[0] == 1.0)  # no text: a white image
    ink = out.mean(dim=1) < 0.0  # darker than mid-grey
    # 40 * 128 / 256 = 20 characters per line: 20 a's fit on one line, the 36 characters of caption 2 need two
    rows_with_ink = [int(ink[i].any(dim=1).nonzero().max()) for i in (1, 2)]
    assert rows_with_ink[1] > rows_with_ink[0] + 5
    assert ink[1].any(dim=0).nonzero().max() > 60  # 20 characters of 10 pt span most of the width
    assert torch.equal(log_txt_as_img((128, 64), ["hello"]), log_txt_as_img((128, 64), ["hello"]))


def test_caption_font_is_dejavu_sans_when_one_is_installed():
    font = caption_font(12)
    family, _ = font.getname()
    import os

    from ldm.util import _matplotlib_dejavu

    system = any(os.path.isfile(os.path.join(d, "DejaVuSans.ttf"))
                 for d in ("/usr/share/fonts/truetype/dejavu", "data"))
    if system or _matplotlib_dejavu():
        assert family == "DejaVu Sans" and font.size == 12
    else:  # Pillow's own scalable font
        assert font.size == 12


def _square_with_worker(part, worker_id=None):
    return np.asarray(part) ** 2 + (0 if worker_id is None else 1000 * worker_id)


def _record_thread(part):
    return [(x, threading.current_thread().name) for x in part]


def test_parallel_data_prefetch_keeps_the_order_in_processes_and_threads():
    data = np.arange(10)
    np.testing.assert_array_equal(parallel_data_prefetch(_square_with_worker, data, 3), data ** 2)
    with_ids = parallel_data_prefetch(_square_with_worker, data, 3, use_worker_id=True)
    # np.array_split(10, 3): parts of 4, 3, 3
    np.testing.assert_array_equal(with_ids, data ** 2 + 1000 * np.array([0] * 4 + [1] * 3 + [2] * 3))
    listed = parallel_data_prefetch(_record_thread, list("abcdefg"), 3, target_data_type="list", cpu_intensive=False)
    assert [x for x, _ in listed] == list("abcdefg")
    assert len({name for _, name in listed}) == 3  # ceil(7 / 3) = 3 per part: 3 threads
    values = parallel_data_prefetch(_square_with_worker, {"a": 1, "b": 2, "c": 3}, 2, cpu_intensive=False)
    np.testing.assert_array_equal(values, [1, 4, 9])  # a dict contributes its values
    parts = parallel_data_prefetch(len, [1, 2, 3, 4], 2, target_data_type="parts", cpu_intensive=False)
    assert parts == [2, 2]


def _fail_on_odd(part):
    if any(int(x) % 2 for x in part):
        raise ValueError("odd value")
    return part


def test_parallel_data_prefetch_errors_are_raised_not_waited_for():
    with pytest.raises(RuntimeError, match=r"failed on part 1: ValueError: odd value"):
        parallel_data_prefetch(_fail_on_odd, [0, 2, 3, 4], 2, target_data_type="list")
    with pytest.raises(ValueError, match="target_data_type='list' expected but data is an ndarray"):
        parallel_data_prefetch(_fail_on_odd, np.arange(3), 2, target_data_type="list")
    with pytest.raises(TypeError, match="np.ndarray or an iterable"):
        parallel_data_prefetch(_fail_on_odd, 5, 2)
    with pytest.raises(ValueError, match="n_proc must be a positive integer"):
        parallel_data_prefetch(_fail_on_odd, [1], 0)


def test_dtype_from_name_maps_the_three_precisions_and_names_the_culprit():
    from ldm.util import ConfigError, dtype_from_name

    assert [dtype_from_name(n) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    assert dtype_from_name(None, nullable=True) is None
    with pytest.raises(ConfigError, match=r"^--dtype: expected bf16, fp16 or fp32, got 'float64'$"):
        dtype_from_name("float64", "--dtype")
    with pytest.raises(ConfigError, match="got None"):
        dtype_from_name(None)


def test_return_freed_memory_gives_the_heaps_free_pages_back():
    """Tensors below glibc's mmap threshold live in the heap; once freed they stay resident until trimmed."""
    import gc

    from ldm.util import return_freed_memory

    def rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))

    blocks = [torch.ones(20_000) for _ in range(2_000)]  # 80 KB each, ~160 MB in all, in the heap
    keep = torch.ones(20_000)  # allocated last, at the heap's top: free() cannot trim the blocks below it
    del blocks
    gc.collect()
    before = rss_kib()
    return_freed_memory()
    assert before - rss_kib() > 100_000  # more than 100 MB handed back
    del keep



def _rss_file_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile"))


def test_release_file_pages_gives_back_a_mapped_checkpoints_pages_and_nothing_else(tmp_path):
    from ldm.util import release_file_pages

    weights = {"big": torch.randn(8 << 20), "neighbour": torch.arange(1000.0)}  # 32 MiB, then 4 kB
    torch.save(weights, tmp_path / "w.ckpt")
    mapped = torch.load(tmp_path / "w.ckpt", mmap=True, weights_only=True)
    assert torch.equal(mapped["big"], weights["big"])  # read: its pages are resident
    before = _rss_file_kib()
    released = release_file_pages(iter([mapped["big"]]))
    assert released > 31 << 20
    assert before - _rss_file_kib() > 24 << 10  # KiB: most of the 32 MiB left this process's memory
    assert torch.equal(mapped["neighbour"], weights["neighbour"])
    assert torch.equal(mapped["big"], weights["big"])  # were it read again, the file's bytes come back
    anonymous = weights["big"].clone()
    assert release_file_pages([anonymous]) == 0
    assert torch.equal(anonymous, weights["big"])


REUSE_PROBE = """
import torch
from ldm.util import mapping_large_blocks, reuse_freed_memory

def rss_anon_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) // 1024

def freed_but_resident(n=96 << 18):  # MiB of a freed 96 MiB block still resident
    block = torch.ones(n)
    del block
    return rss_anon_mib() - base

base = rss_anon_mib()
default = freed_but_resident()
applied = reuse_freed_memory()
reused = freed_but_resident()
with mapping_large_blocks():
    base = rss_anon_mib()
    mapped = freed_but_resident()
base = rss_anon_mib()
again = freed_but_resident()
print(applied, default, reused, mapped, again)
"""


def test_reuse_freed_memory_keeps_large_blocks_in_the_heap_until_mapping_large_blocks():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True, check=True).stdout
    applied, default, reused, mapped, again = out.split()
    assert applied == "True"
    assert int(default) < 8  # glibc maps a 96 MiB block and unmaps it when freed
    assert int(reused) > 88  # served from the heap: its pages stay for the next one
    assert int(mapped) < 8  # the heap given back, and large blocks mapped again inside the block
    assert int(again) > 88  # and reused again after it
