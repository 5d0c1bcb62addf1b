"""The `merflow` command line: one entry point for the demo, scans, flows and single tasks."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from flows.cli_common import (
    DataRootUrlOpt,
    MerflowGroup,
    Overrides,
    ProfileOpt,
    UsageProblem,
    checked_corpus,
    corpus_or_override,
    flow_run,
)
from flows.cli_common import connect_server as _connect
from flows.config import Settings, load_settings

app = typer.Typer(
    name="merflow",
    help="Videos in, multimodal emotion features and an MR-CCL classifier out (Prefect 3). "
    "Exit codes: 0 done, 1 the work failed, 2 a setting or argument is wrong, "
    "3 extract --strict saw failed videos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=MerflowGroup,  # the one error -> message + exit code rule (flows/cli_common.py)
)


def _setup_logging(verbose: bool = False) -> None:
    # Without -v, no handler here: the root logger is Prefect's, configured when prefect is
    # first imported (its console handler names each run's flow and task, and root stays at
    # WARNING, which keeps httpx's line per API request and library INFO chatter out). A root
    # handler added first would make Prefect leave the root alone.
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )


def _settings(profile: str, overrides: list[str] | None) -> Settings:
    return load_settings(profile, overrides or [])


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    _setup_logging(verbose)


@app.command("config")
def config_cmd(profile: ProfileOpt = "demo", overrides: Overrides = None) -> None:
    """Print the resolved settings (profile + MERFLOW_* environment + overrides)."""
    s = _settings(profile, overrides)
    typer.echo(yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


@app.command("demo-corpus")
def demo_corpus_cmd(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the corpus into")],
    labelled: Annotated[int, typer.Option(help="labelled clips")] = 60,
    unlabelled: Annotated[int, typer.Option(help="unlabelled clips")] = 120,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same corpus)")] = 0,
) -> None:
    """Write a small MER2024-shaped corpus with real faces, Chinese speech and transcripts."""
    from tasks.demo.corpus import make_demo_corpus

    corpus = make_demo_corpus(out_dir, n_labelled=labelled, n_unlabelled=unlabelled, seed=seed)
    typer.echo(f"demo corpus: {corpus}")


@app.command("scan")
def scan_cmd(
    video_dirs: Annotated[list[Path], typer.Argument(help="folders of videos")],
    data_root: DataRootUrlOpt = None,
) -> None:
    """Build or update the manifest; hashes only new or changed files."""
    from data_contracts.store import Store
    from tasks.corpus.scan import scan_videos

    settings = _settings("demo", [])
    root = (
        _root(data_root)
        if data_root
        else settings.resolved_data_root(Path(video_dirs[0]).resolve().parent)
    )
    report, _ = scan_videos(video_dirs, Store(root), extensions=settings.corpus.video_extensions)
    typer.echo(f"manifest {Store(root).table_dir(_manifest())}: {report.summary()}")
    for name, ids in (("new", report.new), ("changed", report.changed), ("gone", report.gone)):
        if ids:
            shown = ", ".join(ids[:10]) + (f" (+{len(ids) - 10} more)" if len(ids) > 10 else "")
            typer.echo(f"  {name}: {shown}")
    for vid in report.unreadable:
        typer.echo(f"  unreadable: {vid} (see the failures table)")


def _root(data_root: str | Path) -> Path | str:
    """A --data-root value as merflow uses it (a local Path or a URL)."""
    from data_contracts.location import normalize_root

    return normalize_root(data_root)


def _manifest():
    from data_contracts import tables

    return tables.MANIFEST


def _run_extract(
    corpus_dir, settings, profile, overrides, data_root, only_new=False, env=None
) -> dict:
    checked_corpus(corpus_dir, settings)  # a bad folder is refused before Prefect loads
    from flows.extract import ExtractionSummary, extract_flow
    from flows.runners import with_runner

    with flow_run(corpus_dir, settings, profile, overrides, data_root, env) as args:
        summary = with_runner(extract_flow, settings)(**args, only_new=only_new)
    typer.echo(ExtractionSummary(**summary).markdown())
    return summary


@app.command("extract")
def extract_cmd(
    corpus_dir: Annotated[
        Path, typer.Argument(help="MER2024-shaped corpus folder, or any folder of videos")
    ],
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
    only_new: Annotated[
        bool, typer.Option(help="only videos new or changed since last scan")
    ] = False,
    strict: Annotated[bool, typer.Option(help="exit non-zero when any video failed")] = False,
    overrides: Overrides = None,
) -> None:
    """Extract visual, acoustic and text features into the feature stores (a Prefect flow).
    A folder without video-labeled/ and video-unlabeled/ is a corpus of unlabelled videos."""
    settings = _settings(profile, overrides)
    summary = _run_extract(corpus_dir, settings, profile, overrides, data_root, only_new)
    if strict and summary["failures"]:
        typer.echo(f"error: {len(summary['failures'])} failure(s) and --strict was given", err=True)
        raise typer.Exit(3)


def _show_report(report: dict) -> None:
    from tasks.training.report import report_markdown

    typer.echo(report_markdown(report))
    typer.echo(
        f"report: {report['report_dir']} (report.md, confusion.png, curves.png, submission.csv)"
    )


@app.command("train")
def train_cmd(
    corpus_dir: Annotated[
        str | None,
        typer.Argument(help="the extracted corpus folder; leave out to train on the stores alone"),
    ] = None,
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="a label CSV (name, discrete) to load into the labels table first"),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """MR-CCL pretraining, two-step self-training and voting on the feature stores; WAF report.
    Without a corpus folder it trains on what the stores under --data-root hold
    (docs/import.md)."""
    corpus, overrides = corpus_or_override(corpus_dir, overrides)
    settings = _settings(profile, overrides)
    if corpus is None and not (data_root or settings.data_root):
        raise UsageProblem("give the corpus folder, or --data-root to train on its stores alone")
    if labels is not None and not labels.is_file():
        raise UsageProblem(f"label file {labels} does not exist; give a CSV with name, discrete")
    kw = {"labels_csv": str(labels.resolve())} if labels is not None else {}
    from flows.train import train_flow

    with flow_run(corpus, settings, profile, overrides, data_root) as args:
        report = train_flow(**args, **kw)
    _show_report(report)


@app.command("train-join")
def train_join_cmd(
    corpus_dir: Annotated[Path, typer.Argument(help="the extracted corpus folder")],
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
    overrides: Overrides = None,
) -> None:
    """On the other machines of a multi-node run (train.nnodes > 1): take part in every
    training step the train flow runs under torchrun. Give the same settings as the flow."""
    from flows.train import join_training

    _settings(profile, overrides)
    steps = join_training(
        str(corpus_dir), profile, str(data_root) if data_root else None, overrides, typer.echo
    )
    typer.echo(f"took part in: {', '.join(steps) or 'nothing (every step was done)'}")


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[
        Path, typer.Option("--out", help="where the corpus and data root go")
    ] = Path("demo-run"),
    labelled: Annotated[int, typer.Option(help="labelled clips")] = 60,
    unlabelled: Annotated[int, typer.Option(help="unlabelled clips")] = 120,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    serve: Annotated[
        bool,
        typer.Option("--serve", help="then serve the demo's deployments to the UI until Ctrl-C"),
    ] = False,
    overrides: Overrides = None,
) -> None:
    """Run the main job end to end on the built-in demo corpus with tiny models."""
    from tasks.demo.corpus import make_demo_corpus, score_against_truth

    settings = _settings("demo", overrides)
    corpus_dir = (out_dir / "corpus").resolve()
    if not (corpus_dir / settings.corpus.labels_csv).exists():
        make_demo_corpus(corpus_dir, n_labelled=labelled, n_unlabelled=unlabelled, seed=seed)
    root = settings.resolved_data_root(corpus_dir)
    env = _connect(settings, settings.local_root(root))
    _run_extract(corpus_dir, settings, "demo", overrides, None, env=env)
    from flows.train import train_flow

    with flow_run(corpus_dir, settings, "demo", overrides, None, env) as args:
        report = train_flow(**args)
    _show_report(report)
    for line in score_against_truth(corpus_dir, Path(report["report_dir"]).parent):
        typer.echo(line)
    serve_args = _demo_serve_args(corpus_dir, overrides)
    for line in _demo_next_steps(root, env["PREFECT_API_URL"], serve_args, serving=serve):
        typer.echo(line)
    if serve:
        serve_cmd(**serve_args)


def _demo_serve_args(corpus_dir: Path, overrides: list[str] | None) -> dict:
    """The `merflow serve` arguments that serve the demo corpus's deployments."""
    return {"corpus_dir": corpus_dir, "profile": "demo", "overrides": list(overrides or [])}


