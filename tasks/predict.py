"""Label videos with a finished training run: its fold models' voted probabilities averaged over
the folds (as the run's submission averages them), on features of the run's extractors,
standardised with the run's normaliser, missing modalities masked. The predict flow, the
`predict-new` deployment and `merflow predict` on single videos all call these functions.

A run folder is read as the train flow left it (tasks/training/steps.py):

    runs/train-<key>/report/report.json     the run finished: extractor ids, train settings
    runs/train-<key>/fold-<k>/done.json     every fold finished ...
    runs/train-<key>/fold-<k>/model/        ... and saved its model (safetensors + config.json)
    runs/train-<key>/normalizer.npz         the z-score the inputs were standardised with
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.atomic import atomic_path
from data_contracts.errors import MerflowError
from data_contracts.labels import CLASSES, MODALITIES
from data_contracts.store import Store
from data_contracts.tables import TableRef
from models.featureset import UNLABELLED, FeatureSet
from models.settings import TrainSettings
from tasks.dag import STAGES, Plan, pending_per_stage
from tasks.engine.stage import run_stage
from tasks.training.ablate_report import SWITCHES
from tasks.training.data import apply_zscore, quality_kept
from tasks.training.report import average_over_folds, prediction_rows
from tasks.training.steps import load_normalizer

log = logging.getLogger(__name__)

SPLIT = "predict"  # the predictions table's split of rows written here (the run's: cv, unlabeled)
LATEST = "latest"
REPORT_JSON = Path("report") / "report.json"
NORMALIZER = "normalizer.npz"


class RunFolderError(MerflowError, LookupError):
    """A run folder is missing, unfinished or partial (exit 2: name another run)."""


class ExtractorMismatchError(MerflowError, ValueError):
    """The current settings extract other features than the run was trained on (exit 2)."""


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainedRun:
    """A finished run as predict reads it: its key, folders, features and train settings."""

    key: str
    folder: Path
    extractor_ids: dict[str, str]  # modality -> extractor id of the tables it trained on
    settings: TrainSettings
    fold_dirs: list[Path]  # fold-k/model, k = 0 .. n_splits-1
    normalizer: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    models: list[Any] = field(default_factory=list)  # loaded by load_models


def find_run(
    runs_dir: Path, which: str = LATEST, switches: Mapping[str, bool] | None = None
) -> Path:
    """The run folder `which` names: `latest` (latest_run, with `switches`), a run key,
    `train-<key>`, or a run folder's path."""
    if which == LATEST:
        return latest_run(runs_dir, switches)
    given = Path(which).expanduser()
    if given.is_dir() and given.name.startswith("train-"):
        return given.resolve()
    folder = runs_dir / (which if which.startswith("train-") else f"train-{which}")
    if not folder.is_dir():
        have = sorted(d.name.removeprefix("train-") for d in runs_dir.glob("train-*"))
        raise RunFolderError(
            f"no training run {which!r} under {runs_dir} (runs there: {', '.join(have) or 'none'});"
            f" give `latest`, one of those keys, or a run folder's path"
        )
    return folder


def method_switches(train: TrainSettings | None = None) -> dict[str, bool]:
    """The method's switches (SWITCHES: train.use_pretraining, ...) as `train` sets them; all
    on (the full method) by default."""
    train = train or TrainSettings()
    return {s: bool(getattr(train, s.removeprefix("train."))) for s in SWITCHES}


