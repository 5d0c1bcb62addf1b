"""The Prefect UI in headless Chromium: Deployments → extract → Run → Custom run → rows land;
a finished train run shows its epochs in its logs and its report among its artifacts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.deploy.conftest import _client, wait_for_run
from tests.flows.test_train_watch import extracted, trained_run  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def browser_page(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (make setup does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            args=FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()


def test_custom_run_from_the_ui_lands_rows_in_the_stores(
    serve, corpus, prefect_server, browser_page
):
    served = serve(corpus, "--interval", "0")
    page = browser_page
    try:
        page.goto(f"{prefect_server.ui_url}/deployments", wait_until="networkidle")
        page.get_by_role("link", name="extract", exact=True).first.click()
        page.wait_for_url("**/deployments/deployment/**")
        page.get_by_role("button", name="Run", exact=True).first.click()
        page.get_by_text("Custom run").first.click()
        page.wait_for_url("**/run**")
        # The parameter: a settings override typed into the run form's list field.
        page.get_by_role("button", name="Add item").first.click()
        page.locator("textarea, input[type=text]").last.fill("extract.shard_size=6")
        # On a loaded machine the UI's create-run call can fail ("Oops. Something went
        # wrong." in a toast, no run made): a user submits again, and so does this test.
        for attempt in range(3):
            page.get_by_role("button", name="Submit").click()
            run_id = _submitted_run(["extract.shard_size=6"], timeout=30.0, missing_ok=True)
            if run_id is not None:
                break
            oops = page.get_by_text("Something went wrong")
            assert attempt < 2 and oops.count() > 0, "the form made no run and showed no error"
            page.keyboard.press("Escape")
        assert run_id is not None
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-custom-run.png"), full_page=True)
        raise
    run = wait_for_run(run_id, timeout=400)
    assert run.state.is_completed(), served.text()[-3000:]
    assert run.parameters["overrides"][-1] == "extract.shard_size=6"  # typed into the form
    for modality in ("visual", "acoustic", "text"):
        (table,) = list((served.root / "stores" / "features" / modality).iterdir())
        assert len(pd.read_parquet(table)) == 18
    with _client() as client:
        tasks = client.read_task_runs()
    shards = [t for t in tasks if t.flow_run_id == run.id and t.name.startswith("embed-visual")]
    assert len(shards) == 3  # 18 videos in shards of 6: the form's parameter took effect
    page.goto(f"{prefect_server.ui_url}/flow-runs/flow-run/{run_id}", wait_until="networkidle")
    time.sleep(1)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-extract-run.png"))
    shutil.rmtree(served.root / "artifacts", ignore_errors=True)


def test_a_train_run_shows_its_epochs_and_its_report(
    trained_run,  # noqa: F811 (the fixture imported above)
    prefect_server,
    browser_page,
):
    flow_run_id, _ = trained_run
    page = browser_page
    try:
        page.goto(f"{prefect_server.ui_url}/flow-runs/flow-run/{flow_run_id}")
        # The Logs tab opens first: the last epoch of the last stage is one of its lines.
        page.get_by_text("fold-1 step2: epoch 2/2 loss=").first.wait_for()
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        page.get_by_text("train-folds", exact=True).first.wait_for()  # the fold table's card
        page.get_by_text("train-report", exact=True).first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        page.get_by_role("cell", name="full method (voted)").wait_for()  # the report's table
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-train-run.png"), full_page=True)
        raise


def _submitted_run(overrides: list[str], timeout: float = 60.0, missing_ok: bool = False):
    """The id of the flow run the form created: the extract deployment's newest run (None
    after `timeout` with `missing_ok`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _client() as client:
            deployment = client.read_deployment_by_name("extract/extract")
            runs = [r for r in client.read_flow_runs() if r.deployment_id == deployment.id]
        if runs:
            return max(runs, key=lambda r: r.created).id
        time.sleep(1)
    if missing_ok:
        return None
    raise AssertionError(f"no run of extract/extract with overrides {overrides} in {timeout}s")
