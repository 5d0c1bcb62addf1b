"""How a finished run scores on corrupted copies of its own validation videos (MER-NOISE style).

Each fold's model is scored on the videos that fold validated on, and only those: the same rows
as the run's fold WAF, so a level's figures compare with the run's own (the clean level gives
them back exactly). Features of a corrupted level come from the corrupted stages' tables
(tasks/corrupt.py; the flow extracts them), read, quality-filtered and standardised as predict
reads a run's features (tasks/predict.py). A, V and T are scored on the rows that still have
their modality at that level, as the training report scores them; the coverage columns say how
many that is (a blurred face that is no longer found leaves V, and the vote goes on without it).

Output, under the run folder's `robustness/`: robustness.json (every figure), robustness.md
(the table), robustness.csv (one row per level, fold and classifier) and robustness.png (WAF
against level, one line per classifier, one panel per kind of corruption).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.labels import CLASS_INDEX, CLASSIFIERS
from data_contracts.store import Store
from models.metrics import waf
from models.training import predict
from tasks.corrupt import CLEAN, Corruption, severity_order
from tasks.dag import Plan
from tasks.predict import RunFolderError, TrainedRun, read_features
from tasks.training.data import apply_zscore, quality_kept
from tasks.training.folds import read_run_folds
from tasks.training.report import has_input, save_png, write_text

SCORED = (*CLASSIFIERS, "voted")
FOLDER = "robustness"


@dataclass(frozen=True)
class Level:
    """A level the run is scored at: clean (corruption None) or one corruption."""

    corruption: Corruption | None

    @property
    def name(self) -> str:
        return CLEAN if self.corruption is None else self.corruption.name

    @property
    def kind(self) -> str:
        return CLEAN if self.corruption is None else self.corruption.kind

    def plan(self, clean: Plan) -> Plan:
        """The extraction plan of this level's features."""
        return clean if self.corruption is None else clean.corrupted(self.corruption)


def levels_of(corruptions: Sequence[Corruption]) -> list[Level]:
    """Clean first, then the corruptions by kind and severity."""
    return [Level(None), *(Level(c) for c in sorted(set(corruptions), key=severity_order))]


def validation_videos(run: TrainedRun, store: Store) -> list[pd.DataFrame]:
    """Per fold, the videos that fold validated on (video_id, sha256, path, label index), from
    the run's folds.json and the stores' manifest and labels: the only videos it is scored on."""
    assignment = read_run_folds(run.folder)
    if assignment is None:
        raise RunFolderError(
            f"run {run.key} in {run.folder} has no folds.json, so which videos each fold validated "
            "on is unknown; rerun `merflow train` with the run's settings (finished steps are kept)"
        )
    folds = pd.Series(assignment.folds, name="fold").rename_axis("video_id").reset_index()
    manifest = store.read(tables.MANIFEST, columns=["video_id", "sha256", "path"])
    labels = store.read(tables.LABELS, columns=["video_id", "label"])
    rows = folds.merge(manifest, on="video_id", how="left").merge(labels, on="video_id")
    lost = rows.video_id[rows.sha256.isna()].tolist()
    if lost:
        raise RunFolderError(
            f"{len(lost)} of run {run.key}'s labelled videos are no longer in the manifest "
            f"({', '.join(lost[:5])}); robustness scores a run on the corpus it was trained on: "
            "rescan it (`merflow extract CORPUS --only-new`) or score another run"
        )
    rows["label"] = rows.label.map(CLASS_INDEX)
    return [
        rows[rows.fold == k].sort_values("video_id").reset_index(drop=True)
        for k in range(assignment.n_splits)
    ]


def official_texts(store: Store, plan: Plan, videos: pd.DataFrame) -> dict[str, str]:
    """The official transcripts the run's features were made from, for `videos`: under an
    audio corruption they still take precedence (what was said does not change with the noise;
    only the ASR text of videos without one does). Empty when the run used ASR text only."""
    if not plan.official_transcripts or not store.exists(tables.TRANSCRIPTS):
        return {}
    rows = store.read(
        tables.TRANSCRIPTS,
        where={"video_id": videos.video_id.tolist(), "extractor_id": [plan.transcripts_id]},
    )
    rows = rows[rows.source == "official"]
    return dict(zip(rows.video_id, rows.text, strict=True))


