"""The check flow: the feature-store health report as a Prefect run with a Markdown artifact."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_contracts.location import is_url
from data_contracts.store import Store
from flows.config import TrainSettings, load_settings
from flows.safety import check_under_roots, trusted_roots
from tasks.errors import MerflowError
from tasks.quality import REPORT, check_task

ARTIFACT_KEY = "merflow-check"
# The train flow's settings, else the extraction's (both save their resolved settings here).
_SAVED_SETTINGS = ("latest-train-settings.yaml", "extract-settings.yaml")


class CheckFailedError(MerflowError):
    """The check found error-level problems and the caller asked to fail on them."""


def _saved_text(data_root: str | Path, name: str) -> str:
    if not is_url(data_root):
        return (Path(data_root) / "runs" / name).read_text(encoding="utf-8")
    text = Store(data_root).read_text(f"runs/{name}")  # beside the stores on the object store
    if text is None:
        raise FileNotFoundError(f"{data_root}/runs/{name}")
    return text


def fold_settings(data_root: str | Path) -> tuple[int, int]:
    """The CV n_splits and seed the train flow will use: the data root's saved settings, else
    the defaults, so the check tests leakage across the folds training will actually make."""
    for name in _SAVED_SETTINGS:
        try:
            train = (yaml.safe_load(_saved_text(data_root, name)) or {}).get("train") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if "n_splits" in train and "seed" in train:
            return int(train["n_splits"]), int(train["seed"])
    default = TrainSettings()
    return default.n_splits, default.seed


@flow(name="check", flow_run_name="check-{data_root}", log_prints=True)
def check_flow(
    data_root: str,
    n_splits: int | None = None,
    seed: int | None = None,
    cosine_threshold: float = 0.99,
    fail_on_error: bool = False,
    profile: str = "demo",
) -> dict:
    """Check the feature stores of a data root; publish the report as the `merflow-check` artifact.

    data_root: the data root of an extraction (holds stores/): a folder or an s3://... URL.
    n_splits, seed: the CV folds to test for leakage (default: the saved train settings).
    cosine_threshold: centred cosine above which two videos' features are near-duplicates.
    fail_on_error: end the run Failed when an error-level finding exists.
    profile: settings profile whose allowed_roots bound data_root (parameters may come from the UI).
    """
    roots = trusted_roots(profile, [], load_settings(profile))
    root = check_under_roots(data_root, roots, "data_root")
    saved_splits, saved_seed = fold_settings(root)
    findings = check_task(
        str(root),
        saved_splits if n_splits is None else n_splits,
        saved_seed if seed is None else seed,
        cosine_threshold,
    )
    create_markdown_artifact(
        findings.markdown(), key=ARTIFACT_KEY, description="feature-store check"
    )
    summary = {
        "check_id": findings.check_id,
        "errors": findings.count("error"),
        "warnings": findings.count("warning"),
        "info": findings.count("info"),
        "report": f"{root}/{REPORT}",
    }
    get_run_logger().info("check %s", summary)
    if fail_on_error and findings.has_errors:
        raise CheckFailedError(
            f"{summary['errors']} error-level finding(s) in {root}; see {summary['report']}"
        )
    return summary
