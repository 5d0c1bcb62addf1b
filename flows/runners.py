"""The task runner a flow runs with: threads in-process by default, or Dask for fan-out across
processes and machines (prefect-dask), chosen by settings."""

from __future__ import annotations

from typing import Any

from flows.config import Settings


def task_runner_for(settings: Settings) -> Any:
    """A Prefect task runner for `extract.task_runner`."""
    e = settings.extract
    if e.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if e.dask_address:  # an existing scheduler: dask-jobqueue (SLURM), Kubernetes, ...
            return DaskTaskRunner(address=e.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": e.dask_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,  # no extra listening port
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner()


def with_runner(flow_obj: Any, settings: Settings) -> Any:
    """`flow_obj` set to run its tasks on the configured runner."""
    return flow_obj.with_options(task_runner=task_runner_for(settings))
