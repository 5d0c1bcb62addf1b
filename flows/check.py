"""The check flow: the feature-store health report as a Prefect run with a Markdown artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.config import load_settings
from flows.safety import check_under_roots, trusted_roots
from tasks.engine.errors import MerflowError
from tasks.stores.check import REPORT, check_task

ARTIFACT_KEY = "merflow-check"


class CheckFailedError(MerflowError):
    """The check found error-level problems and the caller asked to fail on them."""


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
    n_splits, seed: the CV folds to test for leakage (default: the latest training run's).
    cosine_threshold: centred cosine above which two videos' features are near-duplicates.
    fail_on_error: end the run Failed when an error-level finding exists.
    profile: settings profile whose allowed_roots bound data_root (parameters may come from the UI).
    """
    roots = trusted_roots(profile, [], load_settings(profile))
    root = check_under_roots(data_root, roots, "data_root")
    findings = check_task(str(root), n_splits, seed, cosine_threshold)
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
