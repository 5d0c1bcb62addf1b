"""The train flow: load features → MR-CCL pretraining → k folds (step 1, baseline, pseudo
labels, step 2) → voting → report, predictions and submission. Every step is a cached Prefect
task whose outputs live under the run folder, so a killed run resumes where it stopped.

While it trains, the UI shows every epoch as a line of the run's logs, a progress artifact
(epochs done of the recipe's most) and the WAF of each fold as it finishes (_Watch)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.logging.handlers import APILogHandler
from tqdm.auto import tqdm

from data_contracts.labels import MODALITIES
from data_contracts.location import normalize_root
from data_contracts.store import Store
from data_contracts.tables import TableRef
from flows.config import load_settings, save_resolved
from flows.extract import load_labels_task
from flows.plan import plan_extraction, stored_plan, training_tables
from flows.safety import check_all_under_roots, checked_data_root, trusted_roots
from flows.train_worker import launch, worker_args
from models.epoch_reports import EPOCH_RECORD, PROGRESS_RECORD, BatchProgress, EpochReport
from models.recipe import RecipeConfig, epoch_plan, recipe_from_settings
from models.settings import available_cpus
from tasks.engine.gpu_slots import CpuClaim, cpu_cores, gpu_slot
from tasks.stores.quality import named_feature_tables, quality_thresholds, stored_table_choice
from tasks.training.data import load_training_data, quality_kept, without_empty
from tasks.training.inputs import INPUTS
from tasks.training.report import build_report, fold_rows, report_markdown
from tasks.training.steps import (
    DONE,
    data_fingerprint,
    freeze_run,
    run_key,
    run_step,
    step_inputs,
    step_names,
)

log = logging.getLogger(__name__)


def _step_key(context, parameters) -> str:
    return f"train-{parameters['step']}-{parameters['key']}-{Path(parameters['run_dir']).name}"


def _run_step(step: str, key: str, run_dir: str, profile: str, overrides: list[str]) -> str:
    """One training step over the run's frozen inputs, in this process or under torchrun when
    more than one process is configured; a step already done is skipped either way. Returns
    the step's folder."""
    settings = load_settings(profile, overrides)
    ts = settings.train
    # One slot of each GPU the step trains on, per machine (tasks/engine/gpu_slots.py); none on
    # a CPU.
    with gpu_slot(ts.device, settings.prefect.gpu_slots, n_devices=ts.nproc_per_node):
        if ts.world_size == 1:
            data, recipe = step_inputs(Path(run_dir), key, ts)
            want = ts.process_threads(available_cpus())
            with _cores(step, run_dir, want, ts.threads, follow=True):
                return str(run_step(step, Path(run_dir), data, recipe))
        if not (Path(run_dir) / step / DONE).is_file():
            args = worker_args(step, key, run_dir, profile, overrides)
            # This machine's processes of the step share the cores it was given.
            want = ts.process_threads(available_cpus()) * ts.nproc_per_node
            explicit = ts.threads * ts.nproc_per_node if ts.threads else None
            with _cores(step, run_dir, want, explicit, follow=False) as claim:
                assert claim is not None  # the step is not done
                threads = ts.threads or max(1, claim.threads // ts.nproc_per_node)
                # launch logs rank 0's epochs here, as the loops log theirs in process (_Watch).
                launch(ts, step, key, args, emit=get_run_logger().info, threads=threads)
        return str(Path(run_dir) / step)


THREADS = "threads"  # the run folder's record of each step's thread counts


@contextlib.contextmanager
def _cores(
    step: str, run_dir: str, want: int, explicit: int | None, follow: bool
) -> Iterator[CpuClaim | None]:
    """The step's share of this machine's cores (tasks/engine/gpu_slots.py cpu_cores), re-read at
    every epoch when it trains in this thread (`follow`); the thread counts are printed and
    kept in <run>/threads/<step>.json for the report. A step already done claims nothing."""
    if (Path(run_dir) / step / DONE).is_file():
        yield None
        return
    epochs = logging.getLogger("models.training")
    with cpu_cores(want, explicit, what=f"train {step}") as claim:
        claim.use(force=True)
        print(f"{step}: {claim.line()}")
        handler = _FollowShare(claim)
        if follow:
            epochs.addHandler(handler)
        try:
            yield claim
        finally:
            epochs.removeHandler(handler)
    record = claim.record()
    if record["threads_min"] != record["threads_max"]:
        print(f"{step}: trained with {record['threads_min']}-{record['threads_max']} threads")
    folder = Path(run_dir) / THREADS
    folder.mkdir(exist_ok=True)
    (folder / f"{step}.json").write_text(json.dumps(record, sort_keys=True))


class _FollowShare(logging.Handler):
    """At each epoch the step trains in this thread, its torch threads follow its share of the
    cores (a neighbour arrived or left)."""

    def __init__(self, claim: CpuClaim) -> None:
        super().__init__(logging.INFO)
        self.claim, self.thread = claim, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, EPOCH_RECORD, None) is not None and threading.get_ident() == self.thread:
            self.claim.use()


