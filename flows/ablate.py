"""The ablate flow: the paper's Table 1 in one command. The full method, each ablation (no
contrastive pretraining, no NEE, no pseudo labels, no oversampling) and, from the full method's
runs, the paper's baseline (no oversampling; it also makes the pseudo labels) and merflow's
oversampled baseline, over several training seeds; the table goes under the data root
(runs/ablate-<key>/) and into the UI as artifacts (tasks/training/ablate_report.py), each row saying
whether it is run as the paper ran it or is merflow's.

Every run is the train flow itself (flows/train.py), called as the subflow of one task per run:
nothing here trains. Those tasks are submitted to a task runner the flow opens with `parallel`
workers (threads; Dask processes when `extract.task_runner` is dask), so Prefect runs the train
flows side by side, each its own flow run in the UI under this one, and a failed run fails its
task without stopping the others. Subflows of tasks, rather than `run_deployment`, keep the runs
in this flow's process or its Dask workers: no deployment or work pool is needed, and a run
from the command line works as one from the UI.

What the runs can share they compute once: a pretraining serves every run whose pretraining key
matches (tasks/training/steps.py pretrain_step; the ablations that keep pretraining, except w/o NEE,
whose noisy view is part of the pretraining loss). A run already finished with the same run key
is read from its report, not trained again: a second invocation trains nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import SettingsError, load_settings
from flows.runners import task_runner_for
from flows.safety import checked_corpus_root
from flows.train import run_dir_of, train_flow, training_context
from models.recipe import recipe_from_settings
from models.settings import available_cpus
from tasks.corrupt import parse_levels
from tasks.training.ablate_report import (
    SWITCHES,
    SYSTEMS,
    build_table,
    table_markdown,
    table_rows,
    write_table,
)
from tasks.training.inputs import INPUTS
from tasks.training.robustness import (
    compare_systems,
    comparison_markdown,
    levels_of,
    write_comparison,
)
from tasks.training.steps import run_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One train run of the table: a system at a seed, its settings and where it lives."""

    system: str
    seed: int
    overrides: list[str]
    key: str
    run_dir: Path


def finished_report(run_dir: Path) -> dict | None:
    """A run's report when the train flow finished it: the report is written and the inputs,
    which the flow removes after it, are gone."""
    path = run_dir / "report" / "report.json"
    if not path.is_file() or (run_dir / INPUTS).exists():
        return None
    return {**json.loads(path.read_text()), "run_dir": str(run_dir)}


def plan_runs(
    corpus: Path, root, profile: str, overrides: list[str], seeds: list[int]
) -> list[Run]:
    """Every run of the table, the order they are started in (system by system, so the runs
    that start together pretrain different models), with the run key the train flow will give
    it: the data is read once, and each run's key follows from its settings."""
    ctx = training_context(str(root), profile, overrides, str(corpus))
    dims = ctx["data"].labelled.dims
    runs = []
    for system in SYSTEMS:
        for seed in seeds:
            extra = [*overrides, *system.overrides, f"train.seed={seed}"]
            settings = load_settings(profile, extra)
            ts = settings.train
            key = run_key(ctx["fingerprint"], ts, recipe_from_settings(ts, dims))
            runs.append(Run(system.name, seed, extra, key, run_dir_of(settings, root, key)))
    return runs


@task(name="train-run", task_run_name="{system}-seed-{seed}", cache_policy=NONE)
def train_run(
    system: str, seed: int, corpus_dir: str, profile: str, data_root: str, overrides: list[str]
) -> dict:
    """One run of the table: the train flow, as this task's subflow."""
    named = train_flow.with_options(flow_run_name=f"ablate-{system}-seed-{seed}")
    return named(corpus_dir, profile=profile, data_root=data_root, overrides=overrides)


def _runner(settings, parallel: int):
    """The task runner the runs go to: `parallel` threads, or the configured Dask cluster."""
    if settings.extract.task_runner == "dask":
        return task_runner_for(settings)
    return ThreadPoolTaskRunner(max_workers=parallel)


def _check_full_method(settings) -> None:
    """Refuse settings that already switch a part of the method off."""
    ts = settings.train
    on = {s: getattr(ts, s.removeprefix("train.")) for s in SWITCHES}
    off = [s for s, value in on.items() if not value]
    if off:
        raise SettingsError(
            f"ablate runs the full method and switches one part off per system itself, but the "
            f"settings already switch off {', '.join(off)}; drop that override (or MERFLOW_ "
            "variable) and run ablate again (`merflow ablate`, or the ablate deployment's Run "
            "in the UI)"
        )