def latest_run(runs_dir: Path, switches: Mapping[str, bool] | None = None) -> Path:
    """The newest finished run (the newest report.json) of the method the current settings
    describe: its recorded switches (SWITCHES) equal `switches`, by default all on (the full
    method). So the ablations `merflow ablate` trains beside the full method are never `latest`
    for the default settings, while settings with a switch off pick runs made that way; the
    ablate flow's full-method runs are plain train runs (same settings, same run key) and
    count. Any run is named by its key."""
    wanted = dict(switches or method_switches())
    same, other = [], []
    for folder in runs_dir.glob("train-*"):
        try:
            recorded = json.loads((folder / REPORT_JSON).read_text()).get("settings") or {}
        except (OSError, ValueError):
            continue  # no readable report: not finished
        has = {s: recorded.get(s.removeprefix("train."), True) is not False for s in SWITCHES}
        off = [s for s in SWITCHES if not has[s]]
        (same if has == wanted else other).append((folder, off))
    if same:
        return max((f for f, _ in same), key=lambda d: (d / REPORT_JSON).stat().st_mtime_ns)
    wanted_off = [s for s, on in wanted.items() if not on]
    method = (
        "the full method (none of " + ", ".join(SWITCHES) + " set to false)"
        if not wanted_off
        else "the method with " + ", ".join(f"{s}=false" for s in wanted_off)
    )
    meaning = f"`{LATEST}` is the newest finished run of {method}, as the current settings say"
    if not other:
        raise RunFolderError(
            f"no finished training run under {runs_dir} (none has {REPORT_JSON}); {meaning}: "
            "train one first (`merflow train CORPUS --data-root ...`), or name a run folder"
        )
    shown = ", ".join(
        f"{f.name.removeprefix('train-')} "
        f"({', '.join(f'{s}=false' for s in off) or 'the full method'})"
        for f, off in sorted(other)[:5]
    )
    raise RunFolderError(
        f"no finished training run of that method under {runs_dir}; {meaning}, and the "
        f"{len(other)} finished runs there are others: {shown}; name one of them by its key, "
        "give the settings it was trained with, or train one (`merflow train CORPUS "
        "--data-root ...`)"
    )


def _train_settings(recorded: Mapping[str, Any]) -> TrainSettings:
    # Settings this merflow does not know (a newer version's) are left out, not refused.
    known = {k: v for k, v in recorded.items() if k in TrainSettings.model_fields}
    return TrainSettings.model_validate(known)


def load_run(folder: Path) -> TrainedRun:
    """A finished run folder, checked whole: every missing piece is named at once, with the way
    out. Models are not loaded yet (load_models)."""
    folder = Path(folder)
    key = folder.name.removeprefix("train-")
    again = (
        "rerun `merflow train` with the run's settings (its settings.yaml): finished steps are "
        "kept and skipped; or name another run (`latest` is the newest finished run of the "
        "full method)"
    )
    if not folder.is_dir():
        raise RunFolderError(f"run folder {folder} does not exist; {again}")
    if not (folder / REPORT_JSON).is_file():
        raise RunFolderError(
            f"run {key} has not finished: {folder / REPORT_JSON} is missing; {again}"
        )
    report = json.loads((folder / REPORT_JSON).read_text())
    settings = _train_settings(report.get("settings") or {})
    n_splits = len(report.get("fold_waf") or []) or settings.n_splits
    missing: list[str] = []
    fold_dirs = []
    for k in range(n_splits):
        fold = folder / f"fold-{k}"
        needed = [fold / "done.json", fold / "model" / "config.json"]
        needed.append(fold / "model" / "model.safetensors")
        missing += [str(p.relative_to(folder)) for p in needed if not p.is_file()]
        fold_dirs.append(fold / "model")
    normalizer = None
    if (folder / NORMALIZER).is_file():
        normalizer = load_normalizer(folder / NORMALIZER)
    elif settings.standardize:
        missing.append(NORMALIZER)
    if missing:
        raise RunFolderError(
            f"run {key} in {folder} is partial: missing {', '.join(missing)}; {again}"
        )
    ids = dict(report.get("extractor_ids") or {})
    if set(ids) != set(MODALITIES):
        raise RunFolderError(
            f"{folder / REPORT_JSON} names extractor ids for {sorted(ids)}, not {list(MODALITIES)};"
            f" {again}"
        )
    return TrainedRun(key, folder, ids, settings, fold_dirs, normalizer)


