"""The one engine every extraction stage runs on: a stage is data, `run_stage` runs it on a shard.

A `Stage` says what it writes (table and extractor id), what it reads (an upstream table's rows
under one extractor id, or the raw video), how to load one video's input, and how to compute a
group of loaded inputs (model stages batch across a shard's videos in bounded groups; raw-video
stages take one video at a time). `run_stage` does the rest, the same way for all six stages and
for `merflow task`: it selects the videos still pending in the store, records deterministic bad
inputs as failure rows carrying the Prefect attempt number, clears the failure rows of videos
that now succeed, and commits what it wrote even when a transient error escapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store
from data_contracts.tables import TableRef
from tasks.defaults import DEFAULT_RETRIES
from tasks.engine import video_pool
from tasks.engine.errors import BadInputError
from tasks.engine.gpu_slots import cpu_cores, device_index, gpu_slot
from tasks.engine.shard import (
    ShardReport,
    current_attempt,
    now_utc,
    retry_if_transient,
    select_pending,
    shard_cache_key,
)

# One loaded input per video, and what computing a group of them gives: per video, in order,
# its output row or the bad-input error that makes it a failure row. A stage with a side table
# puts the video's side rows (frame-level features) under SIDE_ROWS in its output row.
Item = tuple[Any, Any]  # (manifest row, loaded input)
# A compute that runs videos side by side may also give another exception for one video (a
# transient error): the engine commits the others' rows and then raises it.
Result = dict | Exception
SIDE_ROWS = "_side_rows"
Compute = Callable[[list[Item]], list[Result]]


class MissingModalityError(BadInputError):
    """The input a modality needs does not exist for this video (no face, no audio, no text)."""


@dataclass(frozen=True)
class Upstream:
    """The rows a stage reads: `table` under `extractor_id`, written by stage `stage`."""

    stage: str
    table: TableRef
    extractor_id: str
    # Videos that do without an upstream row (those with an official transcript).
    optional_for: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Side:
    """A second table a stage writes in the same pass (the model runs once): `table`'s rows
    under `extractor_id`, several per video (frame-level features beside utterance ones)."""

    table: TableRef
    extractor_id: str


@dataclass(frozen=True)
class Stage:
    """One extraction stage, as data.

    start: (store) -> the function computing a group of loaded inputs; it loads what the stage
        computes with (a model, ffmpeg, a face backend) once, when a shard has pending videos,
        and a configuration error raised here stops the shard before any video.
    load: (store, video, upstream row or None) -> the video's input; raises BadInputError
        (MissingModalityError) for a missing or bad one. None: the input is the video itself.
    batch: videos per compute call.
    side: a second table written in the same pass; a video is done when both tables hold it.
    device, gpu_slots: where the stage computes; on a GPU the shard holds one of the device's
        `gpu_slots` slots on this machine while it computes (tasks/engine/gpu_slots.py).
    threads: torch threads a CPU stage wants from this machine's cores while a shard computes
        (tasks/engine/gpu_slots.py cpu_cores; it computes with its share); 0: it claims none (its
        work is in other processes). `fixed_threads`: `threads` is a setting, used as given.
    """

    name: str
    table: TableRef
    extractor_id: str
    start: Callable[[Store], Compute]
    upstream: Upstream | None = None
    load: Callable[[Store, Any, Any], Any] | None = None
    batch: int = 1
    device: str = "cpu"
    gpu_slots: int = 1
    side: Side | None = None
    threads: int = 0
    fixed_threads: bool = False

    @property
    def cache_id(self) -> str:
        """What the stage's output depends on, for Prefect's cache key: its extractor id, and
        its side table's when it writes one (turning frame features on is new work)."""
        if self.side is None:
            return self.extractor_id
        # Cache keys name files of Prefect's result storage: no "/" from the table's name.
        side = hashlib.sha256(self.side.table.name.encode()).hexdigest()[:8]
        return f"{self.extractor_id}+side-{side}"


def stage_pending(
    stage: Stage, videos: pd.DataFrame, store: Store, retry_failed: bool = False
) -> tuple[pd.DataFrame, int, set[tuple[str, str]]]:
    """select_pending for a stage: videos its table lacks, or its side table lacks."""
    side = (stage.side.table, stage.side.extractor_id) if stage.side else None
    return select_pending(
        videos, store, stage.table, stage.name, stage.extractor_id, retry_failed, side=side
    )


def one_at_a_time(work: Callable[[Any], dict]) -> Compute:
    """A group compute from a per-video function whose BadInputError fails that video only."""

    def compute(items: list[Item]) -> list[Result]:
        out: list[Result] = []
        for video, _ in items:
            try:
                out.append(work(video))
            except BadInputError as e:
                out.append(e)
        return out

    return compute


