"""`merflow robustness RUN`: score a finished run on corrupted copies of its own validation
videos (noisy audio, blurred, downscaled or dropped frames), as the robustness flow against the
data root's Prefect server (flows/robustness.py). Heavy modules load when the command runs."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli_common import (
    OVERRIDE,
    DataRootUrlOpt,
    ProfileOpt,
    RunArg,
    UsageProblem,
    checked_run,
    connect_server,
    data_root_for,
)

LevelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--levels",
        help="corruption levels KIND:LEVEL, repeatable or comma-joined: noise:20,10,5,0 (white "
        "noise, dB SNR), pink:10 (pink noise), down:2,4 (MER-NOISE's pyramid blur, rate 2^k), "
        "blur:1,2 (Gaussian sigma, px), drop:25 (percent of frames); default: noise:20,10,5,0 "
        "and down:2,4",
        show_default=False,
    ),
]


def robustness_cmd(
    run: RunArg,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value setting overrides, e.g. models.device=cuda"),
    ] = None,
    levels: LevelsOpt = None,
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
) -> None:
    """Score a finished run on corrupted copies of its validation videos: WAF per level and
    classifier, as a table, a plot and files in the run folder (features are extracted once and
    reused)."""
    from flows.config import load_settings
    from tasks.corrupt import CorruptionError, parse_levels

    bad = [o for o in overrides or [] if not OVERRIDE.match(o)]
    if bad:
        raise UsageProblem(f"{bad[0]} is not a key=value setting override")
    try:
        parse_levels(levels or ["noise:20"])  # refused before a server starts
    except CorruptionError as e:
        raise UsageProblem(str(e)) from e
    settings = load_settings(profile, overrides or [])
    root = data_root_for(settings, data_root, run)
    checked_run(settings, root, run)  # refused before a server starts
    from flows.robustness import robustness_flow
    from flows.server_watch import watching
    from tasks.training.robustness import report_markdown

    env = connect_server(settings, settings.local_root(root))
    with watching(env):  # a local server that dies comes back
        out = robustness_flow(
            data_root=str(root),
            run=run,
            profile=profile,
            overrides=list(overrides or []),
            levels=levels,
        )
    typer.echo(report_markdown(out))
    computed = sum(sum(v.values()) for v in out["extracted"].values())
    typer.echo(
        f"run {out['run_key']}: {len(out['levels'])} levels; {computed} stage outputs computed "
        f"(0: every feature was already stored); files in {out['folder']} (robustness.md, "
        "robustness.png, robustness.csv, robustness.json)"
    )


def register(app: typer.Typer) -> None:
    """Add `merflow robustness` to the command line."""
    app.command("robustness")(robustness_cmd)
