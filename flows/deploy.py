"""Deployments: the flows a researcher triggers from the Prefect UI, the scheduled
re-extraction of new videos, and the hand-off of training to a GPU work pool."""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from data_contracts.location import normalize_root
from flows.ablate import ablate_flow
from flows.config import PROJECT_ROOT, Settings, load_settings
from flows.extract import extract_flow
from flows.predict import predict_new_flow
from flows.robustness import robustness_flow
from flows.runners import with_runner
from flows.train import train_flow
from tasks.corrupt import DEFAULT_LEVELS
from tasks.predict import LATEST

log = logging.getLogger(__name__)

TRAIN_DEPLOYMENT = "train/train"
PREDICT_DEPLOYMENT = "predict-new/predict-new"


def ablate_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The ablate run form: the served corpus, profile, data root and overrides, and the
    flow's own defaults for seeds, parallel and robustness (one place for them: flows/ablate.py)."""
    signature = inspect.signature(ablate_flow.fn).parameters
    return {
        **params,
        **{n: signature[n].default for n in ("seeds", "parallel", "robustness")},
    }


def robustness_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The robustness deployment's run form: the served corpus and settings, the latest run
    and the default levels, written out so the form shows what will run."""
    return {**params, "run": LATEST, "levels": list(DEFAULT_LEVELS)}


def extract_flow_for(settings: Settings):
    """The extract flow on the task runner `extract.task_runner` names (flows/runners.py): the
    one flow object the `extract` deployment, `pipeline`, `reextract-new` and the CLI run."""
    return with_runner(extract_flow, settings)


@flow(name="pipeline", flow_run_name="pipeline-{profile}", log_prints=True)
def pipeline_flow(
    corpus_dir: str,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    train_deployment: str | None = None,
) -> dict:
    """Extract every modality's features, then train and report WAF.

    Args:
        corpus_dir: corpus folder with video-labeled/, video-unlabeled/ and the label CSVs.
        profile: settings profile: demo (tiny models) or paper (the real ones).
        data_root: where stores, artifacts and runs go (default <corpus_dir>/merflow).
        overrides: key=value settings, e.g. ["faces.fps=5", "train.use_nee=false"].
        train_deployment: train as a run of this deployment (`train/train` on the GPU work
            pool when registered with `merflow deploy`), waiting for it; empty: train here.
    """
    logger = get_run_logger()
    settings = load_settings(profile, overrides or [])
    summary = extract_flow_for(settings)(corpus_dir, profile, data_root, overrides)
    if not train_deployment:
        return {"extract": summary, "train": train_flow(corpus_dir, profile, data_root, overrides)}
    parameters = {
        "corpus_dir": corpus_dir,
        "profile": profile,
        "data_root": data_root,
        "overrides": list(overrides or []),
    }
    logger.info("features extracted; training goes to the %s deployment", train_deployment)
    run = run_deployment(name=train_deployment, parameters=parameters, poll_interval=2)
    state = run.state
    where = f"{train_deployment} run {run.name} ({run.id}) on work pool {run.work_pool_name}"
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"training failed: {where} ended {state.name if state else 'without a state'}: "
            f"{(state.message if state else '') or 'see its logs'}"
        )
    logger.info("training done: %s", where)
    return {"extract": summary, "train_run": str(run.id), "train_pool": run.work_pool_name}


@flow(name="reextract-new", flow_run_name="reextract-new-{profile}", log_prints=True)
def reextract_new_flow(
    corpus_dir: str,
    profile: str = "demo",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    train_deployment: str | None = TRAIN_DEPLOYMENT,
    predict_deployment: str | None = PREDICT_DEPLOYMENT,
) -> dict:
    """Scan for new or changed videos and extract only those; then have them labelled by the
    latest finished run and hand training over.

    Args:
        corpus_dir: corpus folder whose video folders are watched.
        profile: settings profile: demo (tiny models) or paper (the real ones).
        data_root: where stores, artifacts and runs go (default <corpus_dir>/merflow).
        overrides: key=value settings.
        train_deployment: deployment started (without waiting) when anything new was
            extracted, so training can run on a GPU work pool; empty to skip.
        predict_deployment: deployment started (without waiting) when anything new was
            extracted, to label the new videos with the latest finished run; empty to skip.
    """
    logger = get_run_logger()
    settings = load_settings(profile, overrides or [])
    summary = extract_flow_for(settings)(corpus_dir, profile, data_root, overrides, only_new=True)
    computed = sum(s["processed"] for s in summary["stages"].values())
    summary["train_run"] = summary["predict_run"] = None
    parameters = {
        "corpus_dir": corpus_dir,
        "profile": profile,
        "data_root": data_root,
        "overrides": list(overrides or []),
    }
    # Labels first, from the last finished run, while training goes on; neither is awaited:
    # each deployment's own worker runs it.
    handoffs = (
        ("predict_run", predict_deployment, "to label the new videos"),
        ("train_run", train_deployment, "to train on them"),
    )
    for field, deployment, why in handoffs:
        if summary["videos"] and computed and deployment:
            run = run_deployment(name=deployment, parameters=parameters, timeout=0)
            summary[field] = str(run.id)
            logger.info(
                "%d new videos extracted; started %s run %s %s",
                summary["videos"],
                deployment,
                run.id,
                why,
            )
    if not summary["train_run"]:
        logger.info("nothing new to extract; training not triggered")
    return summary


@dataclass(frozen=True)
class ServeOptions:
    """What `merflow serve` offers in the UI and how often it re-extracts."""

    corpus_dir: str
    profile: str = "demo"
    data_root: str | None = None
    interval_seconds: float | None = 3600.0
    cron: str | None = None
    overrides: tuple[str, ...] = ()


def deployment_specs(opts: ServeOptions) -> list[tuple[Any, dict[str, Any]]]:
    """extract, train, pipeline, a scheduled reextract-new, the predict-new it starts, ablate and
    robustness:
    each flow object with its deployment options (name, defaults for the run form, tags,
    schedule)."""
    params = {
        "corpus_dir": opts.corpus_dir,
        "profile": opts.profile,
        "data_root": opts.data_root,
        "overrides": list(opts.overrides),
    }
    schedule = {}
    if opts.cron:
        schedule["cron"] = opts.cron
    elif opts.interval_seconds:
        schedule["interval"] = timedelta(seconds=opts.interval_seconds)
    tags = ["merflow", opts.profile]
    # The served settings' extract.task_runner; reextract-new and pipeline pick theirs from
    # each run's own parameters (the same for the same settings).
    settings = load_settings(opts.profile, list(opts.overrides))
    return [
        (
            extract_flow_for(settings),
            {
                "name": "extract",
                "parameters": params,
                "tags": [*tags, "cpu"],
                "description": "Extract visual, acoustic and text features into the feature "
                "stores.",
            },
        ),
        (
            train_flow,
            {
                "name": "train",
                "parameters": params,
                "tags": [*tags, "gpu"],
                "description": "MR-CCL pretraining, two-step self-training, voting and the WAF "
                "report.",
            },
        ),
        (
            pipeline_flow,
            {
                "name": "pipeline",
                "parameters": params,
                "tags": tags,
                "description": "Extract, then train.",
            },
        ),
        (
            reextract_new_flow,
            {
                "name": "reextract-new",
                "parameters": {
                    **params,
                    "train_deployment": TRAIN_DEPLOYMENT,
                    "predict_deployment": PREDICT_DEPLOYMENT,
                },
                "tags": [*tags, "scheduled"],
                "description": "Extract only new or changed videos, then start the predict-new "
                "and train deployments.",
                # a slow run and the next tick must not extract the same clips
                "concurrency_limit": 1,
                **schedule,
            },
        ),
        (
            predict_new_flow,
            {
                "name": "predict-new",
                "parameters": params,
                "tags": [*tags, "gpu"],
                "description": "Label the videos the latest finished training run has not "
                "labelled yet, without retraining (reextract-new starts it).",
                "concurrency_limit": 1,  # two runs at once would label the same videos twice
            },
        ),
        (
            ablate_flow,
            {
                "name": "ablate",
                "parameters": ablate_parameters(params),
                "tags": [*tags, "gpu"],
                "description": "The paper's Table 1: the full method, each ablation and the "
                "baseline over training seeds, as train runs side by side (finished runs are "
                "reused).",
            },
        ),
        (
            robustness_flow,
            {
                "name": "robustness",
                "parameters": robustness_parameters(params),
                "tags": [*tags, "gpu"],
                "description": "Score a finished run (latest by default) on corrupted copies of "
                "its own validation videos: noisy audio, blurred faces (features made once).",
            },
        ),
    ]


def build_deployments(opts: ServeOptions) -> list:
    """The deployments of deployment_specs, as Prefect RunnerDeployments."""
    return [flow_obj.to_deployment(**options) for flow_obj, options in deployment_specs(opts)]


def serve_deployments(opts: ServeOptions) -> None:
    """Serve the deployments until interrupted, each run executing its flow object as built
    here (the extract flow on its configured task runner). Prefect's `serve()` would import
    each entrypoint afresh and run the extract flow on the default thread runner."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True)
    for flow_obj, options in deployment_specs(opts):
        runner.add_flow(flow_obj, **options)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as e:
        log.info("serving stopped (%s)", type(e).__name__)


