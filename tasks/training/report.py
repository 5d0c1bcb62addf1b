"""The training report, the last step of a run: what each part of the method adds (WAF of each
classifier, the baseline, step 1 and step 2, per fold and mean, beside reference WAFs that use no
features), per-class F1, confusion matrix, pseudo-label counts (the paper's Table 2), curves,
predictions under their contract, the submission CSV. train_in_process runs a whole run, steps
(tasks/training/steps.py) and report, in this process."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers have no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.labels import (
    CLASSES,
    CLASSIFIER_OF_MODALITY,
    CLASSIFIERS,
    MODALITIES,
    NUM_CLASSES,
)
from data_contracts.store import Store
from models.featureset import FeatureSet
from models.metrics import per_class_f1, waf
from models.recipe import RecipeConfig
from tasks.training.data import TrainingData
from tasks.training.steps import freeze_run, load_fold, run_step, step_names

PROB_KEYS = (*CLASSIFIERS, "voted")
# A fold's stages, in the order they train (models/recipe.py train_fold).
STAGES = ("step1", "baseline", "baseline_oversampled", "step2")
BASELINES = ("baseline", "baseline_oversampled")  # models/recipe.py baselines()
MODALITY_OF_CLASSIFIER = {c: m for m, c in CLASSIFIER_OF_MODALITY.items()}


def write_text(path: Path, text: str) -> Path:
    """Write a report file atomically (readers never see half of it)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def save_png(fig, path: Path) -> Path:
    """Save a report figure atomically as PNG and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def percent(x: float | None) -> float | None:
    """A score in [0, 1] as the reports show it: percent, two decimals (None stays None)."""
    return None if x is None else round(100 * x, 2)


def _plot_confusion(cm: np.ndarray, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(NUM_CLASSES), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(NUM_CLASSES), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = cm.max() if cm.size else 0
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            color = "white" if cm[i, j] > peak / 2 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def _plot_curves(folds: list[dict], pretrain: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 1 + len(STAGES), figsize=(20, 3.6), dpi=100)
    # Markers: a stage that trained one epoch still shows (as a point).
    style = {"marker": "o", "markersize": 3, "linewidth": 1.2}
    panels = [(axes[0], "pretraining loss (L_intra + L_imc)", [(None, pretrain, "loss")])]
    for ax, stage in zip(axes[1:], STAGES, strict=True):
        # The early-stopping rows' WAF; the training loss when no rows were held out for it.
        hists = [(f["k"], f.get("history", {}).get(stage) or []) for f in folds]
        key = "val_waf" if any(h and "val_waf" in h[0] for _, h in hists) else "loss"
        title = "early-stopping WAF" if key == "val_waf" else "training loss"
        panels.append((ax, f"{stage}: {title}", [(k, h, key) for k, h in hists]))
    for ax, title, curves in panels:
        drawn = [(k, h, key) for k, h, key in curves if h]
        for k, hist, key in drawn:
            label = None if k is None else f"fold {k}"
            ax.plot([h["epoch"] for h in hist], [h[key] for h in hist], label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if not drawn:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_xlim(0.5, max(h[-1]["epoch"] for _, h, _ in drawn) + 0.5)
        if drawn[0][2] == "val_waf":
            # Room above 1.0 and below 0.0: a curve there would hide under the frame.
            ax.set_ylim(-0.08, 1.08)
        else:
            ax.margins(y=0.08)
        if any(k is not None for k, _, _ in drawn):
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path)


def fold_rows(run_dir: Path, n_splits: int) -> list[dict[str, Any]]:
    """One row per finished fold of a run (its done.json): WAF (%) of the full method, step 1,
    the baseline and the reference guesses on the fold's validation videos, pseudo labels,
    and the epochs each stage trained. The UI's fold table while a run goes."""
    rows = []
    for k in range(n_splits):
        done = run_dir / f"fold-{k}" / "done.json"
        if not done.is_file():
            continue
        f = json.loads(done.read_text())
        refs, hist = f.get("reference_waf") or {}, f.get("history") or {}
        rows.append(
            {
                "fold": k,
                "full method": percent(f["val_waf"]),
                "step 1": percent(f["step1_waf"]),
                "baseline": percent(f.get("baseline_waf")),
                "baseline + oversampling": percent(f.get("baseline_oversampled_waf")),
                "majority class": percent(refs.get("majority")),
                "class mix": percent(refs.get("class_prior")),
                "pseudo labels": sum((f.get("pseudo_counts") or {}).values()),
                "epochs": ", ".join(f"{s} {len(hist[s])}" for s in STAGES if s in hist),
            }
        )
    return rows