# One task, named per step kind in the UI.
_step_task = task(_run_step, cache_key_fn=_step_key, retries=1, retry_delay_seconds=[10])
pretrain_task = _step_task.with_options(
    name="pretrain",
    description="MR-CCL contrastive pretraining (skipped when its checkpoint exists).",
)
fold_task = _step_task.with_options(
    name="train-fold",
    description="One cross-validation fold (`step` is fold-k) of the self-training recipe.",
)


def _fresh(t, folder: Path):
    return t if (folder / DONE).is_file() else t.with_options(refresh_cache=True)


class _Watch(logging.Handler):
    """What the UI shows of a training run while it goes: each epoch report of the loops
    (models/training.py, logged in this process or relayed from torchrun's rank 0 by launch)
    as a line of the flow run's logs, the `train-progress` artifact (epochs done of the
    recipe's most; a stage that stops early jumps to its end), and the `train-folds` table,
    renewed as each fold finishes. Warnings of merflow's own loggers reach the logs too."""

    LOGGERS = ("models", "tasks")  # merflow's libraries; the flow logs through Prefect itself

    def __init__(self, recipe: RecipeConfig, run_dir: Path) -> None:
        super().__init__(logging.INFO)
        self.run_dir, self.n_splits = run_dir, recipe.n_splits
        self.flow_run_id = FlowRunContext.get().flow_run.id
        # Epochs before each stage and at the end of each step, in training order.
        self.before: dict[str, int] = {}
        self.step_end: dict[str, int] = {}
        done = 0
        for step, stages in epoch_plan(recipe).items():
            for name, epochs in stages:
                self.before[name] = done
                done += epochs
            self.step_end[step] = done
        self.total, self.done, self.shown = max(done, 1), 0, -1
        self.api = APILogHandler()
        self.progress = create_progress_artifact(
            0.0,
            key="train-progress",
            description=f"training: 0 of {done} epochs (pretraining and {self.n_splits} folds)",
        )

    def emit(self, record: logging.LogRecord) -> None:
        report: EpochReport | None = getattr(record, EPOCH_RECORD, None)
        progress: BatchProgress | None = getattr(record, PROGRESS_RECORD, None)
        if report is None and progress is None and record.levelno < logging.WARNING:
            return
        run = FlowRunContext.get()
        if run is None or run.flow_run is None or run.flow_run.id != self.flow_run_id:
            return  # another flow run in this process, or none
        # Straight to the API handler: the run logger's level (PREFECT_LOGGING_LEVEL, WARNING
        # by default) would drop the epoch lines, and they are how a run shows it is alive.
        self.api.emit(record)
        if report is not None and report.stage in self.before:
            where = f"{report.stage} epoch {report.epoch}/{report.epochs}"
            try:
                self._advance(self.before[report.stage] + report.epoch, where)
            except Exception:  # an unreachable API must not stop training: logging's rule
                self.handleError(record)
        if progress is not None and progress.stage in self.before:
            where = (
                f"{progress.stage} epoch {progress.epoch}/{progress.epochs}, "
                f"batch {progress.batches}/{progress.of}"
            )
            done = progress.epoch - 1 + progress.batches / progress.of
            try:
                self._advance(self.before[progress.stage] + done, where)
            except Exception:
                self.handleError(record)

    def step_done(self, step: str) -> None:
        """A step finished (or was already done): progress to its end; a fold's row added."""
        self._advance(self.step_end[step], f"{step} done", always=True)
        if step.startswith("fold-"):
            create_table_artifact(
                fold_rows(self.run_dir, self.n_splits),
                key="train-folds",
                description="WAF (%) of each finished fold on its validation videos",
            )

    def _advance(self, done: float, where: str, always: bool = False) -> None:
        """Progress to `done` epochs (a fraction inside an epoch, from its progress lines)."""
        self.done = max(self.done, done)
        percent = round(100 * self.done / self.total)
        if percent != self.shown or always:  # about 100 updates a run, and one per step
            self.shown = percent
            text = f"training: {round(self.done, 1):g} of {self.total} epochs; {where}"
            update_progress_artifact(self.progress, float(percent), description=text)

    @contextlib.contextmanager
    def watching(self) -> Iterator[_Watch]:
        """Forward the training loggers' epochs and warnings into this run while inside."""
        _epochs_at_info(+1)
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        try:
            yield self
        finally:
            for name in self.LOGGERS:
                logging.getLogger(name).removeHandler(self)
            _epochs_at_info(-1)