ENTRYPOINTS = {
    "extract": ("flows/extract.py:extract_flow", "cpu"),
    "train": ("flows/train.py:train_flow", "gpu"),
    "pipeline": ("flows/deploy.py:pipeline_flow", "cpu"),
    "reextract-new": ("flows/deploy.py:reextract_new_flow", "cpu"),
    "predict-new": ("flows/predict.py:predict_new_flow", "gpu"),
    "ablate": ("flows/ablate.py:ablate_flow", "gpu"),
    "robustness": ("flows/robustness.py:robustness_flow", "gpu"),
}


def ensure_work_pools(names: list[str]) -> list[str]:
    """Create each of the work pools that does not exist yet, as a process pool (what
    `prefect work-pool create NAME --type process` makes); returns those created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys(names):
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template)
                )
            except ObjectAlreadyExists:  # another deploy was first
                continue
            created.append(name)
    return created


def deploy_to_pools(opts: ServeOptions, cpu_pool: str, gpu_pool: str, emit=log.info) -> list[str]:
    """Register the deployments on work pools (extraction on CPU, training on GPU workers),
    creating missing pools as process pools (said through `emit`); workers started with
    `prefect worker start --pool NAME` pick their runs up. `pipeline` extracts on the CPU pool
    and hands training to the `train` deployment, so it trains on the GPU pool."""
    from prefect import flow as prefect_flow

    for name in ensure_work_pools([cpu_pool, gpu_pool]):
        emit(f"created work pool {name!r} (type process)")

    params = {
        "corpus_dir": opts.corpus_dir,
        "profile": opts.profile,
        "data_root": opts.data_root,
        "overrides": list(opts.overrides),
    }
    ids = []
    for name, (entrypoint, kind) in ENTRYPOINTS.items():
        remote = prefect_flow.from_source(source=str(PROJECT_ROOT), entrypoint=entrypoint)
        extra = {}
        if name == "ablate":
            extra["parameters"] = ablate_parameters(params)
        if name == "robustness":
            extra["parameters"] = robustness_parameters(params)
        if name == "pipeline":
            extra["parameters"] = {**params, "train_deployment": TRAIN_DEPLOYMENT}
        if name == "reextract-new":
            extra = {"interval": opts.interval_seconds} if not opts.cron else {"cron": opts.cron}
            extra["parameters"] = {
                **params,
                "train_deployment": TRAIN_DEPLOYMENT,
                "predict_deployment": PREDICT_DEPLOYMENT,
            }
        deployment_id = remote.deploy(
            name=name,
            work_pool_name=gpu_pool if kind == "gpu" else cpu_pool,
            parameters=extra.pop("parameters", params),
            tags=["merflow", opts.profile, kind],
            job_variables={"working_dir": str(PROJECT_ROOT)},
            print_next_steps=False,
            **extra,
        )
        ids.append(str(deployment_id))
    return ids


def allowed_roots_for(opts: ServeOptions, extra: list[str]) -> list[str]:
    """The folders (and object-storage URLs) runs from the UI may touch: the corpus, the data
    root and any extra ones."""
    roots = [opts.corpus_dir, *([opts.data_root] if opts.data_root else []), *extra]
    return list(dict.fromkeys(str(normalize_root(r)) for r in roots))