def build_report(
    run_dir: Path,
    run_id: str,
    data: TrainingData,
    n_splits: int,
    store: Store | None,
    settings: dict[str, Any],
    feature_tables: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Aggregate the finished folds into the report files, the predictions and pseudo-label
    tables (when a store is given), and the submission CSV; returns the report as a dict.
    `feature_tables`: a line per modality saying which table training read (shown first)."""
    lab, unl = data.labelled, data.unlabelled
    n_lab, n_unl = len(lab), len(unl)
    oof = {k: np.zeros((n_lab, NUM_CLASSES), np.float32) for k in PROB_KEYS}
    fold_of = np.full(n_lab, -1, np.int32)
    # Each baseline's out-of-fold probabilities, while every fold has them (runs without
    # pseudo labels train none, nor did runs before they were saved).
    oof_base: dict[str, np.ndarray | None] = {
        b: np.zeros((n_lab, NUM_CLASSES), np.float32) for b in BASELINES
    }
    test_per_fold: list[dict[str, np.ndarray]] = []
    folds: list[dict] = []
    pseudo_rows: list[dict] = []
    now = datetime.now(UTC)
    for k in range(n_splits):
        summary, arrays = load_fold(run_dir / f"fold-{k}")
        folds.append(summary)
        idx = arrays["val_index"]
        fold_of[idx] = k
        for key in PROB_KEYS:
            oof[key][idx] = arrays[f"val_{key}"]
        for b, probs in oof_base.items():
            if probs is not None and f"val_{b}" in arrays:
                probs[idx] = arrays[f"val_{b}"]
            else:
                oof_base[b] = None
        test_per_fold.append({key: arrays[f"test_{key}"] for key in PROB_KEYS})
        for i, c, p in zip(
            arrays["pseudo_index"], arrays["pseudo_label"], arrays["pseudo_confidence"], strict=True
        ):
            pseudo_rows.append(
                {
                    "video_id": str(unl.video_ids[i]),
                    "run_id": f"{run_id}/fold-{k}",
                    "label": CLASSES[int(c)],
                    "confidence": float(p),
                    "preferred_model": settings_preferred(settings, int(c)),
                    "created_at": now,
                }
            )
    test = average_over_folds(test_per_fold, n_splits)
    pred = oof["voted"].argmax(1)
    cm = confusion_matrix(lab.labels, pred, labels=list(range(NUM_CLASSES)))
    fold_waf = [f["val_waf"] for f in folds]
    base_waf = {
        b: [f[f"{b}_waf"] for f in folds if f.get(f"{b}_waf") is not None] for b in BASELINES
    }
    step1_waf = [f["step1_waf"] for f in folds]
    pseudo_counts = [f["pseudo_counts"] for f in folds]
    rows = _rows(folds, lab, oof, fold_of)
    pretrain = []
    pre_done = run_dir / "pretrain" / "done.json"
    if pre_done.is_file():
        pretrain = json.loads(pre_done.read_text()).get("history", [])
    report = {
        "run_id": run_id,
        "n_labelled": n_lab,
        "n_unlabelled": n_unl,
        "dropped_without_features": data.dropped,
        "missing_modalities": data.missing,
        "extractor_ids": data.extractor_ids,
        "fold_waf": fold_waf,
        "mean_waf": float(np.mean(fold_waf)),
        "oof_waf": waf(lab.labels, pred),
        "step1_mean_waf": float(np.mean(step1_waf)),
        **{
            f"{b}_mean_waf": float(np.mean(w)) if len(w) == n_splits else None
            for b, w in base_waf.items()
        },
        # A, V and T on the videos that have their modality (the others hold a placeholder).
        "per_classifier_oof_waf": {
            c: waf(lab.labels[has], oof[c][has].argmax(1))
            for c in CLASSIFIERS
            for has in [has_input(lab, c)]
            if has.any()
        },
        "rows": rows,
        "per_class_f1": per_class_f1(lab.labels, pred),
        **{
            f"{b}_per_class_f1": None if p is None else per_class_f1(lab.labels, p.argmax(1))
            for b, p in oof_base.items()
        },
        # What training read: each modality's table, and how it was chosen when not named.
        "feature_tables": dict(feature_tables or {}),
        "confusion": cm.tolist(),
        "pseudo_counts": pseudo_counts,
        "classes": list(CLASSES),
        "settings": settings,
        # The torch threads each step computed with: its share of the machine's cores.
        "threads": step_threads(run_dir),
    }
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=2, sort_keys=True))
    _plot_confusion(cm, out / "confusion.png", f"out-of-fold, WAF {report['oof_waf']:.3f}")
    _plot_curves(folds, pretrain, out / "curves.png")
    write_text(out / "report.md", report_markdown(report))
    submission = pd.DataFrame(
        {"name": unl.video_ids, "discrete": [CLASSES[i] for i in test["voted"].argmax(1)]}
    )
    write_text(out / "submission.csv", submission.to_csv(index=False))
    if store is not None:
        _write_predictions(store, run_id, lab, unl, oof, test, fold_of)
        if pseudo_rows:
            store.upsert(tables.PSEUDO_LABELS, pd.DataFrame(pseudo_rows))
    return report


# What each row of the report is, in the order shown; the baselines exist only with pseudo
# labels (models/recipe.py baselines()).
ROW_NAMES = {
    "majority": "reference: majority class",
    "class_prior": "reference: guess by class mix",
    "A": "MR-CCL audio classifier A (videos with audio)",
    "V": "MR-CCL visual classifier V (videos with a face)",
    "T": "MR-CCL text classifier T (videos with text)",
    "F": "MR-CCL fused classifier F",
    "baseline": "baseline, no oversampling (the paper's; merflow inputs)",
    "baseline_oversampled": "baseline + step-1 oversampling (merflow's row)",
    "step1": "MR-CCL step 1, voted",
    "voted": "full method (voted)",
}


def train_in_process(
    run_dir: Path,
    data: TrainingData,
    recipe: RecipeConfig,
    key: str = "local",
    store: Store | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole run in this process on in-memory inputs: freeze, every step in order, the report
    (tests and benchmarks; the train flow runs the same steps as Prefect tasks). Returns the
    report."""
    frozen = freeze_run(run_dir, data, key, key, recipe, store)
    for step in step_names(recipe.n_splits):
        run_step(step, run_dir, frozen, recipe)
    return build_report(run_dir, key, frozen, recipe.n_splits, store, settings or {})


def has_input(data: FeatureSet, classifier: str) -> np.ndarray:
    """Rows where `classifier` has its input: its modality (A, V, T), any modality (F)."""
    if classifier in MODALITY_OF_CLASSIFIER:
        return np.asarray(data.present[MODALITY_OF_CLASSIFIER[classifier]], bool)
    return np.ones(len(data), bool)


def _rows(folds: list[dict], lab: FeatureSet, oof: dict, fold_of: np.ndarray) -> dict:
    """WAF per fold of every row of ROW_NAMES (absent rows left out), measured on each fold's
    validation rows; A, V, T and F are the final model's classifiers, A, V and T scored on the
    rows that have their modality only (a missing one is a zero placeholder they never learnt
    from; NaN for a fold without any). Means are over the folds that have a score."""
    per_fold: dict[str, list[float]] = {}
    labels = lab.labels
    for f in folds:
        k, val = f["k"], fold_of == f["k"]
        scores = dict(f.get("reference_waf") or {})
        for c in CLASSIFIERS:
            rows = val & has_input(lab, c)
            scores[c] = waf(labels[rows], oof[c][rows].argmax(1)) if rows.any() else float("nan")
        scores |= {b: f[f"{b}_waf"] for b in BASELINES if f.get(f"{b}_waf") is not None}
        scores["step1"] = f["step1_waf"]
        scores["voted"] = f["val_waf"]
        for name, score in scores.items():
            per_fold.setdefault(name, [float("nan")] * len(folds))[k] = float(score)
    return {
        name: {"folds": per_fold[name], "mean": _nanmean(per_fold[name])}
        for name in ROW_NAMES
        if name in per_fold
    }


def _nanmean(values: list[float]) -> float:
    """Mean over the folds that have a score (NaN when none has)."""
    x = np.asarray(values, float)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else float("nan")


def settings_preferred(settings: dict[str, Any], c: int) -> str:
    """Which model's confidence decided class c's pseudo labels."""
    return "baseline" if CLASSES[c] in settings.get("preferred_baseline", []) else "mrccl"


def average_over_folds(per_fold: Iterable[Mapping[str, np.ndarray]], n_splits: int) -> dict:
    """Each classifier's probabilities summed over the fold models / n_splits (float64): the
    run's submission and `unlabeled` prediction rows, and what `merflow predict` labels with."""
    total: dict[str, np.ndarray] = {}
    for probs in per_fold:
        for k in PROB_KEYS:
            if k in probs:
                total[k] = total.get(k, np.float64(0.0)) + probs[k] / n_splits
    return total


def prediction_rows(
    run_id: str,
    data: FeatureSet,
    probs: Mapping[str, np.ndarray],
    split: str,
    folds: np.ndarray,
    labels: list[str | None] | None,
) -> pd.DataFrame:
    """Rows of the predictions table: a classifier whose modality is missing gave no vote, so
    its probabilities are null; `voted` decides the class."""
    n = len(data)
    present = {CLASSIFIER_OF_MODALITY[m]: data.present[m] for m in MODALITIES}
    present["F"] = np.ones(n, dtype=bool)
    as32 = {k: np.asarray(v, np.float32) for k, v in probs.items()}
    return pd.DataFrame(
        {
            "video_id": data.video_ids,
            "run_id": run_id,
            "split": split,
            "fold": folds,
            **{
                f"prob_{c}": [p if ok else None for p, ok in zip(as32[c], present[c], strict=True)]
                for c in CLASSIFIERS
            },
            "prob_voted": list(as32["voted"]),
            "predicted": [CLASSES[i] for i in as32["voted"].argmax(1)],
            "label": labels if labels is not None else [None] * n,
        }
    )


def _write_predictions(store, run_id, lab, unl, oof, test, fold_of) -> None:
    cv = prediction_rows(run_id, lab, oof, "cv", fold_of, [CLASSES[i] for i in lab.labels])
    unl_fold = np.full(len(unl), -1, np.int32)
    unl_rows = prediction_rows(run_id, unl, test, "unlabeled", unl_fold, None)
    store.upsert(tables.PREDICTIONS, pd.concat([cv, unl_rows], ignore_index=True))


def _epoch_choice(settings: dict[str, Any]) -> str:
    """How the stages' epochs were chosen, in words, for the report's WAF table."""
    if settings.get("inner_val_fraction", 0.15):
        return "(the epoch of every stage is chosen on rows held out of the fold's training rows)"
    return "(every stage trains its full number of epochs: no early stopping)"


def step_threads(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The thread record of each step (flows/train.py writes <run>/threads/<step>.json)."""
    folder = run_dir / "threads"
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return {p.stem: json.loads(p.read_text()) for p in found}


def _threads_line(threads: dict[str, dict[str, Any]]) -> str:
    def one(step: str, t: dict[str, Any]) -> str:
        n = (
            t["threads"]
            if t["threads_min"] == t["threads_max"]
            else (f"{t['threads_min']}-{t['threads_max']}")
        )
        return f"{step} {n}"

    cores = max(t["machine_cores"] for t in threads.values())
    steps = ", ".join(one(step, t) for step, t in threads.items())
    return f"Torch threads per step (of {cores} cores, shared with the jobs beside it): {steps}."


def report_markdown(r: dict[str, Any]) -> str:
    """The report as Markdown (a Prefect artifact and report.md)."""
    lines = [
        f"## Training report `{r['run_id']}`",
        "",
        f"{r['n_labelled']} labelled, {r['n_unlabelled']} unlabelled videos; "
        f"missing modalities {r['missing_modalities']}",
        "",
        *[f"- {m}: {line}" for m, line in (r.get("feature_tables") or {}).items()],
        *([""] if r.get("feature_tables") else []),
        "WAF (%) on each fold's validation videos, which no training choice saw "
        + _epoch_choice(r.get("settings") or {})
        + ".",
        "",
    ]
    if r.get("threads"):
        lines += [_threads_line(r["threads"]), ""]
    folds = range(len(r["fold_waf"]))
    lines.append("| model | mean | " + " | ".join(f"fold {k}" for k in folds) + " |")
    lines.append("|---|---:|" + "---:|" * len(folds))
    for name, row in r["rows"].items():
        label = ROW_NAMES[name]
        cells = " | ".join("–" if np.isnan(w) else f"{100 * w:.2f}" for w in row["folds"])
        mean = "–" if np.isnan(row["mean"]) else f"{100 * row['mean']:.2f}"
        if name == "voted":
            label, mean = f"**{label}**", f"**{mean}**"
        lines.append(f"| {label} | {mean} | {cells} |")
    lines += ["", "| class | F1 (out of fold) |", "|---|---:|"]
    lines += [f"| {c} | {100 * f:.2f} |" for c, f in r["per_class_f1"].items()]
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", ""]
    lines.append("| | " + " | ".join(r["classes"]) + " |")
    lines.append("|---" * (len(r["classes"]) + 1) + "|")
    for name, row in zip(r["classes"], r["confusion"], strict=True):
        lines.append(f"| {name} | " + " | ".join(map(str, row)) + " |")
    if any(r["pseudo_counts"]):
        lines += ["", "Pseudo labels per class (Table 2 layout)", ""]
        lines.append("| fold | " + " | ".join(r["classes"]) + " | total |")
        lines.append("|---" * (len(r["classes"]) + 2) + "|")
        for k, counts in enumerate(r["pseudo_counts"]):
            vals = [counts.get(c, 0) for c in r["classes"]]
            lines.append(f"| {k} | " + " | ".join(map(str, vals)) + f" | {sum(vals)} |")
    return "\n".join(lines) + "\n"