# Runs watched at once in this process (ablate runs several side by side), and the level the
# epochs' logger had before the first: only the last run to end restores it, so a run that
# ends first cannot silence the epoch lines of one still going.
_watching = {"count": 0, "level": logging.NOTSET}
_watching_lock = threading.Lock()


def _epochs_at_info(step: int) -> None:
    """Hold the training loops' logger at INFO (epoch records are INFO; the terminal shows them
    too) while any run is watched: step +1 when one starts, -1 when it ends."""
    epochs = logging.getLogger("models.training")
    with _watching_lock:
        if step > 0 and _watching["count"] == 0:
            _watching["level"] = epochs.level
            epochs.setLevel(logging.INFO)
        _watching["count"] += step
        if _watching["count"] == 0:
            epochs.setLevel(_watching["level"])


def _quality_filtered(data, store: Store, settings, corpus: Path | None):
    """`data` with the run's quality filters applied (tasks/training/data.py quality_kept) and
    the videos left without any modality dropped."""
    if all(v is None for v in quality_thresholds(settings.train).values()):
        return data  # no filter: no plan to make
    # The signals live in the upstream tables of the plan (faces, audio, transcripts).
    plan = plan_extraction(settings, store.root, corpus) if corpus else stored_plan(settings, store)
    kept = quality_kept(store, plan, settings.train, data.labelled, data.unlabelled)
    parts, dropped = {}, list(data.dropped)
    for name, fs in zip(("labelled", "unlabelled"), kept, strict=True):
        parts[name], lost = without_empty(fs)
        dropped += lost
    missing = {
        m: int((~parts["labelled"].present[m]).sum() + (~parts["unlabelled"].present[m]).sum())
        for m in parts["labelled"].present
    }
    return dataclasses.replace(data, **parts, dropped=dropped, missing=missing)


def _training_tables(
    settings, store: Store, corpus: Path | None
) -> tuple[dict[str, TableRef], dict[str, str]]:
    """The feature table of each modality a run trains on (flows/plan.py training_tables) and a
    line per modality saying which and why. Without a corpus folder, a modality whose plan table
    the stores lack, or whose plan cannot be named (a features-only store has no extractor
    checkpoints, and training needs none), trains on its only, or newest, stored table. Without
    a corpus folder the plan never downloads a checkpoint: training reads none."""
    if corpus is None:
        local = settings.models.model_copy(update={"allow_download": False})
        settings = settings.model_copy(update={"models": local})
    named = settings.train.feature_tables
    why = {m: "named by train.feature_tables" for m in named}
    try:
        chosen = training_tables(settings, store, corpus)
        return chosen, {
            m: f"{chosen[m].name} ({why.get(m, 'the extraction plan')})" for m in chosen
        }
    except LookupError as e:
        unnamed = set(named) - set(named_feature_tables(store, named))
        if corpus is not None or unnamed:
            raise  # with a corpus the plan is made, never guessed; a named table must be there
        error = e
    chosen = named_feature_tables(store, named)
    try:
        planned = stored_plan(settings, store).feature_tables()
    except LookupError:  # the plan's model checkpoints are not here: nothing names its tables
        planned = {}
    for m in MODALITIES:
        if m not in chosen and m in planned and store.exists(planned[m]):
            chosen[m], why[m] = planned[m], "the extraction plan"
    fallback = stored_table_choice(store, [m for m in MODALITIES if m not in chosen])
    if set(MODALITIES) - set(chosen) - set(fallback):
        raise error  # a modality with no table at all: the plan's message says what to do
    for m, (ref, note) in fallback.items():
        plan = planned[m].name.rsplit("/", 1)[-1] if m in planned else None
        absent = (
            f"the extraction plan's {plan} is not stored"
            if plan
            else "the extraction plan's table cannot be named without its model checkpoints"
        )
        chosen[m], why[m] = ref, f"{note}; {absent}; train.feature_tables names another"
    return chosen, {m: f"{chosen[m].name} ({why[m]})" for m in MODALITIES}


