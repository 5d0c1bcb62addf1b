"""The extraction flow: scan → shards → audio → (HuBERT, ASR → LLM) and faces → CLIP."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import allow_failure, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from data_contracts import tables
from data_contracts.location import normalize_root
from data_contracts.store import Store
from flows.config import Settings, load_settings, save_resolved
from flows.plan import CODE, ExtractionPlan, plan_extraction
from flows.safety import check_all_under_roots, data_root_paths, trusted_roots
from tasks.corpus.labels import load_labels, load_transcripts
from tasks.corpus.layout import corpus_layout
from tasks.corpus.scan import scan_videos
from tasks.dag import STAGES, UPSTREAM, pending_per_stage
from tasks.engine.shard import ShardReport, shards
from tasks.stores.check import check_task

log = logging.getLogger(__name__)


@dataclass
class ExtractionSummary:
    """What one extraction run did, per stage, and where its outputs are."""

    data_root: str
    videos: int
    shards: int
    scan: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    feature_tables: dict[str, str] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    check: dict[str, int] = field(default_factory=dict)

    def markdown(self) -> str:
        """The run summary as a Markdown table (a Prefect artifact and the CLI's printout)."""
        lines = [
            f"**{self.videos} videos in {self.shards} shards** · data root `{self.data_root}`",
            f"scan: {self.scan}",
            "",
            "| stage | computed | already done | cached shards | retried shards | failed "
            "| reasons |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for stage, s in self.stages.items():
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["reasons"].items())) or "-"
            lines.append(
                f"| {stage} | {s['processed']} | {s['skipped']} | {s['cached_shards']} "
                f"| {s['retried_shards']} | {s['failed']} | {reasons} |"
            )
        if any(s["retried_shards"] for s in self.stages.values()):
            lines += [
                "",
                "A retried shard counts its last attempt: rows an earlier attempt stored are "
                "under *already done*.",
            ]
        lines += ["", "| modality | feature table |", "|---|---|"]
        lines += [f"| {m} | `{t}` |" for m, t in self.feature_tables.items()]
        if self.failures:
            lines += ["", "| video | stage | reason |", "|---|---|---|"]
            for f in self.failures[:50]:
                lines.append(f"| {f['video_id']} | {f['stage']} | {f['message'][:160]} |")
        return "\n".join(lines)


