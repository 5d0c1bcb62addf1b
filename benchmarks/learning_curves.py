"""Learning curves: the full method, MR-CCL step 1 and the baseline against the labelled count.

On the class-conditional synthetic features of benchmarks/train_synthetic.py (its generator, its
z-scoring, the train flow's settings path and steps), for each number of labelled clips (MER2024's
class mix, `--unlabelled-ratio` times as many unlabelled clips of the same law) this trains one
run of the recipe (models/recipe.py through tasks/training/steps.py's steps, as `train_in_process`
does) and reads from it, per fold:

- full method: voted, after step 2 (the fold's final model);
- step 1: MR-CCL step 1, voted (before the pseudo labels);
- F: the fused classifier of the final model;
- baseline (recipe): the challenge baseline the recipe trains for pseudo labels, on the
  oversampled fit rows (merflow's; its "baseline (merflow inputs)" row);
- baseline (no oversampling): `BaselineNet` trained by `train_baseline` on the same fold's
  un-oversampled fit rows with the fold's seed and early-stopping rows (the paper's Table 3
  baseline trains without oversampling);
- logreg: scikit-learn logistic regression (L2, C = `--logreg-c`) on the concatenated z-scored
  inputs plus the presence flags, fitted on the fold's training rows;
- pseudo labels: counts per class and their accuracy against the generator's hidden truth.

Then the fine-tuning weight of the contrastive terms (`train.lambda_con`) at `--lambda-sizes`:
the same runs with only lambda_con changed (they share the pretraining, which does not read it).

Every phase is timed the same way (wall seconds of its own work; a pretraining shared by the
lambda runs is counted once, where it was trained) and printed as it ends, with the epoch lines
of the training loops in between. Output: a table on stdout, `curves.json` and `curves.png` in
`--out`.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/learning_curves.py --threads 1 \\
        --sizes 300,600,1200,2500 --lambda-sizes 600 --out /tmp/curves

Measured (2026-12-03, 2 CPU cores shared with other jobs, 42 min) with

    PYTHONPATH=$PWD .venv/bin/python benchmarks/learning_curves.py --threads 1 --batch 32 \
        --sizes 300,600,1200,2500,5000 --lambda-sizes 600 --lambdas 1.0,0.3,0.1,0 --out OUT

the demo profile's train section (hidden 32, 4 tokens, 2 heads, lr 2e-3 / 1e-3, 5 pretraining,
20 + 20 fine-tuning and 30 baseline epochs, no early stopping, 3 folds) except batch 32 instead
of 8 (batch 8 costs 3x the time), oversampling targets 850 / 1000 x n / 5030, one seed, 3x
unlabelled. WAF %, mean of 3 folds (fold std 3-6 points at n <= 600, <= 1 from 1200 on):

    n                        300   600  1200  2500  5000
    full method (step 2)    85.9  84.4  89.5  90.2  92.2
    MR-CCL step 1           84.9  83.9  88.9  90.9  92.0
    baseline (recipe, OS)   80.9  88.3  89.6  89.7  90.8
    baseline (no OS)        78.5  84.9  88.6  90.8  90.9
    logistic regression     79.7  84.6  88.9  91.2  92.3

At n = 600, lambda_con 1 / 0.3 / 0.1 / 0: full 84.4 / 85.6 / 87.1 / 88.4 (on the 1800-clip pool
85.8 / 87.5 / 88.9 / 90.3). Pseudo labels are 94-98 % right, but at lambda_con 1 and n <= 600
they are 73-90 % happy + worried (31-33 % of the pool): MR-CCL rarely reaches the 0.99 that its
preferred classes (neutral, angry, sad) need. Every system ends at this generator's ceiling
(~92, set by its ambiguous videos), where logistic regression is as good as anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from train_synthetic import make_synthetic, zscored

from data_contracts.labels import CLASSES, MER2024_TRAIN_COUNTS, MODALITIES
from flows.config import load_settings
from models import training
from models.baseline import BaselineNet
from models.losses import baseline_loss
from models.metrics import reference_wafs, waf
from models.mrccl import PAPER_DIMS
from models.recipe import RecipeConfig, _fold_cfg, recipe_from_settings
from models.selftrain import STEP1_TARGETS, STEP2_TARGETS
from models.training import predict
from tasks.training.data import TrainingData
from tasks.training.steps import freeze_run, load_fold, run_step, step_names

MER_TOTAL = sum(MER2024_TRAIN_COUNTS.values())
SYSTEMS = [
    ("full", "full method (voted, step 2)"),
    ("step1", "MR-CCL step 1 (voted)"),
    ("F", "fused classifier F (final)"),
    ("baseline", "baseline (recipe, oversampled)"),
    ("baseline_noos", "baseline (no oversampling)"),
    ("logreg", "logistic regression"),
    ("prior", "reference: guess by class mix"),
]
T0 = time.perf_counter()


def say(text: str) -> None:
    """A progress line with the time since the start."""
    print(f"[{time.perf_counter() - T0:7.0f} s] {text}", flush=True)


def class_counts(n: int, folds: int) -> dict[str, int]:
    """n labelled clips in MER2024's class mix (each class at least `folds` rows)."""
    return {c: max(folds, round(k * n / MER_TOTAL)) for c, k in MER2024_TRAIN_COUNTS.items()}