def training_context(
    data_root: str, profile: str, overrides: list[str], corpus_dir: str | None = None
) -> dict:
    """What a run trains on, read from the stores once: the data (quality filters applied),
    its fingerprint, the recipe and the run key. The feature tables are those of
    flows/plan.py training_tables (train.feature_tables, else the extraction plan's); without
    a corpus folder no model checkpoint is built to name them."""
    settings = load_settings(profile, overrides)
    store = Store(data_root)
    corpus = Path(corpus_dir) if corpus_dir else None
    # The chosen tables' names are part of the fingerprint, so another table is another run.
    feature_tables, chosen = _training_tables(settings, store, corpus)
    fingerprint = data_fingerprint(store, feature_tables)
    data = load_training_data(store, feature_tables, settings.train.standardize)
    data = _quality_filtered(data, store, settings, corpus)
    recipe = recipe_from_settings(settings.train, data.labelled.dims)
    return {
        "settings": settings,
        "store": store,
        "data": data,
        "recipe": recipe,
        "fingerprint": fingerprint,
        "key": run_key(fingerprint, settings.train, recipe),
        "feature_tables": chosen,  # a line per modality: its table and why
    }


def run_dir_of(settings, root: Path | str, key: str) -> Path:
    """A run's folder: on a local disk even when the stores are on object storage."""
    return settings.local_root(root) / "runs" / f"train-{key}"


def _save_beside_stores(settings, store: Store) -> None:
    """The resolved settings where `merflow check` looks for the folds training uses."""
    if isinstance(store.root, Path):
        save_resolved(settings, store.root / "runs" / "latest-train-settings.yaml")
    else:
        text = yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
        store.write_text("runs/latest-train-settings.yaml", text)


def _checked_paths(
    settings, profile: str, overrides: list[str], corpus_dir, data_root, labels_csv
) -> tuple[Path | None, Path | str]:
    """The corpus folder (None: train from the stores alone) and the data root, refused when
    they or the label CSV lie outside the allowed roots in force (flows/safety.py)."""
    roots = trusted_roots(profile, overrides, settings)
    check_all_under_roots([("labels CSV", labels_csv)] if labels_csv else [], roots)
    return checked_data_root(settings, profile, overrides, corpus_dir, data_root)