def _serve_command_line(args: dict) -> str:
    """`merflow serve ...` with these serve arguments, as a shell command."""
    argv = ["merflow", "serve", str(args["corpus_dir"]), "--profile", args["profile"]]
    return shlex.join([*argv, *args["overrides"]])


def _demo_next_steps(root, api_url: str, serve_args: dict, serving: bool) -> list[str]:
    """After the demo: where its results and the UI are, and how to run the flows from the UI."""
    ui = api_url.removesuffix("/api")
    lines = [
        f"data root: {root}",
        f"Prefect UI: {ui} (the demo's flow runs are under Runs)",
    ]
    if serving:
        return [
            *lines,
            f"serving the deployments: press Run on one at {ui}/deployments; Ctrl-C stops",
        ]
    return [
        *lines,
        "To start the flows from the UI, serve their deployments (until Ctrl-C), then press Run "
        f"on one at {ui}/deployments:",
        f"  {_serve_command_line(serve_args)}",
        "(`merflow demo --serve` does this after the demo)",
    ]


def _serve_setup(settings, corpus_dir, profile, data_root, interval, cron, overrides):
    """What serve and deploy share: the deployments' options, the data root, the server. A
    corpus folder that does not exist is refused first (one without videos yet is served: its
    scheduled runs extract what arrives)."""
    if not Path(corpus_dir).is_dir():
        raise UsageProblem(
            f"corpus folder {corpus_dir} does not exist; give a folder of videos or a "
            "MER2024-shaped corpus (`merflow demo-corpus DIR` creates one)"
        )
    opts = _serve_options(corpus_dir, profile, data_root, interval or None, cron, overrides)
    root = _root(opts.data_root) if opts.data_root else settings.resolved_data_root(corpus_dir)
    return opts, root, _connect(settings, settings.local_root(root))