def _train(todo: list[Run], settings, parallel: int | None, common: dict) -> dict:
    """Run the train flows side by side; their reports by (system, seed). Every run finishes
    (or fails) before a failure is raised."""
    dask = settings.extract.task_runner == "dask"
    width = settings.extract.dask_workers if dask else parallel or available_cpus() // 2
    width = max(1, min(width, len(todo)))
    launch = []
    if width > 1 and settings.train.threads is None:
        # Runs side by side share the cores; the thread count is not part of a run key.
        launch = [f"train.threads={max(1, available_cpus() // width)}"]
    reports, failed = {}, []
    with _runner(settings, width) as runner:
        futures = {
            (r.system, r.seed): runner.submit(
                train_run,
                {
                    "system": r.system,
                    "seed": r.seed,
                    **common,
                    "overrides": [*r.overrides, *launch],
                },
            )
            for r in todo
        }
        for (system, seed), future in futures.items():
            try:
                reports[(system, seed)] = future.result()
            except Exception as e:  # the others still finish
                failed.append(f"{system} seed {seed}: {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(todo)} train runs failed ({'; '.join(failed)}); run "
            "ablate again (`merflow ablate`, or the ablate deployment's Run in the UI): "
            "finished runs are reused"
        )
    return reports


@flow(name="ablate", flow_run_name="ablate-{profile}", log_prints=True)
def ablate_flow(
    corpus_dir: str,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    seeds: int = 3,
    parallel: int | None = None,
    robustness: list[str] | None = None,
) -> dict:
    """The paper's Table 1: the full method, its ablations and the baseline over training seeds.

    Args:
        corpus_dir: the corpus folder whose features were extracted.
        profile: settings profile (demo: tiny models; paper: the real ones).
        data_root: where the stores are (default <corpus_dir>/merflow).
        overrides: key=value settings every run gets, e.g. ["train.n_splits=5"]; the seeds are
            train.seed, train.seed + 1, ...
        seeds: training seeds per system.
        parallel: train runs at once (default: half the cores, at least one; with the Dask
            runner, its workers).
        robustness: corruption levels (`noise:20,10,5,0`, `blur:2`, ...; `default` for the
            robustness command's default levels) to score every run at, on the same corrupted
            copies of the validation videos (docs/robustness.md); none: no robustness table.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1; got {seeds}")
    settings = load_settings(profile, overrides)
    _check_full_method(settings)
    corruptions = parse_levels(robustness) if robustness else []  # refused before any work
    corpus, root = checked_corpus_root(settings, profile, overrides, corpus_dir, data_root)
    first = settings.train.seed
    seed_list = list(range(first, first + seeds))
    runs = plan_runs(corpus, root, profile, overrides, seed_list)
    reports = {(r.system, r.seed): finished_report(r.run_dir) for r in runs}
    todo = [r for r in runs if reports[(r.system, r.seed)] is None]
    reused = len(runs) - len(todo)
    logger.info("%d runs: %d finished already (reused), %d to train", len(runs), reused, len(todo))
    if todo:
        common = {"corpus_dir": str(corpus), "profile": profile, "data_root": str(root)}
        reports |= _train(todo, settings, parallel, common)
    by_system = {s.name: [reports[(s.name, seed)] for seed in seed_list] for s in SYSTEMS}
    table = build_table(by_system, seed_list)
    for r in runs:
        got = reports[(r.system, r.seed)]["run_id"]
        if got != r.key:  # the stores changed while the runs went
            logger.warning("%s seed %d trained as run %s, not %s", r.system, r.seed, got, r.key)
    out = settings.local_root(root) / "runs" / f"ablate-{table['key']}"
    files = write_table(table, out)
    markdown = table_markdown(table)
    create_markdown_artifact(markdown, key="ablate-table1", description="the paper's Table 1")
    create_table_artifact(
        table_rows(table), key="ablate-waf", description="WAF (%) per system, mean over seeds"
    )
    create_link_artifact(
        link=files["table1.png"].resolve().as_uri(),
        link_text="table1.png",
        key="ablate-plot",
        description="Table 1: WAF per system beside the paper's, per-class F1",
    )
    if corruptions:
        compared = _robustness(runs, reports, settings, root, corruptions, logger)
        files |= write_comparison(compared, out)
        markdown = comparison_markdown(compared)
        create_markdown_artifact(
            markdown, key="ablate-robustness", description="the systems on corrupted videos"
        )
        table = {**table, "robustness": compared}
    return {**table, "report_dir": str(out), "files": {k: str(v) for k, v in files.items()}}


def _robustness(runs: list[Run], reports: dict, settings, root, corruptions, logger) -> dict:
    """Every run of the table scored at the levels (flows/robustness.py): the corrupted
    features are extracted once, for the first run, and read by all (same extractors, same
    labelled videos); then the systems side by side (tasks/training/robustness.py
    compare_systems)."""
    from flows.plan import matching_plan
    from flows.robustness import robustness_of
    from tasks.predict import load_run

    levels = levels_of(corruptions)
    by_system: dict[str, list[dict]] = {}
    computed = {}
    for r in runs:
        trained = load_run(Path(reports[(r.system, r.seed)]["run_dir"]))
        plan = matching_plan(settings, root, trained)
        out = robustness_of(trained, plan, levels, str(root), settings, logger)
        by_system.setdefault(r.system, []).append(out)
        computed[trained.key] = sum(sum(n.values()) for n in out["extracted"].values())
    compared = compare_systems(by_system, {s.name: s.label for s in SYSTEMS})
    # Stage outputs each run's scoring computed: the first run's levels, then 0 (reused).
    return {**compared, "computed": computed}
