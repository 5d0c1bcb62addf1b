"""`merflow ablate CORPUS`: the paper's Table 1 (the full method, its ablations and the
baseline over training seeds) as the ablate flow against the data root's Prefect server
(flows/ablate.py). Heavy modules load when the command runs, not with the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import DataRootUrlOpt, Overrides, ProfileOpt, UsageProblem, flow_run


def ablate_cmd(
    corpus_dir: Annotated[Path, typer.Argument(help="the extracted corpus folder")],
    seeds: Annotated[int, typer.Option(help="training seeds per system", min=1)] = 3,
    parallel: Annotated[
        int | None,
        typer.Option(help="train runs at once (default: half the cores)", min=1),
    ] = None,
    robustness: Annotated[
        list[str] | None,
        typer.Option(
            "--robustness",
            metavar="LEVELS",
            help="also score every run on corrupted copies of its validation videos at these "
            "levels (KIND:LEVEL, e.g. noise:20,10,5,0 blur:2; `default` for merflow "
            "robustness's default levels), the systems side by side",
            show_default=False,
        ),
    ] = None,
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
    overrides: Overrides = None,
) -> None:
    """The paper's Table 1: full method, each ablation and the baseline over seeds (finished
    runs are reused, shared pretraining is trained once)."""
    from tasks.corrupt import CorruptionError, parse_levels

    if robustness:
        try:
            parse_levels(robustness)  # refused before a server starts
        except CorruptionError as e:
            raise UsageProblem(str(e)) from e
    from flows.ablate import ablate_flow
    from flows.config import load_settings
    from tasks.training.ablate_report import table_markdown

    settings = load_settings(profile, overrides or [])
    with flow_run(corpus_dir, settings, profile, overrides, data_root) as args:
        table = ablate_flow(**args, seeds=seeds, parallel=parallel, robustness=robustness)
    typer.echo(table_markdown(table))
    if "robustness" in table:
        from tasks.training.robustness import comparison_markdown

        typer.echo(comparison_markdown(table["robustness"]))
        typer.echo(f"robustness: {table['report_dir']} (robustness.md, .png, .json)")
    typer.echo(f"table: {table['report_dir']} (table1.md, table1.png, table1.json)")


def register(app: typer.Typer) -> None:
    """Add `merflow ablate` to the command line."""
    app.command("ablate")(ablate_cmd)
