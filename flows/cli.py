"""The `merflow` command line: one entry point for the demo, scans, flows and single tasks."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from flows.config import Settings, SettingsError, list_profiles, load_settings

app = typer.Typer(
    name="merflow",
    help="Videos in, multimodal emotion features and an MR-CCL classifier out (Prefect 3).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ProfileOpt = Annotated[
    str, typer.Option("--profile", "-p", help=f"settings profile ({', '.join(list_profiles())})")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value setting overrides, e.g. faces.fps=5")
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="where stores, artifacts and caches live"),
]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _settings(profile: str, overrides: list[str] | None) -> Settings:
    try:
        return load_settings(profile, overrides or [])
    except SettingsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


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
    labeled: Annotated[int, typer.Option(help="labelled clips")] = 60,
    unlabeled: Annotated[int, typer.Option(help="unlabelled clips")] = 120,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same corpus)")] = 0,
) -> None:
    """Write a small MER2024-shaped corpus with real faces, Chinese speech and transcripts."""
    from tasks.demo_corpus import make_demo_corpus
    from tasks.errors import MerflowError

    try:
        corpus = make_demo_corpus(out_dir, n_labeled=labeled, n_unlabeled=unlabeled, seed=seed)
    except MerflowError as e:
        raise _fail(str(e)) from e
    typer.echo(f"demo corpus: {corpus}")


@app.command("scan")
def scan_cmd(
    video_dirs: Annotated[list[Path], typer.Argument(help="folders of videos")],
    data_root: DataRootOpt = None,
) -> None:
    """Build or update the manifest; hashes only new or changed files."""
    from data_contracts.store import Store
    from tasks.errors import BadInputError
    from tasks.scan import scan_videos

    root = data_root or Path(video_dirs[0]).resolve().parent / "merflow"
    try:
        report, _ = scan_videos(video_dirs, Store(root))
    except BadInputError as e:
        raise _fail(str(e)) from e
    typer.echo(f"manifest {Store(root).table_dir(_manifest())}: {report.summary()}")
    for name, ids in (("new", report.new), ("changed", report.changed), ("gone", report.gone)):
        if ids:
            shown = ", ".join(ids[:10]) + (f" (+{len(ids) - 10} more)" if len(ids) > 10 else "")
            typer.echo(f"  {name}: {shown}")
    for vid in report.unreadable:
        typer.echo(f"  unreadable: {vid} (see the failures table)")


def _manifest():
    from data_contracts import tables

    return tables.MANIFEST


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="where the corpus and data root go")] = Path(
        "demo-run"
    ),
    labeled: Annotated[int, typer.Option(help="labelled clips")] = 60,
    unlabeled: Annotated[int, typer.Option(help="unlabelled clips")] = 120,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overrides: Overrides = None,
) -> None:
    """Run the main job end to end on the built-in demo corpus with tiny models."""
    from data_contracts.store import Store
    from flows.config import save_resolved
    from tasks.demo_corpus import make_demo_corpus
    from tasks.scan import corpus_video_dirs, scan_videos

    settings = _settings("demo", overrides)
    corpus_dir = out_dir / "corpus"
    if not (corpus_dir / settings.corpus.labels_csv).exists():
        make_demo_corpus(corpus_dir, n_labeled=labeled, n_unlabeled=unlabeled, seed=seed)
    root = settings.resolved_data_root(corpus_dir)
    store = Store(root)
    save_resolved(settings, root / "runs" / "demo-settings.yaml")
    dirs = corpus_video_dirs(corpus_dir, settings.corpus.labeled_dir, settings.corpus.unlabeled_dir)
    report, _ = scan_videos(dirs, store)
    typer.echo(f"scan: {report.summary()}")
    typer.echo(f"data root: {root}")


def _mount_subcommands() -> None:
    try:
        from flows.task_cli import task_app
    except ImportError:  # pragma: no cover - present in every install
        return
    app.add_typer(task_app, name="task", help="Run one task on one video, locally, no server.")


_mount_subcommands()


def main() -> None:  # pragma: no cover
    """Console-script entry point."""
    app(prog_name="merflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
