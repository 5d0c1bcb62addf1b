"""The robustness flow: how much noise a finished run survives (MER-NOISE style).

For each corruption level (tasks/corrupt.py) the run's labelled videos get corrupted features
from the extract flow's own stage tasks, on a plan whose raw-video stage corrupts (noise in the
audio split, blur, downscaling or dropped frames in the faces): rows of their own beside the
clean ones, cached and resumable like every stage, so a second invocation computes nothing.
Then each fold's model is scored on its own validation videos at every level
(tasks/training/robustness.py): the table and plot go to the run folder's `robustness/` and to the
UI as artifacts.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from data_contracts.store import Store
from flows.config import Settings, load_settings
from flows.plan import ExtractionPlan
from flows.predict import extract_videos, open_run
from flows.safety import checked_data_root
from tasks.corrupt import DEFAULT_LEVELS, parse_levels
from tasks.engine.gpu_slots import gpu_slot
from tasks.predict import LATEST, TrainedRun, load_models, resolve_device
from tasks.training.robustness import (
    Level,
    levels_of,
    official_texts,
    report_markdown,
    robustness_report,
    score_level,
    validation_videos,
    write_report,
)


@task(name="score-robustness", cache_policy=NO_CACHE)
def score_task(
    run: TrainedRun,
    plan: ExtractionPlan,
    levels: list[Level],
    folds: list[pd.DataFrame],
    data_root: str,
    settings: Settings,
) -> list[dict[str, Any]]:
    """Prefect task: every fold's model on its validation videos at every level."""
    device = resolve_device(settings.models.device)
    with gpu_slot(device, slots_per_device=settings.prefect.gpu_slots):
        load_models(run, device)
        store = Store(data_root)
        return [score_level(store, run, level, plan, folds) for level in levels]


def robustness_of(
    trained: TrainedRun,
    plan: ExtractionPlan,
    levels: list[Level],
    root: str,
    settings: Settings,
    logger: Any,
) -> dict[str, Any]:
    """Extract every level's corrupted features of the run's labelled videos (what the stores
    lack), score the run at every level and write the report; returns it, with what each
    level's stages computed under `extracted`. The ablate flow calls this for each system."""
    for level in levels:
        level.plan(plan)  # a level the run's extractors cannot take is refused before any work
    store = Store(root)
    folds = validation_videos(trained, store)
    videos = pd.concat(folds, ignore_index=True)
    official = official_texts(store, plan, videos)  # noise does not change what was said
    extracted = {}
    for level in levels[1:]:  # the clean level's features are the run's own
        computed = extract_videos(level.plan(plan), videos, root, settings, official)
        extracted[level.name] = computed
        logger.info("%s: computed %s (0: already stored)", level.name, computed)
    scored = score_task(trained, plan, levels, folds, root, settings)
    report = robustness_report(trained, scored)
    out = write_report(trained, report)
    logger.info("run %s: robustness report in %s", trained.key, out)
    return {**report, "extracted": extracted, "folder": str(out)}


def publish(report: dict[str, Any], key: str = "robustness") -> None:
    """The report as the UI's markdown artifact and its long table as a table artifact."""
    from tasks.training.robustness import long_table

    create_markdown_artifact(
        report_markdown(report), key=key, description=f"robustness of run {report['run_key']}"
    )
    table = long_table(report)
    table = table[table.fold == -1].drop(columns="fold")
    create_table_artifact(
        table.astype(object).where(table.notna(), None).to_dict("records"),
        key=f"{key}-table",
        description="mean WAF over folds per level and classifier",
    )


@flow(name="robustness", flow_run_name="robustness-{profile}", log_prints=True)
def robustness_flow(
    corpus_dir: str | None = None,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    run: str = LATEST,
    levels: list[str] | None = None,
) -> dict:
    """Score a finished run on corrupted copies of its own validation videos.

    Args:
        corpus_dir: the corpus the run was trained on (its data root is read; see data_root).
        profile: settings profile; its extractors must be the run's.
        data_root: the data root the run was trained on (default <corpus_dir>/merflow); one of
            corpus_dir and data_root is needed.
        overrides: key=value settings, e.g. ["models.device=cuda"].
        run: `latest` (the newest finished run of the method the settings describe), a run key
            or a run folder.
        levels: corruption levels `KIND:LEVEL` (`noise:10`, `blur:2`, `down:4`, `drop:25`;
            `noise:20,10,5` for several); default: white noise at 20, 10, 5, 0 dB SNR and
            MER-NOISE's pyramid blur at rates 2 and 4 (down:2,4).
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    settings = load_settings(profile, overrides)
    corruptions = parse_levels(levels or DEFAULT_LEVELS)  # refused before any work
    _, root = checked_data_root(settings, profile, overrides, corpus_dir, data_root)
    trained, plan = open_run(settings, root, run)
    out = robustness_of(trained, plan, levels_of(corruptions), str(root), settings, logger)
    publish(out)
    return out
