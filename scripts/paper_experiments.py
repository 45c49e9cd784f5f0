"""The LDM paper's claims in miniature on the 5,000 MNIST digits (ldm.data.mnist), scored with ldm.evaluation.

    python scripts/paper_experiments.py compression   # Fig. 6: LDM-f1/2/4/8, FID against training time, images/s
    python scripts/paper_experiments.py guidance      # FID, precision, recall against the guidance scale
    python scripts/paper_experiments.py steps         # FID against steps for DDIM, PLMS, DPM-Solver++(2M)

`compression` trains the f = 2, 4, 8 autoencoders (configs/autoencoder/mnist-kl-f*.yaml, their fixed step
budget), then the class-conditional LDMs (configs/latent-diffusion/mnist-ldm-f*.yaml, one UNet for every f) for
the same training time each (main.py runs with `ldm.training.clock.TrainTimeCheckpoints`: a checkpoint every
--minutes / --checkpoints of training, validation excluded), and scores the EMA weights of every checkpoint.
`guidance` and `steps` take the last checkpoint of the f = 4 LDM (--run to choose another main.py run).

Every score draws --n samples with seeds --seed + i and the class labels of the first --n validation digits,
decoded to 32x32 RGB, and compares them with the first --n-real validation digits (statistics cached by the
evaluation library's stats cache): FID, KID and precision/recall on the Inception pool features (torch-fidelity,
the converted offline Inception weights). The "floor" (as many training digits against the same reference) is
scored once per experiment. Runs live under --workdir (main.py run directories; a finished run with the same
settings is reused); the table goes to <out>/<experiment>.json and .csv, the plot to <out>/<experiment>.png.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ldm import inference as inf  # noqa: E402
from ldm.evaluation.distributed import shard_batches  # noqa: E402
from ldm.evaluation.evaluator import Evaluator  # noqa: E402
from ldm.evaluation.fidelity import FidelityOptions  # noqa: E402
from ldm.evaluation.generation import SamplingSpec, conditions_from_dataset, generate  # noqa: E402
from ldm.evaluation.stats_cache import StatsCache, dataset_fingerprint, resize_mode  # noqa: E402
from ldm.util import atomic_path, instantiate_from_config  # noqa: E402

AE_CONFIG = "configs/autoencoder/mnist-kl-f{f}.yaml"
LDM_CONFIG = "configs/latent-diffusion/mnist-ldm-f{f}.yaml"
METRICS = ["fid", "kid", "prc"]
SETTINGS = "experiment.json"  # what a finished run was trained with, in its run directory


def get_parser() -> argparse.ArgumentParser:
    """One sub-command per experiment; shared sampling, scoring and output flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = argparse.ArgumentParser(add_help=False)
    add = shared.add_argument
    add("--workdir", default="logs/experiments", help="where the main.py runs live")
    add("--out", default="docs/experiments", help="where the tables (JSON, CSV) and plots (PNG) go")
    add("-n", "--n", type=int, default=300, help="samples per score (names carry it: fid@300)")
    add("--n-real", type=int, default=500, help="validation digits of the reference (at most 500)")
    add("--seed", type=int, default=0, help="sample i uses seed + i")
    add("--batch-size", type=int, default=50, help="samples per sampling batch")
    add("--threads", type=int, default=1, help="torch threads here and in the training runs")
    add("--feature-layer", default="2048", choices=("64", "192", "768", "2048"),
        help="Inception features the metrics use (2048: the usual ones; others are named, e.g. fid_d64)")
    add("--inception-weights", default=None, metavar="PATH", help="as scripts/evaluate.py's")
    add("--device", default="cpu", help="cpu or cuda")
    add("--run", default=None, help="guidance/steps: the main.py run of the model (default: the compression "
                                    "experiment's f = 4 LDM)")
    add("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="config overrides for every training run (e.g. tiny models in tests)")
    add("--ldm-overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for the LDM runs")
    sub = parser.add_subparsers(dest="experiment", required=True)
    comp = sub.add_parser("compression", parents=[shared], help="LDM-f at equal training time (Fig. 6)")
    comp.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    comp.add_argument("--autoencoder", action="append", default=[], metavar="F=RUN",
                      help="use this trained autoencoder run for factor F instead of training one")
    comp.add_argument("--train-only", action="store_true", help="train (or find) the runs, score nothing")
    comp.add_argument("--minutes", type=float, default=5.0, help="training time of every LDM")
    comp.add_argument("--checkpoints", type=int, default=3, help="checkpoints per LDM (equally spaced in time)")
    comp.add_argument("--score-last", type=int, default=None, metavar="K",
                      help="score only the last K checkpoints of each LDM (default: all)")
    comp.add_argument("--sampler", default="ddim")
    comp.add_argument("--steps", type=int, default=20)
    comp.add_argument("--scale", type=float, default=1.0)
    comp.set_defaults(n=200)  # 12 scores, LDM-1 samples slowly
    guide = sub.add_parser("guidance", parents=[shared], help="FID / precision / recall against guidance")
    guide.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    guide.add_argument("--sampler", default="ddim")
    guide.add_argument("--steps", type=int, default=20)
    steps = sub.add_parser("steps", parents=[shared], help="FID against sampling steps per sampler")
    steps.add_argument("--samplers", nargs="+", default=["ddim", "plms", "dpmpp_2m"])
    steps.add_argument("--step-counts", type=int, nargs="+", default=[5, 10, 20, 50])
    steps.add_argument("--scale", type=float, default=1.0)
    return parser


# ---- training through main.py ---------------------------------------------------------------------------------
def finished_run(workdir: Path, name: str, settings: dict) -> Path | None:
    """The newest run `<workdir>/<now>_<name>` that finished with these settings, else None."""
    for run in sorted(workdir.glob(f"*_{name}"), reverse=True):
        marker = run / SETTINGS
        if marker.is_file() and json.loads(marker.read_text()) == settings and (run / "checkpoints").is_dir():
            return run
    return None


def train(workdir: Path, name: str, config: str, overrides: Sequence[str], threads: int) -> Path:
    """A main.py training run (one at a time, `threads` threads); reused when one with the same settings exists."""
    settings = {"config": config, "overrides": list(overrides)}
    run = finished_run(workdir, name, settings)
    if run is not None:
        print(f"reusing {run}", flush=True)
        return run
    before = set(workdir.glob(f"*_{name}"))
    command = [sys.executable, str(REPO / "main.py"), "--base", config, "-t", "--no-test", "-l", str(workdir),
               "-n", name, *overrides]
    print("+ " + " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run(command, cwd=REPO, env=env)
    runs = sorted(set(workdir.glob(f"*_{name}")) - before)
    if done.returncode != 0 or not runs or not (runs[-1] / "checkpoints" / "last.ckpt").is_file():
        raise inf.ScriptError(f"training {name} ({config}) failed with exit status {done.returncode}")
    with atomic_path(runs[-1] / SETTINGS) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=1))
    return runs[-1]