def score_fold(
    store: Store, run: TrainedRun, plan: Plan, k: int, videos: pd.DataFrame
) -> dict[str, dict[str, float]]:
    """Fold k's model on its validation `videos` under `plan`'s features: per classifier its
    WAF and the share of the videos it had its input for (A, V, T: their modality)."""
    data = read_features(store, plan.feature_tables(), videos)
    (data,) = quality_kept(store, plan, run.settings, data)
    data = data.with_labels(np.array(videos.label, np.int64))
    if run.normalizer is not None:
        apply_zscore(data.features, data.present, run.normalizer)
    probs = predict(run.models[k], data)
    out = {}
    for c in SCORED:
        rows = has_input(data, c) if c in CLASSIFIERS else np.ones(len(data), bool)
        score = waf(data.labels[rows], probs[c][rows].argmax(1)) if rows.any() else math.nan
        out[c] = {"waf": float(score), "coverage": float(rows.mean()) if len(rows) else 0.0}
    return out


def score_level(
    store: Store, run: TrainedRun, level: Level, clean: Plan, folds: list[pd.DataFrame]
) -> dict[str, Any]:
    """Every fold at one level: per fold and classifier WAF and coverage, and the means."""
    plan = level.plan(clean)
    per_fold = [score_fold(store, run, plan, k, v) for k, v in enumerate(folds)]
    return {
        "level": level.name,
        "kind": level.kind,
        "value": None if level.corruption is None else level.corruption.level,
        "label": CLEAN if level.corruption is None else level.corruption.label,
        "extractor_ids": plan.extractor_ids(),
        "n_videos": [len(v) for v in folds],
        "folds": per_fold,
        "mean": {c: _nanmean([f[c]["waf"] for f in per_fold]) for c in SCORED},
        "coverage": {c: float(np.mean([f[c]["coverage"] for f in per_fold])) for c in SCORED},
    }


def _nanmean(values: Sequence[float]) -> float:
    x = np.asarray(values, float)
    return float(x[~np.isnan(x)].mean()) if (~np.isnan(x)).any() else math.nan


