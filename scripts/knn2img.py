"""Retrieval-augmented sampling (latent-diffusion's knn2img.py): a text prompt or an image is embedded with CLIP,
optionally joined by its nearest neighbours in a retrieval database, and that context conditions an RDM.

    python scripts/knn2img.py --prompt "a happy bear reading a newspaper, oil on canvas" --use_neighbors --knn 10 \\
        --database artbench-surrealism --clip_type ViT-L/14 --clip_ckpt ViT-L-14.pt       # the published RDM
    python scripts/knn2img.py -r logs/<shapes-rdm run> --query-img shape.png --use_neighbors --knn 4 --H 16 --W 16

The context is [query embedding x --n_repeat, the --knn neighbours' embeddings (with --use_neighbors)], each unit
norm; guidance (--scale) against a zero context, as the original. The CLIP is the model's own retriever (an
RetrievalAugmentedDiffusion run) or --clip_type with --clip_ckpt (a plain LatentDiffusion such as
configs/retrieval-augmented-diffusion/768x768.yaml). --database is a folder of embeddings (.npz) or one of the
original's names (data/rdm/retrieval_databases/<name>, its searcher in data/rdm/searchers/<name>); an RDM run's own
database is the default. Outputs as txt2img.py: <outdir>/samples/NNNNN.png with metadata and grid-NNNN.png.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.pipelines import SampledTask, Samples, _decoded  # noqa: E402

DATABASES = ["openimages", "artbench-art_nouveau", "artbench-baroque", "artbench-expressionism",
             "artbench-impressionism", "artbench-post_impressionism", "artbench-realism", "artbench-romanticism",
             "artbench-renaissance", "artbench-surrealism", "artbench-ukiyo_e"]
DEFAULT_CONFIG = "configs/retrieval-augmented-diffusion/768x768.yaml"
DEFAULT_CKPT = "models/rdm/rdm768x768/model.ckpt"


def get_parser() -> argparse.ArgumentParser:
    """The original flags plus --query-img, --searcher, --clip_ckpt, --seed and the model flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inf.add_prompt_flags(parser, outdir="outputs/txt2img-samples")
    add = parser.add_argument
    add("--query-img", dest="query_img", nargs="+", default=None, help="image queries instead of the prompt")
    add("--n_repeat", type=int, default=1, help="number of repeats in CLIP latent space")
    inf.add_sampler_flags(parser)
    add("--H", type=int, default=768, help="image height in pixels")
    add("--W", type=int, default=768, help="image width in pixels")
    add("--clip_type", default="ViT-L/14", help="the CLIP for queries and neighbours (when the model has none)")
    add("--clip_ckpt", default=None, help="that CLIP's weights file (default: OpenAI's cache)")
    add("--database", default=None, help="a folder of embeddings or an original database name")
    add("--searcher", default=None, help="the searcher folder (default: data/rdm/searchers/<name>, else brute force)")
    add("--use_neighbors", action="store_true", help="include neighbours in addition to the query")
    add("--knn", type=int, default=10, help="the number of neighbours, with --use_neighbors")
    inf.add_sampling_flags(parser, n_iter=1, n_samples=3, scale=5.0)
    inf.add_model_flags(parser, DEFAULT_CONFIG, DEFAULT_CKPT)
    return parser


def database_paths(args: argparse.Namespace, model: object) -> tuple[str, str | None]:
    """(database folder, searcher folder or None) from --database / --searcher or the model's own."""
    name = args.database
    if name is None:
        name = getattr(model, "database_path", None)
        searcher = args.searcher or getattr(model, "searcher_path", None)
        if name is None:
            raise inf.ScriptError("--use_neighbors: give --database (the model names no retrieval database)")
    elif not os.path.isdir(name) and name in DATABASES:
        name, searcher = f"data/rdm/retrieval_databases/{name}", args.searcher or f"data/rdm/searchers/{name}"
    else:
        searcher = args.searcher
    if not os.path.isdir(name):
        raise inf.ScriptError(f"--database: '{name}' is not a folder (nor one of {', '.join(DATABASES)})")
    if searcher is not None and not os.path.isdir(searcher):
        raise inf.ScriptError(f"--searcher: '{searcher}' is not a folder; train one with scripts/train_searcher.py")
    return name, searcher