def artifact_stage(
    name: str,
    table: TableRef,
    extractor_id: str,
    suffix: str,
    setup: Callable[[], Callable[..., Any]],
    processes: int = 0,
    together: int = 1,
) -> Stage:
    """A raw-video stage that writes one artifact per video.

    `setup()` gives `make(video_path, out_path)`, which writes the artifact and returns a result
    whose attributes name the table's other columns; keys, stored path and time are added here.
    `setup` runs once per shard here (a configuration error stops the shard before any video).
    processes > 0: `make` runs in that many worker processes (tasks/engine/video_pool.py), each with
    its own `setup()` kept across shards, several videos at a time; `setup` must then pickle (a
    module-level function or a partial of one) and `make`'s result too.
    together > 1: `make` takes up to that many videos at once, [(video_path, out_path), ...],
    and gives per video, in order, its result or the error that fails it (see `Result`).
    """
    if processes > 0 and together > 1:
        raise ValueError(f"stage {name}: either worker processes or videos together, not both")
    fixed = {"video_id", "sha256", "extractor_id", "path", "created_at"}
    own = [c for c in table.contract.columns if c not in fixed]

    def row(store: Store, video: Any, out: Path, result: Any) -> dict:
        return {
            "video_id": video.video_id,
            "sha256": video.sha256,
            "extractor_id": extractor_id,
            "path": store.publish_artifact(out),
            **{c: getattr(result, c) for c in own},
            "created_at": now_utc(),
        }

    def start(store: Store) -> Compute:
        make = setup()

        def out_path(video: Any) -> Path:
            return store.artifact_path(name, extractor_id, video.video_id, video.sha256, suffix)

        def work(video: Any) -> dict:
            out = out_path(video)
            return row(store, video, out, make(Path(video.path), out))

        def finish(items: list[Item], outs: list[Path], made: list[Any]) -> list[Result]:
            # Per video: its row, or the error that fails it (a bad input's failure row, or
            # another, raised after the commit).
            return [
                r if isinstance(r, Exception) else row(store, video, out, r)
                for (video, _), out, r in zip(items, outs, made, strict=True)
            ]

        if together > 1:

            def grouped(items: list[Item]) -> list[Result]:
                outs = [out_path(video) for video, _ in items]
                jobs = [(Path(v.path), out) for (v, _), out in zip(items, outs, strict=True)]
                return finish(items, outs, make(jobs))

            return grouped
        if processes < 1:
            return one_at_a_time(work)

        def in_workers(items: list[Item]) -> list[Result]:
            if len(items) == 1:  # a pool's start costs more than one video's work
                return one_at_a_time(work)(items)
            outs = [out_path(video) for video, _ in items]
            workers = video_pool.pool(processes)
            futures = [
                workers.submit(setup, Path(video.path), out)
                for (video, _), out in zip(items, outs, strict=True)
            ]
            return finish(items, outs, [f.exception() or f.result() for f in futures])

        return in_workers

    # Several videos per group when they run side by side, so that every process has work.
    return Stage(name, table, extractor_id, start, batch=max(together, 4 * processes, 1))