def ema_first_stage(run: Path) -> Path:
    """The autoencoder's EMA weights as a safetensors file (scripts/prune_ckpt.py --ema), written once."""
    out = run / "checkpoints" / "last-ema-fp32.safetensors"
    if not out.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "prune_ckpt.py"), str(run / "checkpoints" /
                        "last.ckpt"), "--ema", "--dtype", "fp32"], cwd=REPO, check=True)
    return out


def given_autoencoders(items: Sequence[str]) -> dict[int, Path]:
    """--autoencoder F=RUN: {F: run directory with checkpoints/last.ckpt}."""
    given = {}
    for item in items:
        f, _, run = item.partition("=")
        if not f.isdigit() or not (Path(run) / "checkpoints" / "last.ckpt").is_file():
            raise inf.ScriptError(f"--autoencoder {item}: expected F=RUN, RUN a main.py run with checkpoints/last.ckpt")
        given[int(f)] = Path(run)
    return given


def train_compression(args: argparse.Namespace) -> dict[int, Path]:
    """Autoencoders, then the LDMs at equal training time; {f: LDM run}."""
    workdir = Path(args.workdir) / "compression"
    workdir.mkdir(parents=True, exist_ok=True)
    common = ["data.params.num_workers=0", *args.train_overrides]
    budget = args.minutes * 60.0
    timing = ["lightning.trainer.max_steps=100000000", "lightning.trainer.max_time=null",
              "lightning.callbacks.train_time_checkpoints.target=ldm.training.clock.TrainTimeCheckpoints",
              f"lightning.callbacks.train_time_checkpoints.params.every_seconds={budget / args.checkpoints}",
              f"lightning.callbacks.train_time_checkpoints.params.stop_after_seconds={budget}"]
    given = given_autoencoders(args.autoencoder)
    runs = {}
    for f in args.factors:
        overrides = [*timing, *common, *args.ldm_overrides]
        if f > 1:
            ae = given.get(f) or train(workdir, f"ae-f{f}", AE_CONFIG.format(f=f), common, args.threads)
            overrides.insert(0, f"model.params.first_stage_config.params.ckpt_path={ema_first_stage(ae)}")
        runs[f] = train(workdir, f"ldm-f{f}", LDM_CONFIG.format(f=f), overrides, args.threads)
    return runs