def resolve_device(device: str) -> str:
    """`models.device` as torch takes it: `auto` is cuda where one is present, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_models(run: TrainedRun, device: str = "cpu") -> TrainedRun:
    """Load every fold's model as it was saved (safetensors + config.json) onto `device`; a
    model trained on other features than the run's report names is refused."""
    from models.checkpoint import load_checkpoint

    models = []
    for folder in run.fold_dirs:
        ckpt = load_checkpoint(folder, resolve_device(device))
        if ckpt.extractor_ids != run.extractor_ids:
            raise RunFolderError(
                f"{folder} was trained on {ckpt.extractor_ids}, but the run's report names "
                f"{run.extractor_ids}; the run folder mixes runs: train it again"
            )
        models.append(ckpt.model)
    run.models = models
    return run


# ----------------------------------------------------------------------------- features


def video_rows(paths: Iterable[Path]) -> pd.DataFrame:
    """Manifest-like rows of single video files (id: the file stem), for the stage engine; the
    manifest itself is left alone (a debugging run)."""
    from tasks.corpus.scan import sha256_file

    rows = []
    for p in paths:
        p = Path(p).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"video {p} does not exist; give a video file or a folder")
        rows.append({"video_id": p.stem, "sha256": sha256_file(p), "path": str(p)})
    df = pd.DataFrame(rows, columns=["video_id", "sha256", "path"])
    dup = df.video_id[df.video_id.duplicated()].tolist()
    if dup:
        raise ValueError(f"video ids must be unique (the file stem): {dup} occur twice")
    return df


def extract_here(plan: Plan, videos: pd.DataFrame, store: Store) -> dict[str, int]:
    """Run every stage the videos still lack in this process, with the engine the flow's tasks
    run (tasks.engine.stage.run_stage), upstream first; returns how many each stage computed."""

    return {name: run_stage(plan.stage(name), videos, store).processed for name in STAGES}


def read_features(
    store: Store, feature_tables: Mapping[str, TableRef], videos: pd.DataFrame
) -> FeatureSet:
    """The videos' features under the run's tables, matched on their current bytes (video_id +
    sha256); a modality without a row is absent, never zeros that mean something."""
    ids = videos.video_id.astype(str).tolist()
    position = {k: i for i, k in enumerate(zip(ids, videos.sha256, strict=True))}
    n = len(ids)
    features, present = {}, {}
    for m in MODALITIES:
        table = feature_tables[m]
        dim = dict(table.contract.vector_dims)["embedding"]
        x, p = np.zeros((n, dim), np.float32), np.zeros(n, bool)
        if store.exists(table) and n:
            keys, mat = store.read_vectors(table, where={"video_id": ids})
            for j, k in enumerate(zip(keys.video_id, keys.sha256, strict=True)):
                i = position.get(k)
                if i is not None:
                    x[i], p[i] = mat[j], True
        features[m], present[m] = x, p
    return FeatureSet(np.array(ids), features, present, np.full(n, UNLABELLED, np.int64))


# ----------------------------------------------------------------------------- predictions


def fold_averaged(run: TrainedRun, data: FeatureSet) -> dict[str, np.ndarray]:
    """The run's fold models on `data` (standardised, modalities masked), averaged over folds."""
    from models.training import TrainConfig, predict

    if not run.models:
        raise ValueError("the run's models are not loaded; call load_models first")
    batch = TrainConfig().eval_batch_size  # rows per forward; a row's output does not depend on it
    return average_over_folds((predict(m, data, batch) for m in run.models), len(run.models))


def modalities_present(data: FeatureSet) -> list[str]:
    """Per video, its modalities with features, `+`-joined (`none`: nothing to label with)."""
    names = [[m for m in MODALITIES if data.present[m][i]] for i in range(len(data))]
    return ["+".join(n) or "none" for n in names]


