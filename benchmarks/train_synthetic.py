"""MR-CCL vs the challenge baseline on class-conditional synthetic features of the real dims.

Comparison mode (default) prints the WAF of the supervised baseline, the full method and each
ablation of the paper's Table 1 (the systems and settings of `merflow ablate`, on inputs
z-scored as the train flow's are). `--throughput` prints samples/s of pretraining, fine-tuning
and prediction on N rows of the real dimensions, and the peak memory.

    .venv/bin/python benchmarks/train_synthetic.py --scale 0.2 --unlabelled 4000 --hidden 64
    .venv/bin/python benchmarks/train_synthetic.py --throughput --rows 115595 --device cuda

The generator: each video has a latent emotion vector z (a class mode plus within-class
spread, some videos halfway between two classes) that every modality sees through its own
random projection, buried under modality-specific nuisance factors (speaker, lighting,
wording) and per-dimension noise; some visual and text inputs are missing. The modalities
agree only on z, which is what cross-modal contrastive learning can find without labels.

Here "w/o NEE" beats the full method, unlike in the paper: z is 5-12 % of an input's variance
and the rest (nuisance, per-dimension noise) is unique to each video, which is what L_intra,
telling a video from the others by a noisy copy of itself, teaches the encoders to keep.
The gap is not NEE's noise scale (it stays with beta_T = 0.002 instead of the paper's 0.1,
and with inputs z-scored or not); it shrinks as that share does (step 1 at dims / 8: 18 WAF
points with this generator, 8 with nuisance and noise at 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_contracts.labels import CLASSES, MER2024_TRAIN_COUNTS, MODALITIES
from flows.config import load_settings
from models.baseline import BaselineConfig, BaselineNet
from models.distributed import World, barrier, init_from_env, local_device, shutdown
from models.featureset import FeatureSet, as_index_tensor, take, to_tensors
from models.losses import baseline_loss, fine_tune_loss, pretrain_loss
from models.metrics import waf
from models.mrccl import MRCCL, PAPER_DIMS, MRCCLConfig
from models.recipe import recipe_from_settings
from models.selftrain import STEP1_TARGETS, STEP2_TARGETS
from models.settings import TrainSettings
from models.training import TrainConfig, fit, predict
from tasks.training.ablate_report import BASELINE, SYSTEMS, System
from tasks.training.data import TrainingData, zscore
from tasks.training.report import train_in_process
from tasks.training.steps import load_fold


@dataclass
class SynthConfig:
    """Difficulty knobs of the generator."""

    latent: int = 16  # dims of the shared emotion latent z
    modes_per_class: int = 3  # each class is a mixture of this many modes
    mode_spread: float = 0.8  # distance of the modes from their class centre
    within: float = 0.9  # within-mode spread of z
    ambiguous: float = 0.15  # share of videos halfway between their class and another
    nuisance_dims: int = 16  # modality-specific factors unrelated to emotion
    nuisance: float = 3.0  # their scale relative to the emotion signal
    noise: float = 2.5  # per-dimension noise
    signal: tuple[float, float, float] = (0.8, 1.0, 0.6)  # visual, acoustic, text strength
    missing_visual: float = 0.05
    missing_text: float = 0.08


def make_synthetic(
    counts: dict[str, int],
    n_unlabelled: int,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    synth: SynthConfig | None = None,
) -> tuple[FeatureSet, FeatureSet, np.ndarray]:
    """Labelled set with the given class counts, unlabelled pool of the same law, pool's truth."""
    dims = dims or dict(PAPER_DIMS)
    s = synth or SynthConfig()
    world = np.random.default_rng(seed)  # the fixed "world": class modes and projections
    centres = world.normal(size=(len(CLASSES), s.latent))
    modes = centres[:, None] + s.mode_spread * world.normal(
        size=(len(CLASSES), s.modes_per_class, s.latent)
    )
    proj = {m: world.normal(size=(s.latent, d)) / np.sqrt(s.latent) for m, d in dims.items()}
    nuis = {
        m: world.normal(size=(s.nuisance_dims, d)) / np.sqrt(s.nuisance_dims)
        for m, d in dims.items()
    }
    offset = {m: world.normal(size=d) for m, d in dims.items()}
    strength = dict(zip(MODALITIES, s.signal, strict=True))
    prior = np.array([counts[c] for c in CLASSES], dtype=float)

    def draw(labels: np.ndarray, rng: np.random.Generator, tag: str) -> FeatureSet:
        n = len(labels)
        z = modes[labels, rng.integers(0, s.modes_per_class, n)] + s.within * rng.normal(
            size=(n, s.latent)
        )
        other = rng.integers(0, len(CLASSES), n)
        mix = rng.random(n) < s.ambiguous
        z[mix] = (
            0.5 * z[mix] + 0.5 * modes[other[mix], rng.integers(0, s.modes_per_class, mix.sum())]
        )
        feats, present = {}, {}
        for m, d in dims.items():
            x = strength[m] * (z @ proj[m]) + offset[m]
            x += s.nuisance * (rng.normal(size=(n, s.nuisance_dims)) @ nuis[m])
            x += s.noise * rng.normal(size=(n, d))
            feats[m] = x.astype(np.float32)
            present[m] = np.ones(n, dtype=bool)
        present["visual"] = rng.random(n) >= s.missing_visual
        present["text"] = rng.random(n) >= s.missing_text
        present["acoustic"] |= ~(present["visual"] | present["text"])
        for m in MODALITIES:
            feats[m][~present[m]] = 0.0
        ids = np.array([f"{tag}_{i:08d}" for i in range(n)])
        return FeatureSet(ids, feats, present, labels)

    rng = np.random.default_rng(seed + 1)
    y = np.repeat(np.arange(len(CLASSES)), [counts[c] for c in CLASSES])
    rng.shuffle(y)
    labelled = draw(y, rng, "sample")
    y_unl = rng.choice(len(CLASSES), size=n_unlabelled, p=prior / prior.sum())
    unlabelled = draw(y_unl, rng, "unlabelled")
    hidden_truth = unlabelled.labels.copy()
    return labelled, unlabelled.with_labels(np.full(n_unlabelled, -1)), hidden_truth