# ---- scoring ------------------------------------------------------------------------------------------------------
class Scorer:
    """Draws and scores samples of models against one reference: the first --n-real validation digits."""

    def __init__(self, args: argparse.Namespace, data_config: Any) -> None:
        self.args = args
        self.device = inf.pick_device(args.device)
        options = FidelityOptions(kid_subset_size=min(1000, args.n, args.n_real))
        self.ev = Evaluator(METRICS, args.inception_weights, device=self.device, batch_size=args.batch_size,
                            options=options, cache=StatsCache(), progress=False, feature_layer=args.feature_layer)
        self.data_config = data_config
        data = instantiate_from_config(data_config, path="data")
        data.setup()
        self.validation, self.train = data.datasets["validation"], data.datasets["train"]
        self.n_real = min(args.n_real, len(self.validation))
        batches, _ = shard_batches(self.n_real, args.batch_size)
        self.real = self.ev.real_statistics(
            lambda: self.ev.dataset_features(self.validation, batches, "image", "reference"),
            dataset_fingerprint(data_config.params.validation, "validation", len(self.validation)), self.n_real,
            resize_mode())

    def floor(self) -> dict[str, float]:
        """Training digits (as many as samples) against the reference: what a perfect model would score."""
        batches, _ = shard_batches(self.args.n, self.args.batch_size)
        train = self.ev.real_statistics(  # cached like the reference
            lambda: self.ev.dataset_features(self.train, batches, "image", "training digits"),
            dataset_fingerprint(self.data_config.params.train, "train", len(self.train)), self.args.n, resize_mode())
        return self.ev.generation_scores({self.ev.feature_layer: train.features}, self.real, self.args.n).values

    def score(self, model: Any, spec: SamplingSpec) -> dict[str, Any]:
        """--n samples of `model` by `spec` (seeds and labels fixed) -> metrics, and the sampling speed."""
        spec.check(model)
        n = self.args.n
        seeds = [self.args.seed + i for i in range(n)]
        conditions = conditions_from_dataset(model, self.validation, n, "validation data")
        batches, _ = shard_batches(n, self.args.batch_size)
        rows, seconds = [], 0.0
        for batch in batches:
            start = time.perf_counter()
            with torch.no_grad():
                images = generate(model, spec, [seeds[i] for i in batch],
                                  None if conditions is None else [conditions[i] for i in batch])
            seconds += time.perf_counter() - start
            rows.append(self.ev.extractor(images))
        features = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
        scores = self.ev.generation_scores(features, self.real, n).values
        return {**scores, "sample_seconds": seconds, "images_per_second": n / seconds}


def load_ldm(run: Path, ckpt: Path, device: torch.device) -> Any:
    """The run's LDM with its EMA weights from `ckpt`."""
    files = sorted(glob.glob(str(run / "configs" / "*-project.yaml")))
    if not files:
        raise inf.ScriptError(f"--run: {run} has no configs/*-project.yaml (not a main.py run directory)")
    _, model = inf.load_model(files, str(ckpt), device, use_ema=True)
    return model


def checkpoint_progress(ckpt: Path) -> tuple[int, float]:
    """(optimisation step, training seconds of the TrainClock) stored in a Lightning checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    seconds = next((float(value["train_seconds"]) for key, value in state.get("callbacks", {}).items()
                    if "TrainClock" in key), float("nan"))
    return int(state["global_step"]), seconds


def scored_checkpoints(run: Path) -> list[tuple[Path, int, float]]:
    """The run's equal-time checkpoints, and last.ckpt when it is later than all of them (Lightning rewrites it at
    epoch ends, so a run stopped by its time budget mid-epoch has an older last.ckpt), by step."""
    found = {}
    for ckpt in sorted((run / "checkpoints").glob("step=*-train-seconds=*.ckpt")):
        step, seconds = checkpoint_progress(ckpt)
        found[step] = (ckpt, step, seconds)
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        step, seconds = checkpoint_progress(last)
        if not found or step > max(found):
            found[step] = (last, step, seconds)
    return [found[step] for step in sorted(found)]


def final_checkpoint(run: Path) -> Path:
    """The run's latest checkpoint: its last equal-time one or last.ckpt, whichever has more steps."""
    return scored_checkpoints(run)[-1][0]