def robustness_report(run: TrainedRun, scored: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of a run's levels, with the run's own fold WAF beside the clean level's."""
    recorded = json.loads((run.folder / "report" / "report.json").read_text())
    clean = next(s for s in scored if s["level"] == CLEAN)
    fold_waf = [float(x) for x in recorded.get("fold_waf") or []]
    ours = [f["voted"]["waf"] for f in clean["folds"]]
    return {
        "run_key": run.key,
        "run_fold_waf": fold_waf,
        "clean_matches_run": len(ours) == len(fold_waf)
        and all(abs(a - b) < 1e-9 for a, b in zip(ours, fold_waf, strict=True)),
        "levels": scored,
    }


def report_markdown(report: Mapping[str, Any]) -> str:
    """The table: one row per level, mean WAF (%) of each classifier over the folds, the vote's
    per-fold WAF, and the share of videos with a face (V) and with audio (A)."""
    levels = report["levels"]
    n = len(levels[0]["folds"]) if levels else 0
    head = ["level", *(f"{c} WAF" for c in CLASSIFIERS), "vote WAF"]
    head += [*(f"vote fold {k}" for k in range(n)), "audio kept", "face kept", "text kept"]
    lines = [
        f"# Robustness of run {report['run_key']}",
        "",
        "Each fold's model scored on corrupted copies of its own validation videos; WAF in %, "
        "mean over the folds. A, V and T are scored on the videos that still have their "
        "modality at the level (the `kept` columns: share of videos). The clean level "
        + (
            "reproduces the run's fold WAF exactly."
            if report["clean_matches_run"]
            else f"differs from the run's fold WAF {report['run_fold_waf']} (see robustness.json)."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    kept = {"A": "audio", "V": "face", "T": "text"}
    for s in levels:
        cells = [s["label"], *(_pct(s["mean"][c]) for c in CLASSIFIERS), _pct(s["mean"]["voted"])]
        cells += [_pct(f["voted"]["waf"]) for f in s["folds"]]
        cells += [_pct(s["coverage"][c]) for c in kept]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def long_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per level, fold and classifier (fold -1: the mean over folds)."""
    rows = []
    for s in report["levels"]:
        for k, f in enumerate(s["folds"]):
            rows += [{"level": s["level"], "fold": k, "classifier": c, **f[c]} for c in SCORED]
        rows += [
            {
                "level": s["level"],
                "fold": -1,
                "classifier": c,
                "waf": s["mean"][c],
                "coverage": s["coverage"][c],
            }
            for c in SCORED
        ]
    return pd.DataFrame(rows, columns=["level", "fold", "classifier", "waf", "coverage"])


def plot(report: Mapping[str, Any], path: Path) -> Path:
    """WAF (%) against level, one line per classifier, one panel per kind (clean at the left of
    each panel)."""
    import matplotlib.pyplot as plt

    levels = report["levels"]
    clean = next(s for s in levels if s["kind"] == CLEAN)
    kinds = sorted({s["kind"] for s in levels if s["kind"] != CLEAN}) or [CLEAN]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        shown = [clean, *(s for s in levels if s["kind"] == kind and s is not clean)]
        x = np.arange(len(shown))
        for c in SCORED:
            y = [100 * s["mean"][c] for s in shown]
            ax.plot(x, y, marker="o", lw=2.2 if c == "voted" else 1.2, label=c)
        ax.set_xticks(x, [CLEAN if s is clean else f"{s['value']:g}" for s in shown])
        unit = shown[-1]["label"].split(" ", 2)[-1] if len(shown) > 1 else ""
        ax.set_xlabel(f"{kind} ({unit})" if unit else kind)
        ax.set_ylabel("WAF (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"run {report['run_key']}: WAF on corrupted validation videos")
    fig.tight_layout()
    return save_png(fig, path)


def write_report(run: TrainedRun, report: dict[str, Any]) -> Path:
    """The report's files under the run folder's robustness/; returns that folder."""
    out = run.folder / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "robustness.json", json.dumps(report, indent=2, sort_keys=True))
    write_text(out / "robustness.md", report_markdown(report))
    write_text(out / "robustness.csv", long_table(report).to_csv(index=False))
    plot(report, out / "robustness.png")
    return out


# -- several systems (merflow ablate with robustness) ---------------------------------------------
def compare_systems(
    by_system: Mapping[str, Sequence[Mapping[str, Any]]], labels: Mapping[str, str]
) -> dict[str, Any]:
    """The voted WAF of each system at each level, mean ± std over its runs (seeds), and its
    drop from its own clean level: the ablations compared on the same corrupted copies (the
    same stored features; only the models differ). `by_system`: robustness reports per system,
    one per seed; `labels`: each system's name in the table."""
    systems = [s for s in by_system if by_system[s]]
    first = by_system[systems[0]][0]
    levels = [(lv["level"], lv["label"]) for lv in first["levels"]]
    rows = []
    for level, label in levels:
        cells = {}
        for s in systems:
            per_seed = [_level(r, level)["mean"]["voted"] for r in by_system[s]]
            clean = [_level(r, CLEAN)["mean"]["voted"] for r in by_system[s]]
            drop = np.asarray(per_seed) - np.asarray(clean)
            cells[s] = {
                "waf": [100 * x for x in per_seed],
                "mean": float(100 * np.mean(per_seed)),
                "std": float(100 * np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                "drop": float(100 * drop.mean()),
            }
        rows.append({"level": level, "label": label, "systems": cells})
    return {
        "systems": systems,
        "labels": {s: labels.get(s, s) for s in systems},
        "run_keys": {s: [r["run_key"] for r in by_system[s]] for s in systems},
        "rows": rows,
    }


def _level(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return next(lv for lv in report["levels"] if lv["level"] == name)


def comparison_markdown(t: Mapping[str, Any]) -> str:
    """One row per level, one column per system: voted WAF (%) mean ± std over seeds, and in
    brackets the change from the system's clean WAF."""
    names = [t["labels"][s] for s in t["systems"]]
    lines = [
        "## Robustness: the systems on the same corrupted validation videos",
        "",
        "Voted WAF (%), mean ± std over seeds of each run's mean over its folds, each fold's "
        "model on corrupted copies of its own validation videos; in brackets the change from "
        "the system's clean WAF.",
        "",
        "| level | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for row in t["rows"]:
        cells = []
        for s in t["systems"]:
            c = row["systems"][s]
            drop = "" if row["level"] == CLEAN else f" ({c['drop']:+.2f})"
            cells.append(f"{c['mean']:.2f} ± {c['std']:.2f}{drop}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(t: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """robustness.json, robustness.md and robustness.png (voted WAF against level, one line
    per system, one panel per kind) under `out_dir`."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "robustness.json": write_text(
            out_dir / "robustness.json", json.dumps(t, indent=2, sort_keys=True)
        ),
        "robustness.md": write_text(out_dir / "robustness.md", comparison_markdown(t)),
    }
    rows = t["rows"]
    clean = rows[0]
    kinds = sorted({r["level"].split(":")[0] for r in rows[1:]}) or [CLEAN]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        shown = [clean, *(r for r in rows[1:] if r["level"].split(":")[0] == kind)]
        x = np.arange(len(shown))
        for s in t["systems"]:
            y = [r["systems"][s]["mean"] for r in shown]
            e = [r["systems"][s]["std"] for r in shown]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=t["labels"][s])
        ax.set_xticks(x, [CLEAN if r is clean else r["level"].split(":")[1] for r in shown])
        ax.set_xlabel(shown[-1]["label"].rsplit(" ", 2)[0] if len(shown) > 1 else kind)
        ax.set_ylabel("voted WAF (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    files["robustness.png"] = save_png(fig, out_dir / "robustness.png")
    return files
