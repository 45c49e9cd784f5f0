"""Train the nearest-neighbour searcher of a retrieval database (latent-diffusion's train_searcher.py, on faiss).

    python scripts/train_searcher.py -d data/rdm/retrieval_databases/openimages -t data/rdm/searchers/openimages -k 20
    python scripts/train_searcher.py --from-data configs/latent-diffusion/shapes-rdm.yaml --n_images 10000 \\
        -d data/rdm/retrieval_databases/shapes -t data/rdm/searchers/shapes

--database holds `.npz` files with `embedding` [N, D], `img_id` [N] and `patch_coords` [N, 4] (all files are joined).
With --from-data the database is first made: the first --n_images images of the config's training data embedded by
its model's retriever (model.params.retriever_config; else a CLIP named by --clip_type / --clip_ckpt) into
<database>/embeddings.npz. The searcher's tier follows the pool size as the original (brute force below 20k entries,
product quantisation with re-ranking below 100k, partitioned above; see ldm.modules.retrieval) and is written to
--target_path (index.faiss, searcher.json).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.models.diffusion.ddpm import images_bchw  # noqa: E402
from ldm.modules import retrieval  # noqa: E402
from ldm.training.config import load_config  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """The original flags (-d, -t, -k) plus --from-data and the retriever."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--database", "-d", default="data/rdm/retrieval_databases/openimages",
        help="folder with the CLIP embeddings of the database (.npz)")
    add("--target_path", "-t", default="data/rdm/searchers/openimages", help="folder the searcher is written to")
    add("--knn", "-k", type=int, default=20, help="number of nearest neighbours the searcher is tuned for")
    add("--from-data", dest="from_data", default=None, metavar="CONFIG",
        help="first embed the training data of this config into --database")
    add("--n_images", type=int, default=10000, help="with --from-data: how many images to embed")
    add("--batch_size", type=int, default=256, help="with --from-data: images per embedding batch")
    add("--clip_type", default=None, help="with --from-data and no retriever_config: the CLIP (e.g. ViT-L/14)")
    add("--clip_ckpt", default=None, help="that CLIP's weights file")
    add("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return parser


def retriever_of(config, args: argparse.Namespace) -> torch.nn.Module:
    """The model's retriever (model.params.retriever_config), or a CLIPRetriever from --clip_type / --clip_ckpt."""
    spec = config.get("model", {}).get("params", {}).get("retriever_config")
    if args.clip_type:
        return retrieval.CLIPRetriever(args.clip_type, args.clip_ckpt)
    if spec is None:
        raise inf.ScriptError(f"--from-data: '{args.from_data}' has no model.params.retriever_config; give "
                              "--clip_type (and --clip_ckpt)")
    return instantiate_from_config(spec)


def embed_data(args: argparse.Namespace) -> str:
    """Embed the first --n_images training images of --from-data's config into --database; returns the file."""
    config, _ = load_config([args.from_data], [])
    spec = config.get("data", {}).get("params", {}).get("train")
    if spec is None:
        raise inf.ScriptError(f"--from-data: '{args.from_data}' has no data.params.train dataset")
    dataset = instantiate_from_config(spec)
    key = config.model.params.get("retrieval_key") or config.model.params.get("first_stage_key", "image")
    n = min(args.n_images, len(dataset))
    if n < 1:
        raise inf.ScriptError(f"--n_images must be at least 1, got {args.n_images}")
    device = inf.pick_device(args.device)
    retriever = retriever_of(config, args).to(device)
    chunks = []
    for start in tqdm(range(0, n, args.batch_size), desc="Embedding"):
        images = np.stack([dataset[i][key] for i in range(start, min(start + args.batch_size, n))])
        chunks.append(retriever.encode_image(images_bchw(images).to(device)).cpu().numpy())
    path = retrieval.save_database(args.database, np.concatenate(chunks), img_id=np.arange(n))
    print(f"Embedded {n} images of '{args.from_data}' into {path}")
    return path


def train(args: argparse.Namespace) -> str:
    """(Embed, then) load the database, train the searcher and write it; returns the searcher folder."""
    if args.from_data:
        embed_data(args)
    try:
        pool = retrieval.load_database(args.database)
        index, info = retrieval.train_searcher(pool["embedding"], args.knn)
    except (FileNotFoundError, ValueError) as err:
        flag = "--knn" if "knn" in str(err) else "--database"
        raise inf.ScriptError(f"{flag}: {err}") from None
    retrieval.save_searcher(index, info, args.target_path)
    print(f"Trained a {info['kind']} searcher on {info['pool_size']} entries (k={args.knn}) into {args.target_path}")
    return args.target_path


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and train; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), train, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