@flow(name="train", flow_run_name="train-{profile}", log_prints=True)
def train_flow(
    corpus_dir: str | None = None,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    labels_csv: str | None = None,
) -> dict:
    """Train MR-CCL with two-step self-training on the extracted features; report WAF.

    Args:
        corpus_dir: the corpus folder whose features were extracted (video-labeled/, ...);
            empty: train on what the stores under data_root hold (docs/import.md).
        profile: settings profile (demo: tiny models; paper: the real ones).
        data_root: where the stores are (default <corpus_dir>/merflow).
        overrides: key=value settings, e.g. ["train.use_pseudo_labels=false"] for an ablation,
            or train.feature_tables={visual: imported-NAME} to train on an imported table.
        labels_csv: a label CSV (name, discrete) to load into the labels table first, as
            extraction loads the corpus's.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    settings = load_settings(profile, overrides)
    corpus, root = _checked_paths(settings, profile, overrides, corpus_dir, data_root, labels_csv)
    if labels_csv:
        load_labels_task(str(Path(labels_csv).expanduser().resolve()), str(root))
    # The plan sees the corpus: official transcripts change the text features' id.
    ctx = training_context(str(root), profile, overrides, str(corpus) if corpus else None)
    key = ctx["key"]
    run_dir = run_dir_of(settings, root, key)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(settings, run_dir / "settings.yaml")
    _save_beside_stores(settings, ctx["store"])
    with _Watch(ctx["recipe"], run_dir).watching() as watch:
        # Every step and the report read these, never the stores again (tasks/training/steps.py);
        # the copy read from the stores is dropped once frozen (at paper size it is ~3 GB).
        store, read = ctx["store"], ctx.pop("data")
        data = freeze_run(run_dir, read, key, ctx["fingerprint"], ctx["recipe"], store)
        del read
        logger.info(
            "run %s: %d labelled, %d unlabelled videos, features %s",
            key,
            len(data.labelled),
            len(data.unlabelled),
            data.extractor_ids,
        )
        for m, line in ctx["feature_tables"].items():
            logger.info("%s trains on %s", m, line)
        common = {"key": key, "run_dir": str(run_dir), "profile": profile, "overrides": overrides}
        # A step's outputs are the truth: a cache entry whose folder is gone is refreshed.
        names = step_names(settings.train.n_splits)
        steps = tqdm(total=len(names), desc="     train", unit="step", disable=None)
        for step in names:
            step_task = pretrain_task if step == "pretrain" else fold_task
            _fresh(step_task, run_dir / step)(step=step, **common)
            watch.step_done(step)
            steps.update(1)
        steps.close()
    report = build_report(
        run_dir,
        key,
        data,
        settings.train.n_splits,
        ctx["store"],
        settings.train.model_dump(),
        ctx["feature_tables"],
    )
    del data  # unmap the inputs before removing them
    shutil.rmtree(run_dir / INPUTS, ignore_errors=True)  # a rerun freezes them again
    create_markdown_artifact(
        report_markdown(report), key="train-report", description="training report"
    )
    create_table_artifact(
        [{"class": c, "f1": round(f, 4)} for c, f in report["per_class_f1"].items()],
        key="train-per-class-f1",
    )
    for name in ("confusion", "curves"):  # the UI's image artifacts take URLs only: link them
        create_link_artifact(
            link=(run_dir / "report" / f"{name}.png").resolve().as_uri(),
            link_text=f"{name}.png",
            key=f"train-{name}",
            description=f"training report: {name} plot",
        )
    report["run_dir"] = str(run_dir)
    report["report_dir"] = str(run_dir / "report")
    return report


def join_training(
    corpus_dir: str,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    emit=print,
) -> list[str]:
    """The other machines of a multi-node run (train.nnodes > 1): run every step that is not
    done yet under torchrun, meeting the train flow's processes at the same rendezvous, step by
    step. The run folder must be on storage every machine sees (NFS, a shared volume).
    Returns the steps this machine took part in."""
    overrides = list(overrides or [])
    settings = load_settings(profile, overrides)
    if settings.train.nnodes < 2:
        raise ValueError("train-join is for multi-node runs: set train.nnodes and rdzv_endpoint")
    corpus = Path(corpus_dir).expanduser().resolve()
    root = normalize_root(data_root) if data_root else settings.resolved_data_root(corpus)
    # Only the key: this machine's ranks map the inputs node 0 froze in the shared run folder.
    key = training_context(str(root), profile, overrides, str(corpus))["key"]
    run_dir = run_dir_of(settings, root, key)
    joined = []
    for step in step_names(settings.train.n_splits):
        if (run_dir / step / DONE).is_file():
            continue
        args = worker_args(step, key, str(run_dir), profile, overrides)
        ts, slots = settings.train, settings.prefect.gpu_slots
        with gpu_slot(ts.device, slots_per_device=slots, n_devices=ts.nproc_per_node):
            launch(ts, step, key, args, emit=emit)
        joined.append(step)
    return joined