def overrides(args: argparse.Namespace, n: int, seed: int, lambda_con: float) -> list[str]:
    """The profile's train settings, with the paper's oversampling targets scaled to n clips."""
    scale = n / MER_TOTAL
    targets = [{c: round(k * scale) for c, k in t.items()} for t in (STEP1_TARGETS, STEP2_TARGETS)]
    given: dict[str, Any] = {
        "seed": seed,
        "device": "cpu",
        "n_splits": args.folds,
        "lambda_con": lambda_con,
        "oversample_step1": json.dumps(targets[0]),
        "oversample_step2": json.dumps(targets[1]),
    }
    if args.batch:
        given["batch_size"] = args.batch
    out = [f"train.{k}={v}" for k, v in given.items()]
    return out + list(args.set)


def recipe(args: argparse.Namespace, n: int, seed: int, lambda_con: float, dims) -> RecipeConfig:
    """The train flow's recipe for these settings (no MERFLOW_ environment)."""
    ts = load_settings(args.profile, overrides(args, n, seed, lambda_con), env={}).train
    return recipe_from_settings(ts, dims)


def logreg_waf(labelled, tr: np.ndarray, va: np.ndarray, c: float, seed: int) -> float:
    """Logistic regression on the concatenated z-scored inputs and presence flags."""
    x = np.concatenate(
        [labelled.features[m] for m in MODALITIES]
        + [labelled.present[m][:, None].astype(np.float32) for m in MODALITIES],
        axis=1,
    )
    clf = LogisticRegression(C=c, max_iter=300, random_state=seed)
    clf.fit(x[tr], labelled.labels[tr])
    return waf(labelled.labels[va], clf.predict(x[va]))


def baseline_no_oversampling(
    k: int, labelled, tr: np.ndarray, stop_index: np.ndarray, cfg: RecipeConfig
) -> float:
    """The recipe's baseline stage on the fold's un-oversampled fit rows (same seed, same
    early-stopping rows), its voted WAF on the fold's validation rows."""
    fit = np.setdiff1d(tr, stop_index)
    stop = labelled.subset(stop_index) if len(stop_index) else None
    fold_cfg = _fold_cfg(cfg, k)  # the recipe's baseline stage: its seed and loop settings
    torch.manual_seed(fold_cfg.seed)  # as train_fold seeds the baseline's initialisation
    base = BaselineNet(cfg.baseline)
    training.fit(base, labelled.subset(fit), fold_cfg, baseline_loss, "baseline", stop=stop)
    va = np.setdiff1d(np.arange(len(labelled)), tr)
    probs = predict(base, labelled.subset(va), cfg.train.eval_batch_size)["voted"]
    return waf(labelled.labels[va], probs.argmax(1))


def stage_end(history: list[dict[str, float]]) -> dict[str, float]:
    """The last epoch's losses of a stage."""
    return {k: round(v, 4) for k, v in (history[-1] if history else {}).items()}


