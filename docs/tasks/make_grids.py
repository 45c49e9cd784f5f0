"""The README's task grids (docs/tasks/*.png) from short shapes runs, drawn by the task scripts themselves.

    OMP_NUM_THREADS=1 python docs/tasks/make_grids.py --layout2img logs/<run> --semantic logs/<run> --sr logs/<run> \\
        --rdm logs/<run> --depth2img logs/<run> --unclip logs/<run> [--out docs/tasks]

Every run is optional (only the grids of the runs given are written). Each grid's rows are built from the PNGs the
script wrote (scripts/sample_conditional.py, knn2img.py, depth2img.py, unclip.py; the super-resolution notebook's
patch-wise sampling for --sr), validation inputs of the built-in data, seeds 0, 1, 2, ... per row, DDIM 50 steps,
EMA weights, enlarged 4x (nearest neighbour).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm import inference as inf  # noqa: E402
from ldm.data.shapes import ShapesDataset, ShapesScenesValidation, ShapesTrain, ShapesValidation  # noqa: E402

ZOOM = 4
ROWS = 3


def script(name: str):
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list) -> None:
    """Run a script's main; a non-zero exit is an error."""
    if script(name).main([str(a) for a in argv]) != 0:
        raise SystemExit(f"scripts/{name}.py {' '.join(map(str, argv))} failed")


def tensor(path: Path) -> torch.Tensor:
    """A PNG as (3, H, W) in [-1, 1]."""
    with Image.open(path) as image:
        return inf.image_to_tensor(image.convert("RGB"), torch.device("cpu"))[0]


def to_png(array: np.ndarray, path: Path, mode: str = "RGB") -> Path:
    """A model array in [-1, 1] (HWC) or a [0, 1] map (HW, mode L) as a PNG."""
    scale = (array + 1.0) * 127.5 if mode == "RGB" else array * 255.0
    Image.fromarray(np.round(scale).clip(0, 255).astype(np.uint8), mode=mode).save(path)
    return path


def save_grid(rows: list[list[torch.Tensor]], path: Path) -> None:
    """Rows of equally sized images, 2-pixel gaps, enlarged ZOOM times."""
    enlarged(inf.grid_image(torch.stack([image for row in rows for image in row]), nrow=len(rows[0])), path)


def enlarged(grid: Image.Image, path: Path) -> None:
    """A grid enlarged ZOOM times (nearest neighbour), written atomically."""
    inf.save_png(grid.convert("RGB").resize((grid.width * ZOOM, grid.height * ZOOM), Image.Resampling.NEAREST), path,
                 {})
    print(f"wrote {path}")


def samples(folder: Path) -> list[torch.Tensor]:
    """The images a script wrote to <folder>/samples, in order."""
    return [tensor(p) for p in sorted((folder / "samples").glob("*.png"))]


def map_grid(run: str, out: Path, tmp: Path) -> None:
    """Layout or semantic: the script's own grid (the input drawn, then 4 samples) for 6 validation inputs."""
    run_script("sample_conditional", ["-r", run, "--from-data", 6, "--n_samples", 4, "--ema", "--seed", 42,
                                      "--outdir", tmp])
    with Image.open(tmp / "grid-0000.png") as grid:
        enlarged(grid, out)


def depth_grid(run: str, out: Path, tmp: Path) -> None:
    """A validation scene, its depth, 3 samples at strength 1 from that depth and the scene's caption."""
    rows, data = [], ShapesScenesValidation(size=16, length=ROWS)
    for i in range(ROWS):
        example = data[i]
        scene = to_png(example["image"], tmp / f"scene{i}.png")
        depth = to_png(example["depth"][0], tmp / f"depth{i}.png", mode="L")
        run_script("depth2img", ["-r", run, "--init-img", scene, "--depth-img", depth, "--prompt", example["caption"],
                                 "--strength", 1.0, "--scale", 3.0, "--n_samples", 3, "--seed", i, "--ema",
                                 "--outdir", tmp / f"d{i}"])
        rows.append([tensor(scene), tensor(depth), *samples(tmp / f"d{i}")])
    save_grid(rows, out)