def zscored(labelled: FeatureSet, unlabelled: FeatureSet) -> tuple[FeatureSet, FeatureSet]:
    """Both sets z-scored per modality over every present row with the train flow's own code
    (tasks/training/data.py zscore; train.standardize, docs/method.md §3)."""
    both = FeatureSet.concat([labelled, unlabelled])
    zscore(both.features, both.present)  # in place, on the concatenated copy
    n = len(labelled)
    return both.subset(np.arange(n)), both.subset(np.arange(n, len(both)))


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The train settings at the chosen size, as overrides of the paper profile; everything
    else is docs/method.md's."""
    scaled = [  # the paper's targets scaled with the labelled counts
        {c: round(n * args.scale) for c, n in targets.items()}
        for targets in (STEP1_TARGETS, STEP2_TARGETS)
    ]
    given = {
        "seed": args.seed,
        "device": args.device,
        "n_splits": args.folds,
        "hidden": args.hidden,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "n_tokens": args.tokens,
        "lr": args.lr,
        "lr_step2": args.lr / 2,
        "batch_size": args.batch,
        "max_epochs": args.max_epochs,  # the baseline's limit; MR-CCL steps use final_epochs
        "final_epochs": args.final_epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "lambda_con": args.lambda_con,
        "inner_val_fraction": args.inner_val,
        "oversample_step1": json.dumps(scaled[0]),
        "oversample_step2": json.dumps(scaled[1]),
    }
    return [f"train.{k}={v}" for k, v in given.items()]


def systems(overrides: list[str]) -> list[tuple[System, TrainSettings]]:
    """The runs of the paper's Table 1 (tasks/ablate_report.SYSTEMS, as `merflow ablate` runs
    them): each system's train settings, its switches applied over `overrides` the way the train
    flow applies overrides. The supervised baseline is trained inside every run that makes
    pseudo labels (its row of the run's report)."""
    # No MERFLOW_ environment: the benchmark's figures follow from its command line alone.
    return [(s, load_settings("paper", [*overrides, *s.overrides], env={}).train) for s in SYSTEMS]