class Knn2Img:
    """One batch of queries -> contexts (query embedding repeated, neighbours) -> guided samples with per-sample
    seeds."""

    def __init__(self, args: argparse.Namespace, model: object, ckpt: str):
        from ldm.modules.retrieval import CLIPRetriever, Searcher

        self.args, self.model, self.ckpt = args, model, ckpt
        self.retriever = getattr(model, "retriever", None) or CLIPRetriever(args.clip_type, args.clip_ckpt).to(
            model.device)
        self.searcher = None
        if args.use_neighbors:
            try:
                self.searcher = Searcher(*database_paths(args, model))
            except (FileNotFoundError, ValueError) as err:
                raise inf.ScriptError(f"--database: {err}") from None
            if not 1 <= args.knn <= len(self.searcher):
                raise inf.ScriptError(f"--knn {args.knn} must lie in [1, {len(self.searcher)}], the database size")
        name = inf.sampler_name(args)
        inf.check_size(args.H, args.W, inf.image_multiple(model))
        self.job = SampledTask(model, ckpt, steps=args.steps, scale=args.scale, eta=inf.sampler_eta(args, name),
                               sampler=name, spacing=args.spacing, guidance_rescale=args.guidance_rescale,
                               precision=args.precision)
        self.job.prepare_sampler()
        factor = inf.first_stage_factor(model)
        self.shape = (model.channels, args.H // factor, args.W // factor)

    def context(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, n_repeat (+ knn), D]: the query embeddings repeated, then their neighbours' embeddings."""
        c = queries[:, None].repeat(1, self.args.n_repeat, 1)
        if self.searcher is not None:
            nn = torch.from_numpy(self.searcher(queries, self.args.knn)["nn_embeddings"]).to(c)
            c = torch.cat([c, nn], dim=1)
        return c.to(self.model.device)

    def __call__(self, queries: torch.Tensor, labels: Sequence[str], seeds: Sequence[int]) -> Samples:
        """Samples for unit-norm query embeddings [B, D], query i with seeds[i]; `labels` name them in metadata."""
        args = self.args
        with self.job.context():
            c = self.context(queries)
            uc = torch.zeros_like(c) if args.scale != 1.0 else None
            images = _decoded(self.model, self.job.sample(c, uc, self.shape, seeds))
        meta = dict(**self.job.sampler_metadata(), n_repeat=args.n_repeat,
                    knn=args.knn if self.searcher is not None else 0, checkpoint=self.job.label)
        return Samples(images, [inf.sample_metadata(query=q, seed=s, **meta) for q, s in zip(labels, seeds)])


def generate(args: argparse.Namespace) -> list[str]:
    """Sample every query n_iter times; returns the written paths."""
    inf.check_counts(args)
    model, _, ckpt = inf.load_from_args(args)
    job = Knn2Img(args, model, ckpt)
    if args.query_img:
        images = [inf.image_to_tensor(inf.read_image(p, "--query-img"), model.device) for p in args.query_img]
        if len({tuple(x.shape) for x in images}) > 1:
            images = [torch.nn.functional.interpolate(x, size=images[0].shape[-2:], mode="bicubic") for x in images]
        with torch.no_grad():
            embedded = job.retriever.encode_image(torch.cat(images))
        queries = [(f"image:{os.path.basename(p)}", e) for p, e in zip(args.query_img, embedded)]
    else:
        prompts = inf.read_prompt_flags(args)
        with torch.no_grad():
            queries = list(zip(prompts, job.retriever.encode_text(prompts)))
    by_label = dict(queries)

    def sample_batch(labels: list[str], seeds: list[int]) -> Samples:
        return job(torch.stack([by_label[label] for label in labels]), labels, seeds)

    inf.seed_everything(args.seed)
    with model.ema_scope():
        written = inf.sample_prompts(args, [label for label, _ in queries], sample_batch)
    print(f"Your samples are ready and waiting for you here:\n{args.outdir}\nEnjoy.")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and sample; user mistakes print one line and return 2."""
    return inf.run_cli(get_parser(), generate, argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