def unclip_grid(run: str, out: Path, tmp: Path) -> None:
    """A validation shape, then 3 variations (empty prompt, noise level 0)."""
    rows, data = [], ShapesValidation(size=16, length=ROWS)
    for i in range(ROWS):
        image = to_png(data[i]["image"], tmp / f"shape{i}.png")
        run_script("unclip", ["-r", run, "--init-img", image, "--noise_level", 0, "--scale", 3.0, "--n_samples", 3,
                              "--H", 16, "--W", 16, "--seed", i, "--ema", "--outdir", tmp / f"u{i}"])
        rows.append([tensor(image), *samples(tmp / f"u{i}")])
    save_grid(rows, out)


def rdm_grid(run: str, out: Path, tmp: Path) -> None:
    """An image query, its 4 neighbours in the run's database (the training shapes it embeds), 3 samples."""
    from ldm.modules.retrieval import Searcher

    files, ckpt = inf.resolve_model_files(None, None, run)
    _, model = inf.load_model(files, ckpt, torch.device("cpu"), use_ema=True)
    searcher = Searcher(model.database_path, model.searcher_path)
    database = ShapesTrain(size=16, length=len(searcher))  # train_searcher --from-data embeds these, in order
    rows, data = [], ShapesValidation(size=16, length=ROWS)
    for i in range(ROWS):
        query = to_png(data[i]["image"], tmp / f"query{i}.png")
        with torch.no_grad():
            embedded = model.retriever.encode_image(tensor(query)[None])
        neighbours = [torch.from_numpy(database[int(j)]["image"]).permute(2, 0, 1)
                      for j in searcher.search(embedded, 4)["img_ids"][0]]
        run_script("knn2img", ["-r", run, "--query-img", query, "--use_neighbors", "--knn", 4, "--H", 16, "--W", 16,
                               "--scale", 3.0, "--n_samples", 3, "--seed", i, "--ema", "--outdir", tmp / f"r{i}"])
        rows.append([tensor(query), *neighbours, *samples(tmp / f"r{i}")])
    save_grid(rows, out)


def sr_grid(run: str, out: Path) -> None:
    """An 8x8 input (nearest, at 32x32), the 32x32 result of the whole 8x8 latent, the result with 4x4 latent patches
    2 apart (the superresolution notebook's split_input_params), the 32x32 original."""
    from ldm.models.diffusion.ddim import DDIMSampler

    files, ckpt = inf.resolve_model_files(None, None, run)
    _, model = inf.load_model(files, ckpt, torch.device("cpu"), use_ema=True)
    factor, ks = inf.first_stage_factor(model), int(model.image_size)
    patches = {"ks": (ks, ks), "stride": (ks // 2, ks // 2), "vqf": factor, "patch_distributed_vq": True,
               "tie_braker": False, "clip_max_weight": 0.5, "clip_min_weight": 0.01, "clip_max_tie_weight": 0.5,
               "clip_min_tie_weight": 0.01}
    rows = []
    for i in range(ROWS):
        example = ShapesDataset(size=2 * ks * factor, length=ROWS, seed=0, split="validation")[i]
        high = torch.from_numpy(example["image"]).permute(2, 0, 1)[None]
        low = F.interpolate(high, scale_factor=1 / 4, mode="bicubic", antialias=True).clamp(-1, 1)
        row = [F.interpolate(low, size=high.shape[-2:], mode="nearest")[0]]
        for split in (False, True):
            if split:
                model.split_input_params = patches
            elif hasattr(model, "split_input_params"):
                del model.split_input_params
            with torch.no_grad():
                c = model.get_learned_conditioning(low)
                z, _ = DDIMSampler(model).sample(S=50, batch_size=1, shape=(model.channels, *c.shape[-2:]),
                                                 conditioning={"concat": c}, eta=1.0, verbose=False, seeds=[i])
                row.append(model.decode_first_stage(z).clamp(-1, 1)[0])
        rows.append([*row, high[0]])
    save_grid(rows, out)


def main(argv: list[str] | None = None) -> int:
    """Write the grids of the runs given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("layout2img", "semantic", "sr", "rdm", "depth2img", "unclip"):
        parser.add_argument(f"--{name}", default=None, help=f"the shapes-{name} run (logs/<run>)")
    parser.add_argument("--out", default=str(REPO / "docs" / "tasks"), help="folder of the grids")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, make in (("layout2img", map_grid), ("semantic", map_grid), ("depth2img", depth_grid),
                           ("unclip", unclip_grid), ("rdm", rdm_grid)):
            if getattr(args, name):
                (tmp / name).mkdir()
                make(getattr(args, name), out / f"{name}.png", tmp / name)
        if args.sr:
            sr_grid(args.sr, out / "superres.png")
    return 0


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