def label_videos(
    store: Store,
    run: TrainedRun,
    plan: Plan,
    videos: pd.DataFrame,
    split: str = SPLIT,
) -> pd.DataFrame:
    """Label `videos` (video_id, sha256) from the stores with the run's loaded models; write
    the labelled ones to the predictions table; return the output table: one row per video
    (video, class, the six voted probabilities, modalities present, run key). A video without
    any modality gets no class (its failures say why) and no predictions row."""
    data = read_features(store, plan.feature_tables(), videos)
    (data,) = quality_kept(store, plan, run.settings, data)
    mods = modalities_present(data)
    if run.normalizer is not None:
        apply_zscore(data.features, data.present, run.normalizer)
    ok = np.flatnonzero([m != "none" for m in mods])
    labelled = data.subset(ok)
    probs = fold_averaged(run, labelled) if len(ok) else {}
    if len(ok):
        truth = store.read(tables.LABELS, where={"video_id": labelled.video_ids.tolist()})
        known = dict(zip(truth.video_id, truth.label, strict=True))
        rows = prediction_rows(
            run.key,
            labelled,
            probs,
            split,
            np.full(len(ok), -1, np.int32),
            [known.get(v) for v in labelled.video_ids],
        )
        store.upsert(tables.PREDICTIONS, rows)
    voted = np.full((len(data), len(CLASSES)), np.nan)
    if len(ok):
        voted[ok] = np.asarray(probs["voted"], np.float32)
    classes = [None] * len(data)
    for i in ok:
        classes[i] = CLASSES[int(voted[i].argmax())]
    out = pd.DataFrame({"video_id": data.video_ids, "class": classes})
    for c, name in enumerate(CLASSES):
        out[f"p_{name}"] = voted[:, c]
    out["modalities"] = mods
    out["run_key"] = run.key
    log.info("run %s labelled %d of %d videos", run.key, len(ok), len(data))
    return out


def failure_reasons(store: Store, videos: pd.DataFrame) -> dict[str, str]:
    """Per video, its recorded failures as one line (why a modality is missing)."""
    ids = videos.video_id.astype(str).tolist()
    if not ids or not store.exists(tables.FAILURES):
        return {}
    failed = store.read(tables.FAILURES, where={"video_id": ids})
    current = set(zip(videos.video_id, videos.sha256, strict=True))
    failed = failed[[k in current for k in zip(failed.video_id, failed.sha256, strict=True)]]
    return {
        v: "; ".join(f"{r.stage}: {r.message}" for r in g.itertuples(index=False))
        for v, g in failed.groupby("video_id")
    }


def write_csv(table: pd.DataFrame, folder: Path) -> Path:
    """The output table as a CSV under `folder` (one file per invocation, by UTC time)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"predict-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    return path


def table_text(table: pd.DataFrame) -> str:
    """The output table as aligned text for the terminal."""
    shown = table.copy()
    shown["class"] = shown["class"].fillna("-")
    return shown.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")


def to_label(
    store: Store, run: TrainedRun, plan: Plan, manifest: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, int]:
    """The manifest's videos the run has no prediction of yet (neither its own cv/unlabeled rows
    nor an earlier predict row), and how many of the rest still wait for extraction (a stage
    lacks their row): those are left for a later run, not labelled with modalities missing."""
    manifest = store.read(tables.MANIFEST) if manifest is None else manifest
    manifest = manifest[manifest.has_video | manifest.has_audio]  # unreadable: never extracted
    if manifest.empty:
        return manifest[["video_id", "sha256"]], 0
    seen = set()
    if store.exists(tables.PREDICTIONS):
        preds = store.read(tables.PREDICTIONS, columns=["video_id", "run_id"])
        seen = set(preds.video_id[preds.run_id == run.key])
    new = manifest[~manifest.video_id.isin(seen)]
    waiting = set().union(*pending_per_stage(store, new, plan).values()) if len(new) else set()
    ready = new[~new.video_id.isin(waiting)]
    return ready[["video_id", "sha256"]].reset_index(drop=True), len(waiting)