def one_run(
    args: argparse.Namespace,
    work: Path,
    n: int,
    seed: int,
    lambda_con: float,
    data: TrainingData,
    truth: np.ndarray,
    extras: bool,
) -> dict[str, Any]:
    """One run of the recipe at n labelled clips; per-fold figures of every system."""
    dims = data.labelled.dims
    cfg = recipe(args, n, seed, lambda_con, dims)
    # Under a `runs/train-*` folder, runs that differ only in lambda_con share one pretraining
    # (tasks/training/steps.py pretrain_step: its key does not hold the fine-tuning settings).
    run_dir = work / "runs" / f"train-s{seed}-n{n}-lc{lambda_con:g}"
    tag = f"n={n} seed={seed} lambda_con={lambda_con:g}"
    frozen = freeze_run(run_dir, data, run_dir.name, run_dir.name, cfg)
    timing: dict[str, float] = {}
    for step in step_names(cfg.n_splits):
        t = time.perf_counter()
        before = set((work / "runs").glob("pretrain-*"))
        run_step(step, run_dir, frozen, cfg)
        reused = step == "pretrain" and bool(before)
        timing[step] = 0.0 if reused else time.perf_counter() - t
        say(f"{tag}: {step} {'reused' if reused else 'done'} ({time.perf_counter() - t:.0f} s)")
    labelled = frozen.labelled
    folds: list[dict[str, Any]] = []
    for k in range(cfg.n_splits):
        summary, arrays = load_fold(run_dir / f"fold-{k}")
        va = arrays["val_index"]
        tr = np.setdiff1d(np.arange(len(labelled)), va)
        yv = labelled.labels[va]
        row: dict[str, Any] = {
            "k": k,
            "full": summary["val_waf"],
            "step1": summary["step1_waf"],
            "F": waf(yv, arrays["val_F"].argmax(1)),
            **{c: waf(yv, arrays[f"val_{c}"].argmax(1)) for c in ("A", "V", "T")},
            "baseline": summary["baseline_waf"],
            "prior": reference_wafs(labelled.labels[tr], yv)["class_prior"],
        }
        idx, lab = arrays["pseudo_index"], arrays["pseudo_label"]
        right = truth[idx] == lab
        row["pseudo"] = {
            "n": len(idx),
            "share_of_pool": len(idx) / max(1, len(truth)),
            "accuracy": float(right.mean()) if len(idx) else None,
            "counts": {c: int((lab == i).sum()) for i, c in enumerate(CLASSES)},
            "correct": {c: int(right[lab == i].sum()) for i, c in enumerate(CLASSES)},
            "pool_truth": {c: int((truth == i).sum()) for i, c in enumerate(CLASSES)},
        }
        row["stages"] = {s: stage_end(h) for s, h in summary["history"].items()}
        row["pool_full"] = None  # filled below, over the folds' mean
        if extras:
            t = time.perf_counter()
            row["baseline_noos"] = baseline_no_oversampling(
                k, labelled, tr, arrays["stop_index"], cfg
            )
            timing[f"baseline_noos-{k}"] = time.perf_counter() - t
            t = time.perf_counter()
            row["logreg"] = logreg_waf(labelled, tr, va, args.logreg_c, seed)
            timing[f"logreg-{k}"] = time.perf_counter() - t
            say(
                f"{tag}: fold {k} extras: baseline (no oversampling) "
                f"{100 * row['baseline_noos']:.1f}, logreg {100 * row['logreg']:.1f} "
                f"({timing[f'baseline_noos-{k}']:.0f} s + {timing[f'logreg-{k}']:.0f} s)"
            )
        folds.append(row)
    pool = sum(load_fold(run_dir / f"fold-{k}")[1]["test_voted"] for k in range(cfg.n_splits))
    pool_waf = waf(truth, pool.argmax(1))
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    out = {
        "n": n,
        "n_unlabelled": len(truth),
        "seed": seed,
        "lambda_con": lambda_con,
        "folds": folds,
        "pool_full": pool_waf,
        "seconds": timing,
    }
    means = {s: mean(out, s) for s, _ in SYSTEMS if s in folds[0]}
    say(f"{tag}: " + "  ".join(f"{s} {100 * v:.1f}" for s, v in means.items()))
    return out


def mean(run: dict[str, Any], system: str) -> float:
    """A system's mean WAF over the run's folds."""
    return float(np.mean([f[system] for f in run["folds"]]))