def default_run(args: argparse.Namespace) -> Path:
    """--run, else the newest f = 4 LDM run of the compression experiment."""
    if args.run:
        run = Path(args.run)
        if not (run / "checkpoints" / "last.ckpt").is_file():
            raise inf.ScriptError(f"--run: {run} has no checkpoints/last.ckpt")
        return run
    runs = sorted((Path(args.workdir) / "compression").glob("*_ldm-f4"))
    runs = [run for run in runs if (run / SETTINGS).is_file()]
    if not runs:
        raise inf.ScriptError(f"no trained f = 4 LDM under {args.workdir}/compression: run the compression "
                              "experiment first, or pass --run logs/<main.py run>")
    return runs[-1]


# ---- the experiments ------------------------------------------------------------------------------------------
def run_compression(args: argparse.Namespace) -> dict:
    """Train every f for the same time; score each checkpoint (the f alternate per checkpoint index)."""
    runs = train_compression(args)
    checkpoints = {f: scored_checkpoints(run)[-(args.score_last or 0):] for f, run in runs.items()}
    first = next(iter(runs.values()))
    scorer = Scorer(args, load_run_config(first).data)
    spec = SamplingSpec(args.sampler, args.steps, args.scale)
    rows = []
    for index in range(max(len(c) for c in checkpoints.values())):
        for f, found in checkpoints.items():
            if index < len(found):
                ckpt, step, seconds = found[index]
                model = load_ldm(runs[f], ckpt, scorer.device)
                row = {"f": f, "checkpoint": ckpt.name, "step": step, "train_seconds": round(seconds, 1),
                       **scorer.score(model, spec)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    speed = {f: statistics.median(r["images_per_second"] for r in rows if r["f"] == f) for f in runs}
    return {"rows": rows, "floor": scorer.floor(), "sampling": vars(spec), "images_per_second": speed,
            "runs": {f: str(run) for f, run in runs.items()}, "minutes": args.minutes, "checkpoints": args.checkpoints}


def score_one_model(args: argparse.Namespace, settings: Sequence[tuple[dict, SamplingSpec]]) -> dict:
    """The samples of one model (--run, else the compression experiment's LDM-4), scored per setting."""
    run = default_run(args)
    scorer = Scorer(args, load_run_config(run).data)
    ckpt = final_checkpoint(run)
    model = load_ldm(run, ckpt, scorer.device)
    rows = []
    for label, spec in settings:
        row = {**label, **scorer.score(model, spec)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"rows": rows, "floor": scorer.floor(), "run": str(run), "checkpoint": ckpt.name,
            "model_step": checkpoint_progress(ckpt)[0]}


def run_guidance(args: argparse.Namespace) -> dict:
    """One model, one sampler, several guidance scales."""
    record = score_one_model(args, [({"scale": scale}, SamplingSpec(args.sampler, args.steps, scale))
                                    for scale in args.scales])
    return {**record, "sampler": args.sampler, "steps": args.steps}


def run_steps(args: argparse.Namespace) -> dict:
    """One model, several samplers and step counts (the samplers alternate per step count)."""
    record = score_one_model(args, [({"sampler": sampler, "steps": steps}, SamplingSpec(sampler, steps, args.scale))
                                    for steps in args.step_counts for sampler in args.samplers])
    return {**record, "scale": args.scale}


def load_run_config(run: Path) -> Any:
    """The merged project config of a main.py run."""
    from omegaconf import OmegaConf

    files = sorted(glob.glob(str(run / "configs" / "*-project.yaml")))
    return OmegaConf.merge(*[OmegaConf.load(path) for path in files])


EXPERIMENTS = {"compression": run_compression, "guidance": run_guidance, "steps": run_steps}


# ---- tables and plots ---------------------------------------------------------------------------------------------
def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """The rows as CSV (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}
                     for row in rows)
    write_text(path, buffer.getvalue())


def names(args: argparse.Namespace) -> dict[str, str]:
    """The metric columns of this run's sample count and feature layer."""
    from ldm.evaluation.common import metric_name

    return {metric: metric_name(metric, args.n, "", args.feature_layer)
            for metric in ("fid", "kid", "precision", "recall")}


def markdown(args: argparse.Namespace, record: dict) -> str:
    """The rows as a Markdown table (the settings, then FID, KID, precision, recall and sampling speed)."""
    col = names(args)
    keys = {"compression": ["f", "step", "train_seconds"], "guidance": ["scale"], "steps": ["sampler", "steps"]}
    head = keys[args.experiment] + [col["fid"], col["kid"], col["precision"], col["recall"], "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in record["rows"]:
        values = [str(row[key]) for key in keys[args.experiment]]
        values += [f"{row[col['fid']]:.1f}", f"{row[col['kid']]:.3f}", f"{row[col['precision']]:.2f}",
                   f"{row[col['recall']]:.2f}", f"{row['images_per_second']:.2f}"]
        lines.append("| " + " | ".join(values) + " |")
    floor = record["floor"]
    lines.append("| floor (training digits) | " + " | ".join(
        [""] * (len(keys[args.experiment]) - 1) + [f"{floor[col['fid']]:.1f}", f"{floor[col['kid']]:.3f}",
                                                  f"{floor[col['precision']]:.2f}", f"{floor[col['recall']]:.2f}",
                                                  ""]) + " |")
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, record: dict, path: Path) -> None:
    """The experiment's figure as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col, rows = names(args), record["rows"]
    floor = record["floor"].get(col["fid"])
    if args.experiment == "compression":
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for f in sorted({r["f"] for r in rows}):
            mine = [r for r in rows if r["f"] == f]
            for ax, x in zip(axes[:2], ("step", "train_seconds")):
                ax.plot([r[x] for r in mine], [r[col["fid"]] for r in mine], "o-", label=f"LDM-{f}")
        axes[0].set(xlabel="training step", ylabel=col["fid"], xscale="log")
        axes[1].set(xlabel="training time (s)", ylabel=col["fid"])
        speed = record["images_per_second"]
        axes[2].bar([f"LDM-{f}" for f in speed], list(speed.values()), color="grey")
        axes[2].set(ylabel="images / s (1 thread)", yscale="log",
                    title=f"{record['sampling']['sampler']} {record['sampling']['steps']} steps")
    elif args.experiment == "guidance":
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        scales = [r["scale"] for r in rows]
        axes[0].plot(scales, [r[col["fid"]] for r in rows], "o-")
        axes[0].set(xlabel="guidance scale", ylabel=col["fid"])
        for metric in ("precision", "recall"):
            axes[1].plot(scales, [r[col[metric]] for r in rows], "o-", label=metric)
        axes[1].set(xlabel="guidance scale", ylim=(0, 1))
    else:
        fig, axes = plt.subplots(1, 1, figsize=(4.6, 3.4))
        axes = [axes]
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            mine = [r for r in rows if r["sampler"] == sampler]
            axes[0].plot([r["steps"] for r in mine], [r[col["fid"]] for r in mine], "o-", label=sampler)
        axes[0].set(xlabel="sampling steps", ylabel=col["fid"], xscale="log")
    if floor is not None:
        for ax in axes[: 1 if args.experiment != "compression" else 2]:
            ax.axhline(floor, color="k", lw=0.8, ls=":", label="floor (training digits)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def body(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Run one experiment, write its JSON, CSV and PNG, print its table."""
    for flag in ("n", "n_real", "batch_size", "threads"):
        if getattr(args, flag) < 2 - (flag in ("batch_size", "threads")):
            raise inf.ScriptError(f"--{flag.replace('_', '-')} is too small: {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    if getattr(args, "train_only", False):
        for f, run in train_compression(args).items():
            print(f"f = {f}: {run}")
        return
    start = time.perf_counter()
    record = EXPERIMENTS[args.experiment](args)
    record = {"experiment": args.experiment,
              "command": "python scripts/paper_experiments.py " + " ".join(argv),
              "n": args.n, "n_real": args.n_real, "seed": args.seed, "feature_layer": args.feature_layer,
              **record, "wall_seconds": round(time.perf_counter() - start, 1),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at the end"}
    out = Path(args.out)
    write_text(out / f"{args.experiment}.json", json.dumps(record, indent=1, default=str) + "\n")
    write_csv(out / f"{args.experiment}.csv", record["rows"])
    table = markdown(args, record)
    write_text(out / f"{args.experiment}.md", table)
    plot(args, record, out / f"{args.experiment}.png")
    print(table)
    print(f"wrote {out}/{args.experiment}.json, .csv, .md and .png in {record['wall_seconds']:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one `error: ...` line and exit status 2 for a user mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return inf.run_cli(get_parser(), lambda args: body(args, argv), argv)


if __name__ == "__main__":
    inf.configure_logging()
    sys.exit(main())
