"""The predict flows: label videos with a finished training run, without retraining.

`predict` scans folders of videos into the manifest, extracts what they still lack with the
extract flow's stage tasks on a plan of the run's extractors (refused before any work when the
current settings extract other features), then labels them with the run's fold models
(tasks/predict.py). `predict-new` labels the videos of the stores the latest finished run has
not labelled yet; `reextract-new` starts it after extracting new videos (flows/deploy.py).
Both show the new predictions as a table artifact and write them to the predictions table and a
CSV under the run folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from data_contracts.location import normalize_root
from data_contracts.store import Store
from flows.config import Settings, load_settings
from flows.extract import pending_per_stage, scan_task, shard_results, submit_stages
from flows.plan import ExtractionPlan, matching_plan
from flows.safety import check_all_under_roots, checked_corpus_root, data_root_paths, trusted_roots
from tasks.dag import STAGES
from tasks.engine.gpu_slots import gpu_slot
from tasks.engine.shard import shards
from tasks.predict import (
    LATEST,
    RunFolderError,
    TrainedRun,
    failure_reasons,
    find_run,
    label_videos,
    load_models,
    load_run,
    method_switches,
    resolve_device,
    to_label,
    write_csv,
)


def runs_dir(settings: Settings, root: Path | str) -> Path:
    """Where a data root's training runs are (a local folder even for a URL data root)."""
    return settings.local_root(root) / "runs"


def open_run(settings: Settings, root: Path | str, which: str) -> tuple[TrainedRun, ExtractionPlan]:
    """The run `which` names, checked whole, and the plan of its extractors under the current
    settings (refused when they differ)."""
    switches = method_switches(settings.train)
    run = load_run(find_run(runs_dir(settings, root), which, switches))
    return run, matching_plan(settings, root, run)


@task(name="label-videos", cache_policy=NO_CACHE)
def label_task(
    run: TrainedRun, plan: ExtractionPlan, videos: pd.DataFrame, data_root: str, settings: Settings
) -> pd.DataFrame:
    """Prefect task: the run's fold models on the videos' stored features (tasks/predict.py)."""
    device = resolve_device(settings.models.device)
    with gpu_slot(device, slots_per_device=settings.prefect.gpu_slots):
        load_models(run, device)
        return label_videos(Store(data_root), run, plan, videos)


def extract_videos(
    plan: ExtractionPlan,
    videos: pd.DataFrame,
    root: str,
    settings: Settings,
    official: dict[str, str] | None = None,
) -> dict[str, int]:
    """The extract flow's stage tasks (flows/extract.py) on the shards of `videos` that some
    stage still lacks; returns what each stage computed. `official`: transcripts that take
    precedence (robustness keeps a labelled video's official text); None: ASR fills in the
    transcripts table of the run's extractor id (matching_plan), as for new videos."""
    pending = pending_per_stage(Store(root), videos, plan)
    todo = videos[videos.video_id.isin(set().union(*pending.values()))]
    if todo.empty:
        return dict.fromkeys(STAGES, 0)
    parts = shards(todo, settings.extract.shard_size)
    futures = submit_stages(plan, parts, root, settings, pending, official)
    totals, _ = shard_results(futures, parts, get_run_logger())
    return {s: t.processed for s, t in totals.items()}


def _finish(
    table: pd.DataFrame, run: TrainedRun, store: Store, videos: pd.DataFrame, key: str
) -> dict:
    """The output table with why videos got no class, as a UI table artifact and a CSV."""
    reasons = failure_reasons(store, videos)
    table = table.assign(note=[reasons.get(v, "") for v in table.video_id])
    csv = write_csv(table, run.folder / "predict")
    records = table.astype(object).where(table.notna(), None).to_dict("records")
    create_table_artifact(
        records,
        key=key,
        description=f"labels of {len(table)} videos by run {run.key} (voted, fold-averaged); "
        f"CSV {csv}",
    )
    return {"run_key": run.key, "csv": str(csv), "rows": records}


@flow(name="predict", flow_run_name="predict-{profile}", log_prints=True)
def predict_flow(
    run: str,
    video_dirs: list[str],
    data_root: str,
    profile: str = "demo",
    overrides: list[str] | None = None,
) -> dict:
    """Label the videos of folders with a finished training run, extracting what they lack.

    Args:
        run: `latest` (the newest finished run of the method the settings describe; by
            default the full method), a run key or a run folder.
        video_dirs: folders of videos to label (scanned into the manifest).
        data_root: the data root the run was trained on.
        profile: settings profile; its extractors must be the run's.
        overrides: key=value settings, e.g. ["models.device=cuda"].
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    settings = load_settings(profile, overrides)
    roots = trusted_roots(profile, overrides, settings)
    given = [("data_root", data_root), *(("video_dirs entry", d) for d in video_dirs)]
    check_all_under_roots(given, roots)
    root = normalize_root(data_root)
    check_all_under_roots(data_root_paths(settings, root), roots)
    trained, plan = open_run(settings, root, run)  # refused before anything is scanned
    dirs = [str(Path(d).expanduser().resolve()) for d in video_dirs]
    report, manifest = scan_task(dirs, str(root), settings.corpus.video_extensions)
    logger.info("scan: %s", report.summary())
    videos = manifest[manifest.has_video | manifest.has_audio]
    computed = extract_videos(plan, videos, str(root), settings)
    logger.info("extracted %s", computed)
    table = label_task(trained, plan, manifest[["video_id", "sha256"]], str(root), settings)
    out = _finish(table, trained, Store(root), manifest, "predictions")
    logger.info("run %s labelled %d videos; CSV %s", trained.key, len(table), out["csv"])
    return {**out, "extracted": computed}


@flow(name="predict-new", flow_run_name="predict-new-{profile}", log_prints=True)
def predict_new_flow(
    corpus_dir: str,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    run: str = LATEST,
) -> dict:
    """Label the videos the latest finished training run has not labelled yet (no retraining).

    Args:
        corpus_dir: corpus folder whose data root is read (see data_root).
        profile: settings profile; its extractors must be the run's.
        data_root: where stores and runs are (default <corpus_dir>/merflow).
        overrides: key=value settings.
        run: `latest` (the newest finished run of the method the settings describe; by
            default the full method) or a run key.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    settings = load_settings(profile, overrides)
    _, root = checked_corpus_root(settings, profile, overrides, corpus_dir, data_root)
    try:
        trained, plan = open_run(settings, root, run)
    except RunFolderError as e:
        if run != LATEST or any(runs_dir(settings, root).glob("train-*/report/report.json")):
            raise
        logger.info("nothing labelled: %s", e)  # no run has finished yet: nothing to label with
        return {"run_key": None, "labelled": 0, "waiting": 0}
    store = Store(root)
    videos, waiting = to_label(store, trained, plan)
    if waiting:
        logger.info("%d videos still wait for extraction (reextract-new) and are left", waiting)
    if videos.empty:
        logger.info("run %s has labelled every extracted video already", trained.key)
        return {"run_key": trained.key, "labelled": 0, "waiting": waiting}
    table = label_task(trained, plan, videos, str(root), settings)
    out = _finish(table, trained, store, videos, "predict-new")
    logger.info("run %s labelled %d new videos; CSV %s", trained.key, len(table), out["csv"])
    return {**out, "labelled": int(table["class"].notna().sum()), "waiting": waiting}