def groups(df: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    """Consecutive groups of at most `size` rows: a shard of long clips cannot exhaust memory."""
    size = max(1, size)
    for i in range(0, len(df), size):
        yield df.iloc[i : i + size]


def _upstream_rows(up: Upstream | None, store: Store, todo: pd.DataFrame) -> pd.DataFrame | None:
    # Only this shard's rows under the one extractor id: never the whole table.
    if up is None:
        return None
    where = {"video_id": todo.video_id.tolist(), "extractor_id": [up.extractor_id]}
    return store.read(up.table, where=where).set_index(["video_id", "sha256"])


def _load(stage: Stage, store: Store, video: Any, rows: pd.DataFrame | None) -> Any:
    up = stage.upstream
    row = None
    if up is not None:
        key = (video.video_id, video.sha256)
        if key in rows.index:
            row = rows.loc[key]
        elif video.video_id not in up.optional_for:
            raise MissingModalityError(
                f"video {video.video_id} has no {up.stage} output under {up.extractor_id} (see "
                f"its '{up.stage}' failure); its {stage.name} output is marked missing"
            )
    return stage.load(store, video, row) if stage.load is not None else None


def run_stage(
    stage: Stage,
    videos: pd.DataFrame,
    store: Store,
    retry_failed: bool = False,
    attempt: int | None = None,
) -> ShardReport:
    """Run `stage` on the videos of a shard (manifest rows) that its table lacks.

    Bad inputs become failure rows with the attempt number (the Prefect task run's, 1 outside
    Prefect); a video that succeeds loses its old failure row. Rows are written in one upsert
    at the end, and also when a transient error escapes, so work done is never lost.
    """
    missing = {"video_id", "sha256", "path"} - set(videos.columns)
    if missing:
        raise ValueError(f"videos lack columns {sorted(missing)}; pass manifest rows")
    attempt = attempt or current_attempt()
    report = ShardReport(stage.name, retried=int(attempt > 1))
    started = time.perf_counter()
    todo, report.skipped, failed_before = stage_pending(stage, videos, store, retry_failed)
    report.seconds = time.perf_counter() - started
    if todo.empty:
        return report
    # A GPU slot on a GPU, a share of the machine's cores on a CPU.
    with gpu_slot(stage.device, slots_per_device=stage.gpu_slots), _cores(stage) as claim:
        started = time.perf_counter()  # the wait for a slot is not the stage's work
        _compute(stage, todo, store, attempt, report, failed_before)
        report.seconds += time.perf_counter() - started
        report.threads = max(claim.seen or [claim.threads]) if claim is not None else 0
    return report


def _cores(stage: Stage) -> contextlib.AbstractContextManager:
    """The CPU stage's claim on this machine's cores (model.use_threads() computes with it)."""
    if stage.threads < 1 or device_index(stage.device) is not None:
        return contextlib.nullcontext()
    fixed = stage.threads if stage.fixed_threads else None
    return cpu_cores(stage.threads, fixed, what=f"extract {stage.name}")


def _compute(
    stage: Stage,
    todo: pd.DataFrame,
    store: Store,
    attempt: int,
    report: ShardReport,
    failed_before: set[tuple[str, str]],
) -> None:
    compute = stage.start(store)
    upstream = _upstream_rows(stage.upstream, store, todo)
    rows: list[dict] = []
    failures: list[dict] = []

    def fail(video: Any, e: BadInputError) -> None:
        failures.append(
            failure_row(video.video_id, video.sha256, stage.name, e, stage.extractor_id, attempt)
        )

    escaped: list[Exception] = []  # errors of single videos computed side by side
    try:
        for group in groups(todo, stage.batch):
            items: list[Item] = []
            for video in group.itertuples(index=False):
                try:
                    items.append((video, _load(stage, store, video, upstream)))
                except BadInputError as e:
                    fail(video, e)
            if not items:
                continue
            for (video, _), result in zip(items, compute(items), strict=True):
                if isinstance(result, BadInputError):
                    fail(video, result)
                elif isinstance(result, Exception):
                    escaped.append(result)
                else:
                    rows.append(result)
                    report.processed += 1
            if escaped:  # the others' rows are committed below, then the shard is retried
                raise escaped[0]
    finally:
        _commit(store, stage, rows, failures, failed_before, report)


def _commit(
    store: Store,
    stage: Stage,
    rows: list[dict],
    failures: list[dict],
    failed_before: set[tuple[str, str]],
    report: ShardReport,
) -> None:
    """Write result and failure rows; drop the old failure rows of videos that now succeed.
    Side rows go first: a crash between the two writes leaves the video pending, not half done."""
    side_rows = [r for row in rows for r in row.pop(SIDE_ROWS, ())]
    if stage.side is not None and side_rows:
        frame = pd.DataFrame(side_rows, columns=stage.side.table.contract.columns)
        store.upsert(stage.side.table, frame)
    if rows:
        store.upsert(stage.table, pd.DataFrame(rows, columns=stage.table.contract.columns))
    if failures:
        store.upsert(tables.FAILURES, failures_frame(failures))
        for f in failures:
            report.add_failure(f["video_id"], f["error_type"])
    healed = {(r["video_id"], r["sha256"]) for r in rows} & failed_before
    if healed:
        store.delete(tables.FAILURES, {(*k, stage.name, stage.extractor_id) for k in healed})


# -- Prefect -------------------------------------------------------------------------------------


def task_options(build: Callable[..., Stage], gpu: bool = False) -> dict[str, Any]:
    """Prefect options of a stage task `(videos, data_root, **build's parameters)`.

    The cache key is the shard's content, the stage's extractor id and the data root. Model
    stages on a GPU hold a slot of their device while they compute (run_stage).
    """

    def cache_key(context: Any, parameters: dict[str, Any]) -> str:
        args = {k: v for k, v in parameters.items() if k not in ("videos", "data_root")}
        stage = build(**args)
        return shard_cache_key(
            parameters["videos"], stage.cache_id, stage.name, parameters["data_root"]
        )

    return {
        "retries": DEFAULT_RETRIES,
        "retry_delay_seconds": [5, 30] if gpu else [2, 10],
        "retry_condition_fn": retry_if_transient,
        "cache_key_fn": cache_key,
    }