def compare(args: argparse.Namespace) -> None:
    """Baseline, full method and each ablation on one synthetic corpus; prints a WAF table."""
    counts = {c: max(args.folds, round(n * args.scale)) for c, n in MER2024_TRAIN_COUNTS.items()}
    dims = dict(PAPER_DIMS) if not args.small_dims else {"visual": 96, "acoustic": 128, "text": 640}
    t0 = time.perf_counter()
    labelled, unlabelled, truth = make_synthetic(counts, args.unlabelled, args.seed, dims)
    print(
        f"data: {len(labelled)} labelled {counts}, {len(unlabelled)} unlabelled, dims {dims} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    only = {int(i) for i in args.only.split(",")} if args.only else None
    runs = systems(bench_overrides(args))
    if runs[0][1].standardize:  # the train flow's inputs are z-scored before any step
        labelled, unlabelled = zscored(labelled, unlabelled)
    data = TrainingData(labelled, unlabelled, extractor_ids={m: "synthetic" for m in MODALITIES})
    work = Path(tempfile.mkdtemp(prefix="train-synthetic-"))
    rows = []
    for i, (system, ts) in enumerate(runs):
        if only is not None and i not in only:
            continue
        name, cfg = system.label, recipe_from_settings(ts, dims)  # the train flow's recipe
        t = time.perf_counter()
        run_dir = work / f"run-{i}"
        s = train_in_process(run_dir, data, cfg)  # the steps the train flow runs
        # The pool's hidden truth plays MER-SEMI's test set (which is inside the unlabelled pool).
        pool = sum(load_fold(run_dir / f"fold-{k}")[1]["test_voted"] for k in range(cfg.n_splits))
        pool_waf = waf(truth, pool.argmax(1))
        seconds = time.perf_counter() - t
        rows.append({"system": name, **s, "pool_waf": pool_waf, "seconds": seconds})
        folds = [round(100 * w, 2) for w in s["fold_waf"]]
        print(
            f"{name:40s} CV WAF {100 * s['mean_waf']:6.2f}  pool WAF {100 * pool_waf:6.2f}  "
            f"folds {folds}  ({seconds:.0f} s)",
            flush=True,
        )
        if "baseline" in s["rows"]:
            # Table 1's baseline row is the full method's; the other runs train their own.
            label = BASELINE.label if system.name == "full" else "  its baseline"
            print(f"{label:40s} CV WAF {100 * s['rows']['baseline']['mean']:6.2f}")
        if any(sum(p.values()) for p in s["pseudo_counts"]):
            mean = {c: round(float(np.mean([p[c] for p in s["pseudo_counts"]]))) for c in CLASSES}
            print(f"{'':40s} pseudo labels per fold (mean): {mean}", flush=True)
    if rows:
        ref = rows[0]["rows"]
        print(
            f"{'reference: guess by class mix':40s} CV WAF "
            f"{100 * ref['class_prior']['mean']:6.2f}; majority class "
            f"{100 * ref['majority']['mean']:6.2f}"
        )
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(args: argparse.Namespace) -> None:
    """Samples/s of one pretraining epoch, one fine-tuning epoch and prediction on N rows.

    Under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node K
    benchmarks/train_synthetic.py --throughput ...`) the K ranks share every batch (DDP) and
    the figures are for the whole job; rank 0 prints them.
    """
    w = World()
    if "RANK" in os.environ:
        w = init_from_env("auto", args.device)
        args.device = local_device(args.device, w)
    say = print if w.main else (lambda *a, **k: None)
    n, cuda = args.rows, args.device.startswith("cuda")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    feats = {m: rng.standard_normal((n, d), dtype=np.float32) for m, d in PAPER_DIMS.items()}
    present = {m: np.ones(n, dtype=bool) for m in MODALITIES}
    data = FeatureSet(np.array([f"v{i}" for i in range(n)]), feats, present, rng.integers(0, 6, n))
    gib = sum(f.nbytes for f in feats.values()) / 2**30
    say(f"{n} rows of dims {PAPER_DIMS} ({gib:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    cfg = TrainConfig(batch_size=args.batch, max_epochs=1, device=args.device, seed=args.seed)
    mcfg = MRCCLConfig(
        hidden=args.hidden, n_layers=args.layers, n_heads=args.heads, n_tokens=args.tokens
    )
    model = MRCCL(mcfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    say(
        f"{w.size} process(es), device {args.device}, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch} (global); "
        f"MR-CCL hidden {mcfg.hidden}, {mcfg.n_layers} layers, {mcfg.n_tokens} tokens: "
        f"{params:.2f} M parameters"
    )
    val = data.subset(np.arange(min(n, 512)))

    def timed(label: str, fn: Callable[[], object]) -> None:
        barrier(w)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        barrier(w)
        dt = time.perf_counter() - t
        say(f"{label:42s} {n / dt:9.0f} samples/s  ({n} rows in {dt:.1f} s)", flush=True)

    step_rates(args, mcfg, data, say)
    if args.no_epochs:
        return
    tune = functools.partial(fine_tune_loss, lambda_con=cfg.lambda_con)
    timed("MR-CCL pretraining epoch", lambda: fit(model, data, cfg, pretrain_loss, "pretrain", 1))
    timed(
        "MR-CCL fine-tuning epoch (+512 val rows)",
        lambda: fit(model, data, cfg, tune, "fine-tune", stop=val),
    )
    timed("MR-CCL prediction", lambda: predict(model, data, cfg.eval_batch_size))
    base = BaselineNet(BaselineConfig(hidden=args.hidden))
    timed(
        "baseline training epoch (+512 val rows)",
        lambda: fit(base, data, cfg, baseline_loss, "baseline", stop=val),
    )
    say(f"peak RSS {peak_rss_gib():.2f} GiB (rank 0)")
    if cuda:
        say(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def step_rates(args: argparse.Namespace, mcfg: MRCCLConfig, data: FeatureSet, say) -> None:
    """Samples/s of one training step on one batch of `args.batch` rows: merflow's pretraining
    and fine-tuning steps and, with `--authors DIR`, the authors' model's step (their forward
    in training mode: both views, contrastive + CE loss). `args.steps` rounds, the models
    taking turns within each round so that a busy machine slows all of them alike; the median
    round counts."""
    rows = np.arange(min(args.batch, len(data)))
    batch = take(to_tensors(data.subset(rows)), as_index_tensor(rows, "cpu")).to(args.device)
    torch.manual_seed(args.seed)
    steps: dict[str, Callable[[], float]] = {}
    for name, loss_fn in (("pretraining", pretrain_loss), ("fine-tuning", fine_tune_loss)):
        model = MRCCL(mcfg).to(args.device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

        def step(model=model, optimizer=optimizer, loss_fn=loss_fn) -> float:
            loss, _ = loss_fn(model, batch, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss)

        steps[f"merflow {name} step"] = step
    if args.authors:
        # Beside this script: it runs as a file, not from an installed package.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from authors_model import authors_step, load_authors_model

        authors = load_authors_model(
            args.authors, PAPER_DIMS, args.hidden, args.layers, args.heads, mcfg.dropout
        )
        steps["authors' model step (CONTRASTIVE)"] = authors_step(
            authors, batch.features, batch.labels, args.lr
        )
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.steps):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            seconds[k].append(time.perf_counter() - t)
    rate = {k: len(rows) / float(np.median(v)) for k, v in seconds.items()}
    for k, r in rate.items():
        say(f"{k:42s} {r:9.1f} samples/s  (batch {len(rows)}, median of {args.steps})")
    theirs = rate.get("authors' model step (CONTRASTIVE)")
    if theirs:
        for k in ("merflow fine-tuning step", "merflow pretraining step"):
            say(f"{k} / authors' step: {rate[k] / theirs:.2f}x")


def main() -> None:
    """Parse arguments and run the chosen mode."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--throughput", action="store_true", help="measure samples/s and memory instead")
    p.add_argument("--rows", type=int, default=115595, help="throughput: rows of real dims")
    p.add_argument(
        "--scale", type=float, default=1.0, help="labelled counts x this (and oversampling targets)"
    )
    p.add_argument("--unlabelled", type=int, default=20000)
    p.add_argument("--small-dims", action="store_true", help="dims / 8, for quick checks")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--max-epochs", type=int, default=40, help="baseline: at most this many epochs")
    p.add_argument("--final-epochs", type=int, default=20, help="MR-CCL step 1 and step 2 limit")
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--lambda-con", type=float, default=1.0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--authors",
        default="",
        help="throughput: the models/ folder of a LOCAL copy of WooyoohL/MER2024-SEMI, to time "
        "the authors' model's step beside merflow's (benchmarks/authors_model.py)",
    )
    p.add_argument("--steps", type=int, default=3, help="throughput: timed rounds of one step")
    p.add_argument("--no-epochs", action="store_true", help="throughput: time the steps only")
    p.add_argument("--only", default="", help="comma list of run numbers 0-4 to run")
    p.add_argument(
        "--inner-val", type=float, default=0.15, help="share of a fold's rows for early stopping"
    )
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (throughput if args.throughput else compare)(args)
    shutdown()


if __name__ == "__main__":
    main()