@task(name="scan", cache_policy=NO_CACHE)
def scan_task(
    video_dirs: list[str],
    data_root: str,
    extensions: list[str] | None = None,
    pool: str | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Prefect task: scan the folders (files with `extensions`) into the manifest; `pool`:
    every video's pool (None: its folder's)."""
    return scan_videos([Path(d) for d in video_dirs], Store(data_root), extensions, pool=pool)


@task(name="load-labels", cache_policy=NO_CACHE)
def load_labels_task(labels_csv: str, data_root: str) -> int:
    """Prefect task: validate the label CSV and upsert it into the labels table."""
    labels = load_labels(Path(labels_csv))
    Store(data_root).upsert(tables.LABELS, labels)
    return len(labels)


def _resolve_corpus(corpus_dir: str, settings: Settings, video_dirs: list[str] | None):
    """The corpus folder, the folders to scan, the pool of every video (None: each folder's)
    and the line that says a plain folder's videos are unlabelled ("" for a MER2024 corpus)."""
    corpus = Path(corpus_dir).expanduser().resolve()
    if video_dirs:
        return corpus, [Path(d).expanduser().resolve() for d in video_dirs], None, ""
    c = settings.corpus
    found = corpus_layout(corpus, c.labelled_dir, c.unlabelled_dir, c.video_extensions)
    return corpus, found.video_dirs, found.pool, found.note(c.labelled_dir, c.unlabelled_dir)


def stage_tasks(settings: Settings) -> dict[str, Any]:
    """Each stage's Prefect task, retried `extract.retries` times on transient errors."""
    return {s: CODE[s].task.with_options(retries=settings.extract.retries) for s in STAGES}


def ensure_gpu_slots(slots_per_device: int) -> int:
    """This machine's GPU slot limits, one per device (tasks/engine/gpu_slots.py), created or
    resized to slots_per_device; returns how many devices have one (0 on a CPU-only machine,
    where the server is not asked). Workers on other machines create their own on first use."""
    from tasks.engine.gpu_slots import ensure_gpu_slots as ensure_device_slots

    return len(ensure_device_slots(slots_per_device))


def cpu_lanes(settings: Settings, n_shards: int) -> int:
    """How many shards' raw-video stages (audio split, faces) run at once per stage.

    In one process (the thread runner) they run in shard order, one shard at a time per stage,
    so shard 1's crops are done early and CLIP on shard k runs while the faces of shard k+1
    are cropped; started all at once they would share the cores and all finish last. A local
    Dask cluster gets one lane per worker; an existing scheduler (size unknown) no order.
    """
    e = settings.extract
    if e.task_runner == "dask":
        return n_shards if e.dask_address else max(1, e.dask_workers)
    return 1


def submit_stages(
    plan: ExtractionPlan,
    parts: list[pd.DataFrame],
    root: str,
    settings: Settings,
    pending: dict[str, set[str]],
    official: dict[str, str] | None = None,
) -> dict[str, list[PrefectFuture]]:
    """Submit every stage's task on every shard; returns each stage's futures in shard order.

    A model stage waits for its own input on the same shard only; raw-video stages run shard
    after shard per lane (cpu_lanes), so the CPU stages of the next shard overlap the model
    stages of this one. The store is the truth: a stage whose rows the shard still lacks
    (`pending`) refreshes its Prefect cache entry. `official`: the corpus's official
    transcripts (None: ASR text only, under the plan's transcripts extractor id).
    """
    if any(m.device != "cpu" for m in plan.models.values()):
        ensure_gpu_slots(settings.prefect.gpu_slots)
    futures: dict[str, list[PrefectFuture]] = defaultdict(list)
    tasks = stage_tasks(settings)
    fresh = {stage: t.with_options(refresh_cache=True) for stage, t in tasks.items()}
    lanes = cpu_lanes(settings, len(parts))
    for i, part in enumerate(parts):
        ids = set(part.video_id)
        shard_official = {k: v for k, v in (official or {}).items() if k in ids}
        for stage in STAGES:
            run = fresh[stage] if pending[stage] & ids else tasks[stage]
            if stage in UPSTREAM:  # a model stage waits for its own input only
                after = [futures[UPSTREAM[stage]][-1]]
            else:  # raw-video stages run shard after shard in each lane (see cpu_lanes); a
                # failed shard does not hold back the next one
                after = [allow_failure(futures[stage][i - lanes])] if i >= lanes else None
            args = plan.stage_args(stage, shard_official)
            futures[stage].append(run.submit(part, root, **args, wait_for=after))
    return futures


def shard_results(
    futures: dict[str, list[PrefectFuture]],
    parts: list[pd.DataFrame],
    logger: Any,
    progress: Any = None,
) -> tuple[dict[str, ShardReport], Counter]:
    """Each stage's reports summed over the shards, and how many shards Prefect's cache
    skipped. Results come in completion order: a log line per stage and shard (the run's logs,
    in the UI and on stderr; they are the command line's progress too, as progress bars would
    interleave with them) and the progress artifact `progress` (if given) advance as shards
    finish."""
    totals: dict[str, ShardReport] = {s: ShardReport(s) for s in STAGES}
    cached: Counter = Counter()
    where = {fut: (stage, i) for stage in STAGES for i, fut in enumerate(futures[stage])}
    left = [len(STAGES)] * len(parts)
    for fut in as_completed(list(where)):
        stage, i = where[fut]
        fut.wait()  # sets the future's final state; without it .state asks the API
        hit = fut.state.name == "Cached"  # Prefect skipped the task: nothing was computed
        shard = ShardReport(stage, skipped=len(parts[i])) if hit else fut.result()
        cached[stage] += hit
        totals[stage] = totals[stage].merge(shard)
        level = logging.WARNING if shard.failed else logging.INFO
        logger.log(level, shard.line(i + 1, len(parts), cached=hit))
        left[i] -= 1
        if left[i] == 0 and progress is not None:
            done = sum(n == 0 for n in left)
            update_progress_artifact(progress, progress=100.0 * done / len(parts))
    return totals, cached


@flow(name="extract", flow_run_name="extract-{profile}", log_prints=True)
def extract_flow(
    corpus_dir: str,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    only_new: bool = False,
    video_dirs: list[str] | None = None,
) -> dict:
    """Extract every modality's features of a corpus into the feature stores.

    corpus_dir: folder holding video-labeled/, video-unlabeled/ and the label CSVs, or a plain
        folder of videos (all of them unlabelled).
    profile: settings profile (demo: tiny models; paper: the real ones).
    data_root: where stores and artifacts go (default <corpus_dir>/merflow); a local folder or
        an object-storage URL such as s3://bucket/prefix (models stay in a local folder).
    overrides: key=value settings, e.g. ["faces.fps=5"].
    only_new: extract only videos some stage still lacks (new, changed or unfinished).
    video_dirs: scan these folders instead of the corpus's two pools.
    """
    logger = get_run_logger()
    settings = load_settings(profile, overrides or [])
    # Parameters may come from the UI: every path must lie under the allowed roots (if set),
    # checked before anything is read or written; the derived paths are checked again below.
    roots = trusted_roots(profile, overrides or [], settings)
    given = [("corpus_dir", corpus_dir), *(("video_dirs entry", d) for d in video_dirs or [])]
    check_all_under_roots([*given, *([("data_root", data_root)] if data_root else [])], roots)
    corpus, dirs, pool, note = _resolve_corpus(corpus_dir, settings, video_dirs)
    if note:
        logger.info(note)
    root = settings.resolved_data_root(corpus) if not data_root else normalize_root(data_root)
    check_all_under_roots(
        [
            *data_root_paths(settings, root),
            ("labels CSV", corpus / settings.corpus.labels_csv),
            ("transcripts CSV", corpus / settings.corpus.transcripts_csv),
            *(("video folder", d) for d in dirs),
        ],
        roots,
    )
    store = Store(root)
    if isinstance(root, Path):
        save_resolved(settings, root / "runs" / "extract-settings.yaml")
    else:  # beside the stores on the object store, where `merflow check` looks for it
        resolved = yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
        store.write_text("runs/extract-settings.yaml", resolved)

    labels_csv = corpus / settings.corpus.labels_csv
    if labels_csv.exists():
        load_labels_task(str(labels_csv), str(root))
    official = None
    transcripts_csv = corpus / settings.corpus.transcripts_csv
    if settings.extract.prefer_official_transcripts and transcripts_csv.exists():
        t = load_transcripts(transcripts_csv)
        official = dict(zip(t.video_id, t.text, strict=True))

    extensions = settings.corpus.video_extensions
    report, manifest = scan_task([str(d) for d in dirs], str(root), extensions, pool)
    logger.info("scan: %s", report.summary())
    videos = manifest[manifest.has_video | manifest.has_audio]
    plan = plan_extraction(settings, root, corpus)
    # The store is the truth: a Prefect cache entry whose rows the store no longer holds (a
    # deleted or restored data root) is refreshed, never trusted.
    pending = pending_per_stage(store, videos, plan)
    if only_new:
        # New or changed bytes, and anything an earlier (killed or overlapping) run left
        # unfinished: every video some stage still lacks. Known-bad videos stay skipped.
        todo = set().union(*pending.values())
        videos = videos[videos.video_id.isin(todo)]
    parts = shards(videos, settings.extract.shard_size)
    progress = create_progress_artifact(
        progress=0.0, key="extract-progress", description="extraction shards finished"
    )
    futures = submit_stages(plan, parts, str(root), settings, pending, official)
    totals, cached = shard_results(futures, parts, logger, progress)

    summary = ExtractionSummary(str(root), len(videos), len(parts), report.summary())
    for stage, t in totals.items():
        summary.stages[stage] = {
            "processed": t.processed,
            "skipped": t.skipped,
            "failed": t.failed,
            "cached_shards": cached[stage],
            "retried_shards": t.retried,
            "reasons": dict(t.reasons),
            "seconds": round(t.seconds, 3),  # summed over shards (overlapping ones too)
            "threads": t.threads,  # most torch threads a shard computed with (0: none claimed)
        }
    summary.feature_tables = {m: t.name for m, t in plan.feature_tables().items()}
    run_ids = sorted(set(videos.video_id) | set(report.unreadable))
    failed = store.read(tables.FAILURES, where={"video_id": run_ids})
    if len(failed):
        summary.failures = failed[["video_id", "stage", "error_type", "message"]].to_dict("records")
    create_markdown_artifact(summary.markdown(), key="extract-summary", description="extraction")
    # The feature-store health check (leakage, NaN/zero vectors, drift) as a UI artifact; its
    # findings never fail the extraction, `merflow check` exits non-zero on errors.
    check = check_task(str(root), settings.train.n_splits, settings.train.seed)
    create_markdown_artifact(
        check.markdown(), key="merflow-check", description="feature-store check"
    )
    summary.check = {"errors": check.count("error"), "warnings": check.count("warning")}
    return summary.__dict__
