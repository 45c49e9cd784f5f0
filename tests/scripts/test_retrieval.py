"""Retrieval-augmented diffusion end to end: the faiss searcher against exact search (and its quantised tier's
recall), the seeded CLIP retriever, scripts/train_searcher.py building a database from built-in data, the RDM
(shapes-rdm.yaml, shrunk) training a few steps on its retrieved neighbours, scripts/knn2img.py sampling from an image
or text query with neighbours, and the published 768x768.yaml building."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.shapes import ShapesTrain
from ldm.modules import retrieval
from ldm.util import instantiate_from_config
from task_runs import (
    REPO,
    SAMPLER_FLAGS,
    assert_sampler_flags_reached,
    randomise_zero_convs,
    save_run,
    shipped_task_config,
    spy_sampling,
    train_steps,
)

BASE = ["--steps", "4", "--device", "cpu", "--H", "16", "--W", "16", "--n_samples", "2"]


def test_brute_force_searcher_is_exact_and_quantised_tier_recalls():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(500, 16)).astype(np.float32)
    searcher = retrieval.Searcher({"embedding": pool, "img_id": np.arange(500) + 7, "patch_coords": np.zeros((500, 4))})
    queries = rng.normal(size=(6, 16)).astype(np.float32)
    out = searcher(queries, 5)
    cos = retrieval.normalize(queries) @ retrieval.normalize(pool).T
    assert (out["nns"] == np.argsort(-cos, axis=1)[:, :5]).all()
    assert (out["img_ids"] == out["nns"] + 7).all() and out["nn_embeddings"].shape == (6, 5, 16)
    np.testing.assert_allclose(np.linalg.norm(out["nn_embeddings"], axis=-1), 1.0, rtol=1e-5)
    big = rng.normal(size=(25000, 16))
    queries = retrieval.normalize(rng.normal(size=(20, 16)))
    exact = np.argsort(-(queries @ retrieval.normalize(big).T), axis=1)[:, :10]
    recalls = []
    for reorder_k in (None, 100):  # product quantisation, then exact re-ranking of reorder_k candidates
        index, info = retrieval.train_searcher(big, knn=10, reorder_k=reorder_k)
        assert info["kind"] == "asymmetric_hashing" and info["reorder_k"] == (reorder_k or 20)
        _, found = index.search(queries, 10)
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
    assert 0.3 < recalls[0] < recalls[1] and recalls[1] > 0.75, recalls  # approximate; more re-ranking, better
    with pytest.raises(ValueError, match="knn=0 must lie in"):
        retrieval.train_searcher(pool, knn=0)


def test_clip_retriever_is_seeded_and_unit_norm(tmp_path):
    arch = OmegaConf.to_container(OmegaConf.load(REPO / "configs/latent-diffusion/shapes-rdm.yaml")
                                  .model.params.retriever_config.params.arch)
    a, b = retrieval.CLIPRetriever(arch, seed=0), retrieval.CLIPRetriever(arch, seed=0)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    za = a.encode_image(images)
    assert torch.equal(za, b.encode_image(images)) and za.shape == (3, 64)  # same weights in every process
    assert not torch.equal(za, retrieval.CLIPRetriever(arch, seed=1).encode_image(images))
    torch.testing.assert_close(za.norm(dim=-1), torch.ones(3))
    assert a.encode_text(["a red circle", "a blue square"]).shape == (2, 64)
    torch.save(a.model.state_dict(), tmp_path / "clip.pt")
    loaded = retrieval.CLIPRetriever(arch, weights=tmp_path / "clip.pt", seed=5)
    assert torch.equal(loaded.encode_image(images), za)
    with pytest.raises(Exception, match="there is no such file"):
        retrieval.CLIPRetriever(arch, weights=tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def rdm_run(tmp_path_factory, scripts):
    """train_searcher --from-data over 64 shapes, then the RDM trained 3 steps on their neighbours, as a run."""
    root = tmp_path_factory.mktemp("rdm")
    config = shipped_task_config("rdm", scale_by_std=False, scale_factor=0.5, knn=3,
                                 database=str(root / "db"), searcher=str(root / "searcher"))
    config.model.params.unet_config.params.context_dim = 64  # the retriever's width
    config.data.params.train.params.length = 64
    OmegaConf.save(config, root / "rdm.yaml")
    assert scripts("train_searcher").main(["--from-data", str(root / "rdm.yaml"), "--n_images", "64", "-d",
                                           str(root / "db"), "-t", str(root / "searcher"), "-k", "4"]) == 0
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    randomise_zero_convs(model)
    losses = train_steps(model, ShapesTrain(size=16, length=12))
    assert all(np.isfinite(losses))
    return save_run(root, "rdm", config, model), model.eval()


def test_rdm_conditions_on_the_neighbours_of_each_image_itself_left_out(rdm_run):
    run, model = rdm_run
    assert any(k.startswith("retriever.model.visual.") for k in model.state_dict())
    assert not {id(p) for p in model.trainable_parameters()} & {id(p) for p in model.retriever.parameters()}
    data = ShapesTrain(size=16, length=4)  # the database's first 4 images: each finds itself first
    batch = {"image": torch.from_numpy(np.stack([data[i]["image"] for i in range(4)]))}
    _, c = model.get_input(batch, "image")
    assert c.shape == (4, 3, 64)
    queries = model.retriever.encode_image(batch["image"].permute(0, 3, 1, 2))
    raw = model.searcher(queries, 4)
    assert (raw["nns"][:, 0] == np.arange(4)).all()  # the image itself is its nearest entry ...
    torch.testing.assert_close(c, torch.from_numpy(raw["nn_embeddings"][:, 1:4]))  # ... and is left out
    model.train()
    torch.manual_seed(3)
    dropped = model.get_input({"image": batch["image"].repeat(8, 1, 1, 1)}, "image")[1]
    model.eval()
    zero = (dropped.abs().sum(dim=(1, 2)) == 0).float().mean()
    assert 0 < zero < 0.5  # nn_dropout 0.1 of 32 contexts zeroed in training
    uc = model.guidance_unconditional({"c_crossattn": [c]}, 4)
    assert torch.equal(uc["crossattn"], torch.zeros_like(c))
    precomputed = model.get_input({**batch, "nn_embeddings": torch.ones(4, 2, 64)}, "image")[1]
    assert torch.equal(precomputed, torch.ones(4, 2, 64))  # a batch's own neighbours are used as they are


def pixels(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB")), dict(image.text)


def test_knn2img_samples_image_and_text_queries_with_neighbours(rdm_run, scripts, tmp_path):
    run, _ = rdm_run
    query = ((ShapesTrain(size=16, length=1)[0]["image"] + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(query).save(tmp_path / "q.png")
    main = scripts("knn2img").main
    args = ["-r", str(run.logdir), "--use_neighbors", "--knn", "3", "--scale", "3.0", *BASE]
    assert main([*args, "--query-img", str(tmp_path / "q.png"), "--outdir", str(tmp_path / "a")]) == 0
    assert main([*args, "--query-img", str(tmp_path / "q.png"), "--outdir", str(tmp_path / "b"), "--knn", "1"]) == 0
    assert main([*args, "--prompt", "a red circle on a white background", "--outdir", str(tmp_path / "c")]) == 0
    a = sorted((tmp_path / "a" / "samples").glob("*.png"))
    assert len(a) == 2 and (tmp_path / "a" / "grid-0000.png").exists()
    image, meta = pixels(a[0])
    assert image.shape == (16, 16, 3) and meta["query"] == "image:q.png" and meta["knn"] == "3"
    assert meta["seed"] == "42" and pixels(a[1])[1]["seed"] == "43" and meta["scale"] == "3.0"
    assert not np.array_equal(image, pixels(sorted((tmp_path / "b" / "samples").glob("*.png"))[0])[0])  # knn matters
    c_meta = pixels(sorted((tmp_path / "c" / "samples").glob("*.png"))[0])[1]
    assert c_meta["query"] == "a red circle on a white background"


def test_knn2img_takes_the_sampler_flags_of_txt2img(rdm_run, scripts, tmp_path, monkeypatch):
    run, _ = rdm_run
    main = scripts("knn2img").main
    args = ["-r", str(run.logdir), "--use_neighbors", "--knn", "2", "--scale", "3.0", "--prompt", "x", *BASE]
    seen = spy_sampling(monkeypatch)
    assert main([*args, *SAMPLER_FLAGS, "--outdir", str(tmp_path / "e")]) == 0
    assert_sampler_flags_reached(seen, pixels(tmp_path / "e" / "samples" / "00000.png")[1])
    assert main([*args, "--plms", "--outdir", str(tmp_path / "p")]) == 0  # the original's flag stays
    assert pixels(tmp_path / "p" / "samples" / "00000.png")[1]["sampler"] == "plms"


@pytest.mark.parametrize("case, message", [
    ("plms", "--sampler euler and --plms exclude each other"),
    ("knn", "--knn 999 must lie in [1, 64], the database size"),
    ("database", "--database: 'nowhere' is not a folder"),
    ("size", "--H 18 must be a positive multiple of 8"),
])
def test_knn2img_wrong_flags_are_one_error_line(rdm_run, scripts, tmp_path, capsys, case, message):
    run, _ = rdm_run
    extra = {"knn": ["--knn", "999"], "database": ["--database", "nowhere"], "size": ["--H", "18"],
             "plms": ["--sampler", "euler", "--plms"]}[case]
    argv = ["-r", str(run.logdir), "--use_neighbors", "--prompt", "x", *BASE, *extra, "--outdir", str(tmp_path / "o")]
    assert scripts("knn2img").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_published_rdm_config_builds_with_the_original_interface():
    """configs/retrieval-augmented-diffusion/768x768.yaml: its UNet at full size (on the meta device, 1.34B
    parameters), and the whole model (a LatentDiffusion with an Identity cond stage and a 16-channel f16 first
    stage) with a narrower UNet, reading a [B, 1 + k, 768] context as knn2img gives it."""
    config = OmegaConf.load(REPO / "configs" / "retrieval-augmented-diffusion" / "768x768.yaml")
    with torch.device("meta"):
        unet = instantiate_from_config(config.model.params.unet_config)
    assert 1.3e9 < sum(p.numel() for p in unet.parameters()) < 1.4e9
    config.model.params.unet_config.params.update(model_channels=32, num_head_channels=16, attention_resolutions=[4])
    config.model.params.first_stage_config.params.ddconfig.update(ch=32, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                                                                  attn_resolutions=[])
    model = instantiate_from_config(config.model).eval()
    with torch.no_grad():
        out = model.apply_model(torch.zeros(1, 16, 8, 8), torch.zeros(1, dtype=torch.long),
                                {"c_crossattn": [torch.zeros(1, 11, 768)]})
    assert out.shape == (1, 16, 8, 8) and model.cond_stage_key == "nix"
    assert type(model.cond_stage_model).__name__ == "Identity" and model.model.conditioning_key == "crossattn"