def table(runs: list[dict[str, Any]], sizes: list[int], lam: float) -> list[str]:
    """Size x system, mean WAF (%) over folds and seeds, for one lambda_con."""
    lines = ["| system | " + " | ".join(str(n) for n in sizes) + " |"]
    lines.append("|---|" + "---:|" * len(sizes))
    for key, label in [*SYSTEMS, ("pool_full", "full method on the pool (test)")]:
        cells = []
        for n in sizes:
            rs = [r for r in runs if r["n"] == n and r["lambda_con"] == lam]
            if key == "pool_full":
                vals = [r["pool_full"] for r in rs]
            else:
                vals = [f[key] for r in rs for f in r["folds"] if f.get(key) is not None]
            cells.append(f"{100 * np.mean(vals):.1f}" if vals else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def pseudo_table(runs: list[dict[str, Any]]) -> list[str]:
    """Pseudo labels per fold (mean) per class, and their accuracy against the truth."""
    lines = [
        "| n | lambda_con | per fold | share of pool | accuracy | " + " | ".join(CLASSES) + " |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(CLASSES),
    ]
    for r in runs:
        ps = [f["pseudo"] for f in r["folds"]]
        total = sum(p["n"] for p in ps)
        acc = sum(sum(p["correct"].values()) for p in ps) / total if total else float("nan")
        per = []
        for c in CLASSES:
            cnt = sum(p["counts"][c] for p in ps)
            ok = sum(p["correct"][c] for p in ps)
            per.append(
                f"{cnt / len(ps):.{0 if cnt >= 10 * len(ps) else 1}f} ({100 * ok / cnt:.0f}%)"
                if cnt
                else "0"
            )
        lines.append(
            f"| {r['n']} | {r['lambda_con']:g} | {total / len(ps):.0f} | "
            f"{100 * np.mean([p['share_of_pool'] for p in ps]):.1f}% | {100 * acc:.1f}% | "
            + " | ".join(per)
            + " |"
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """WAF against labelled clips per system; lambda_con effect; pseudo-label accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, sizes = result["runs"], result["sizes"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for key, label in SYSTEMS:
        if key == "prior":  # ~20 %, in the table: plotted it would flatten every curve
            continue
        ys = []
        for n in sizes:
            vals = [
                f[key]
                for r in runs
                if r["n"] == n and r["lambda_con"] == result["lambda_main"]
                for f in r["folds"]
                if f.get(key) is not None
            ]
            ys.append(100 * np.mean(vals) if vals else np.nan)
        style = "--" if key in ("prior", "logreg", "F") else "-"
        ax.plot(sizes, ys, style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
    ax.minorticks_off()
    ax.set_xlabel("labelled clips (MER2024 class mix)")
    ax.set_ylabel("WAF % (mean over folds and seeds)")
    ax.set_title(f"learning curves ({result['unlabelled_ratio']:g}x unlabelled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for n in result["lambda_sizes"]:
        lams = sorted({r["lambda_con"] for r in runs if r["n"] == n})
        for key, style in (("full", "-"), ("step1", "--")):
            ys = [
                100
                * np.mean(
                    [
                        f[key]
                        for r in runs
                        if r["n"] == n and r["lambda_con"] == lam
                        for f in r["folds"]
                    ]
                )
                for lam in lams
            ]
            ax.plot(lams, ys, style, marker="o", label=f"{key}, n={n}")
    ax.set_xlabel("train.lambda_con (fine-tuning weight of the contrastive terms)")
    ax.set_ylabel("WAF %")
    ax.set_title("lambda_con")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    main = [r for r in runs if r["lambda_con"] == result["lambda_main"]]
    acc, cnt = [], []
    for n in sizes:
        ps = [f["pseudo"] for r in main if r["n"] == n for f in r["folds"]]
        tot = sum(p["n"] for p in ps)
        acc.append(100 * sum(sum(p["correct"].values()) for p in ps) / tot if tot else np.nan)
        cnt.append(100 * np.mean([p["share_of_pool"] for p in ps]))
    ax.plot(sizes, acc, marker="o", label="pseudo-label accuracy %")
    ax.plot(sizes, cnt, marker="s", label="pseudo-labelled share of the pool %")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
    ax.minorticks_off()
    ax.set_xlabel("labelled clips")
    ax.set_title("pseudo labels vs the generator's truth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """Print the tables and write curves.md and curves.png from a result (curves.json)."""
    runs, lam0 = result["runs"], result["lambda_main"]
    done = {r["n"] for r in runs}  # a stopped run's JSON holds the sizes it finished
    sizes = [n for n in result["sizes"] if n in done]
    result = {
        **result,
        "sizes": sizes,
        "lambda_sizes": [n for n in result["lambda_sizes"] if n in done],
    }
    n_seeds = len({r["seed"] for r in runs})
    lines = [
        f"WAF % (mean over {result['args']['folds']} folds x {n_seeds} seed(s)), "
        f"lambda_con {lam0:g}"
    ]
    lines += table(runs, sizes, lam0)
    for n in result["lambda_sizes"]:
        lines += [
            "",
            f"lambda_con at n={n}: WAF %",
            "| lambda_con | full | step 1 | F | step 2 - step 1 |",
            "|---:|---:|---:|---:|---:|",
        ]
        for lam in sorted({r["lambda_con"] for r in runs if r["n"] == n}, reverse=True):
            rs = [r for r in runs if r["n"] == n and r["lambda_con"] == lam]
            f, s1 = np.mean([mean(r, "full") for r in rs]), np.mean([mean(r, "step1") for r in rs])
            fF = np.mean([mean(r, "F") for r in rs])
            lines.append(
                f"| {lam:g} | {100 * f:.1f} | {100 * s1:.1f} | {100 * fF:.1f} | "
                f"{100 * (f - s1):+.1f} |"
            )
    lines += ["", "Pseudo labels per fold (mean) per class (their accuracy vs the truth)"]
    lines += pseudo_table(runs)
    text = "\n".join(lines)
    print(text)
    (out / "curves.md").write_text(text + "\n")
    plot(result, out / "curves.png")
    say(f"wrote {out / 'curves.md'}, {out / 'curves.png'}")


def main() -> None:
    """Parse arguments, run every size and lambda_con, print and write the results."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="300,600,1200,2500", help="labelled clips, comma list")
    p.add_argument("--unlabelled-ratio", type=float, default=3.0)
    p.add_argument("--seeds", default="0", help="comma list: data and training seeds")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--profile", default="demo", help="settings profile (train section)")
    p.add_argument("--batch", type=int, default=0, help="train.batch_size (0: the profile's)")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE override")
    p.add_argument("--lambdas", default="1.0,0.3,0.1,0", help="lambda_con values; first: main")
    p.add_argument("--lambda-sizes", default="600", help="sizes for the lambda_con sweep")
    p.add_argument("--logreg-c", type=float, default=0.01)
    p.add_argument("--small-dims", action="store_true", help="dims / 8, for quick checks")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--epochs-log", action="store_true", help="print every epoch's line")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--out", required=True, help="folder for curves.json and curves.png")
    p.add_argument("--from-json", default="", help="only print and plot this curves.json")
    args = p.parse_args()
    if args.from_json:  # e.g. a run stopped after some sizes: its JSON holds those
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    if args.epochs_log:
        logging.getLogger("models.training").setLevel(logging.INFO)
    sizes = [int(s) for s in args.sizes.split(",")]
    lambdas = [float(v) for v in args.lambdas.split(",")]
    lambda_sizes = [int(s) for s in args.lambda_sizes.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",")]
    dims = dict(PAPER_DIMS) if not args.small_dims else {"visual": 96, "acoustic": 128, "text": 640}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="learning-curves-"))
    probe = recipe(args, sizes[0], seeds[0], lambdas[0], dims)
    standardize = load_settings(args.profile, overrides(args, 1, 0, 1.0), env={}).train.standardize
    say(
        f"profile {args.profile}: batch {probe.train.batch_size}, lr {probe.train.lr}/"
        f"{probe.lr_step2}, epochs pretrain {probe.pretrain_epochs} step1/2 {probe.final_epochs} "
        f"baseline {probe.train.max_epochs}, hidden {probe.model.hidden}, tokens "
        f"{probe.model.n_tokens}, inner_val {probe.inner_val_fraction}, folds {probe.n_splits}; "
        f"dims {dims}; torch threads {torch.get_num_threads()}"
    )
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for n in sizes:
            t = time.perf_counter()
            counts = class_counts(n, args.folds)
            n_unl = round(args.unlabelled_ratio * n)
            labelled, unlabelled, truth = make_synthetic(counts, n_unl, seed, dims)
            if standardize:  # the train flow's inputs are z-scored before any step
                labelled, unlabelled = zscored(labelled, unlabelled)
            data = TrainingData(
                labelled, unlabelled, extractor_ids={m: "synth" for m in MODALITIES}
            )
            say(
                f"n={n} seed={seed}: data {counts}, {n_unl} unlabelled "
                f"({time.perf_counter() - t:.0f} s)"
            )
            lams = lambdas if n in lambda_sizes else lambdas[:1]
            for i, lam in enumerate(lams):
                runs.append(one_run(args, work, n, seed, lam, data, truth, extras=i == 0))
            shutil.rmtree(work / "runs", ignore_errors=True)
            result = {
                "args": vars(args),
                "settings": dataclasses.asdict(probe),
                "sizes": sizes,
                "lambda_sizes": lambda_sizes,
                "lambda_main": lambdas[0],
                "unlabelled_ratio": args.unlabelled_ratio,
                "runs": runs,
            }
            (out / "curves.json").write_text(json.dumps(result, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    write_outputs(result, out)


if __name__ == "__main__":
    main()