def _serve_options(corpus_dir, profile, data_root, interval, cron, overrides):
    from flows.deploy import ServeOptions

    return ServeOptions(
        corpus_dir=str(corpus_dir.resolve()),
        profile=profile,
        data_root=str(_root(data_root)) if data_root else None,
        interval_seconds=interval,
        cron=cron,
        overrides=tuple(overrides or ()),
    )


IntervalOpt = Annotated[
    float, typer.Option(help="reextract-new runs every this many seconds (0: no schedule)")
]
CronOpt = Annotated[str | None, typer.Option(help="cron schedule for reextract-new instead")]


@app.command("serve")
def serve_cmd(
    corpus_dir: Annotated[Path, typer.Argument(help="the corpus the deployments work on")],
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
    interval: IntervalOpt = 3600.0,
    cron: CronOpt = None,
    allow: Annotated[
        list[Path] | None, typer.Option("--allow", help="more folders runs may read or write")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Serve the extract, train, pipeline, scheduled reextract-new, predict-new and ablate
    deployments."""
    import os

    from flows.deploy import allowed_roots_for, deployment_specs, serve_deployments
    from flows.server_watch import watching

    settings = _settings(profile, overrides)
    opts, root, env = _serve_setup(
        settings, corpus_dir, profile, data_root, interval, cron, overrides
    )
    roots = allowed_roots_for(opts, [str(root), *map(str, allow or [])])
    # Runs started from the UI may only touch these folders (flows/safety.py); the environment,
    # not a run's overrides, carries the restriction into every flow-run process.
    env["MERFLOW_ALLOWED_ROOTS"] = os.pathsep.join(roots)
    names = ", ".join(options["name"] for _, options in deployment_specs(opts))
    typer.echo(f"serving {names}; runs may touch {roots}")
    with watching(env):
        serve_deployments(opts)


@app.command("deploy")
def deploy_cmd(
    corpus_dir: Annotated[Path, typer.Argument(help="the corpus the deployments work on")],
    cpu_pool: Annotated[str, typer.Option(help="work pool for extraction")] = "merflow-cpu",
    gpu_pool: Annotated[str, typer.Option(help="work pool for training")] = "merflow-gpu",
    profile: ProfileOpt = "demo",
    data_root: DataRootUrlOpt = None,
    interval: IntervalOpt = 3600.0,
    cron: CronOpt = None,
    overrides: Overrides = None,
) -> None:
    """Register the deployments on work pools, creating missing ones as process pools (start
    workers with `prefect worker start`); `pipeline` trains through `train` on the GPU pool."""
    from flows import server
    from flows.deploy import deploy_to_pools

    settings = _settings(profile, overrides)
    opts, _, env = _serve_setup(settings, corpus_dir, profile, data_root, interval, cron, overrides)
    with server.use_server(env):
        ids = deploy_to_pools(opts, cpu_pool, gpu_pool, emit=typer.echo)
    typer.echo(f"registered {len(ids)} deployments; start the workers:")
    typer.echo(f"  PREFECT_API_URL={env['PREFECT_API_URL']} prefect worker start --pool {cpu_pool}")
    typer.echo(f"  PREFECT_API_URL={env['PREFECT_API_URL']} prefect worker start --pool {gpu_pool}")


def _mount_subcommands() -> None:
    """The commands declared in their own modules (flows/*_cli.py, which import only
    flows/cli_common.py and lower layers, never this module)."""
    from flows.ablate_cli import register as register_ablate
    from flows.embed_cli import register as register_extractors
    from flows.import_cli import register as register_import
    from flows.predict_cli import register as register_predict
    from flows.quality_cli import register as register_quality
    from flows.robustness_cli import register as register_robustness
    from flows.server_cli import register as register_server
    from flows.task_cli import task_app

    register_server(app)
    register_extractors(task_app)
    app.add_typer(task_app, name="task", help="Run one task on one video, locally, no server.")
    register_quality(app)
    register_predict(app)
    register_import(app)
    register_ablate(app)
    register_robustness(app)


_mount_subcommands()


def main() -> None:  # pragma: no cover
    """Console-script entry point."""
    app(prog_name="merflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
