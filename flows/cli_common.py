"""What every `merflow` command shares: the option declarations and the one rule that turns an
error into a one-line message and an exit code.

Exit codes, for every command:

* 0: done (`check`: no error-level finding);
* 1: the work failed: a video or file that cannot be processed (BadInputError), another
  merflow error, the Prefect server, the disk; or `check` found errors;
* 2: the command cannot run as given: a setting, an argument or a path is wrong (SettingsError,
  ValueError, a file or folder that does not exist, a parameter outside the allowed roots);
* 3: `extract --strict` and some videos failed.

The rule is applied once, around every command, by `MerflowGroup` (the root command group):
commands raise merflow's errors and never choose a code themselves. `merflow -v ...` shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from flows.config import list_profiles

if TYPE_CHECKING:
    from flows.config import Settings
    from tasks.corpus.layout import CorpusLayout

# -- options shared by the commands ----------------------------------------------------------
ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile", "-p", help=f"settings profile ({', '.join(list_profiles())}, or a .yaml file)"
    ),
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value setting overrides, e.g. faces.fps=5")
]
# Strings, not Paths: a Path would collapse the '//' of an s3://bucket/prefix data root.
DataRootUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--data-root",
        help="where stores and artifacts live: a folder or an object-storage URL "
        "(s3://bucket/prefix; models, runs and the Prefect server stay in a local work folder)",
    ),
]
DataRootArg = Annotated[
    str, typer.Argument(help="the data root of an extraction: a folder or an s3://... URL")
]
RequiredDataRootOpt = Annotated[
    str, typer.Option("--data-root", help="the data root to look in (a folder or a URL)")
]

# A finished training run (`merflow predict`, `merflow robustness`).
RunArg = Annotated[
    str,
    typer.Argument(
        metavar="RUN",
        help="the run: `latest` (newest finished run of the settings' method: the full method "
        "by default), a run key or a run folder",
    ),
]


class UsageProblem(ValueError):
    """The command line names something that cannot be used (a folder that does not exist)."""


# A `key=value` setting override (`train.seed=1`, `data_root=s3://b/p`), as opposed to a path.
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_0-9]+)*=")


def corpus_or_override(
    corpus_dir: str | None, overrides: list[str] | None
) -> tuple[Path | None, list[str]]:
    """An optional corpus argument and the overrides after it: click gives the first override
    to the corpus when the corpus is left out (`merflow train --data-root R train.seed=1`)."""
    overrides = list(overrides or [])
    if corpus_dir is None:
        return None, overrides
    if not Path(corpus_dir).exists() and OVERRIDE.match(corpus_dir):
        return None, [corpus_dir, *overrides]
    return Path(corpus_dir), overrides


def checked_corpus(corpus_dir: Path, settings: Settings) -> CorpusLayout:
    """The corpus's video folders, refused (UsageProblem, exit 2) when the folder does not
    exist or holds no videos, before any server starts (no file is opened, nothing heavy
    loads)."""
    from tasks.corpus.layout import CorpusError, corpus_layout

    c = settings.corpus
    try:
        found = corpus_layout(corpus_dir, c.labelled_dir, c.unlabelled_dir, c.video_extensions)
    except CorpusError as e:
        raise UsageProblem(str(e)) from e
    return found


def data_root_for(settings, data_root: str | None, run: str):
    """--data-root, else the data_root setting, else the data root a run folder lies in."""
    from data_contracts.location import normalize_root

    if data_root:
        return normalize_root(data_root)
    if settings.data_root:
        return settings.resolved_data_root()
    folder = Path(run).expanduser()
    if folder.is_dir() and folder.parent.name == "runs":
        return folder.resolve().parent.parent
    raise UsageProblem(
        "give --data-root: the data root the run was trained on (or the run folder's path as RUN)"
    )


def checked_run(settings: Settings, root, run: str) -> Path:
    """The finished training run RUN names under the data root, checked whole (a missing,
    unfinished or partial run: exit 2) before any server starts. Loads no model."""
    from flows.predict import runs_dir
    from tasks.predict import find_run, load_run, method_switches

    folder = find_run(runs_dir(settings, root), run, method_switches(settings.train))
    load_run(folder)
    return folder


# -- the Prefect server a command's flows run against ----------------------------------------
def connect_server(settings: Settings, root: Path) -> dict[str, str]:
    """The Prefect clients' environment for a data root; says which server and why."""
    from flows import server

    conn = server.connect(
        root, settings.prefect.api_url, settings.prefect.port, host=settings.prefect.host
    )
    for line in conn.describe():
        typer.echo(line)
    return conn.env


@contextlib.contextmanager
def flow_run(
    corpus_dir: Path | None,
    settings: Settings,
    profile: str,
    overrides: list[str] | None,
    data_root: str | Path | None,
    env: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Where a command calls its flow: connected to the data root's Prefect server (or the one
    `env` names) and watched (flows/server_watch.py); yields the flow's common arguments
    (corpus_dir, profile, data_root, overrides). A corpus folder that does not exist or holds no
    videos is refused first (checked_corpus).

        with flow_run(corpus, settings, profile, overrides, data_root) as args:
            report = train_flow(**args)
    """
    from data_contracts.location import normalize_root
    from flows.server_watch import watching

    if corpus_dir is not None:
        found = checked_corpus(corpus_dir, settings)
        if found.plain:  # one line: the videos are taken as unlabelled
            typer.echo(found.note(settings.corpus.labelled_dir, settings.corpus.unlabelled_dir))
    root = normalize_root(data_root) if data_root else settings.resolved_data_root(corpus_dir)
    # The Prefect server lives on a local disk: the data root, or a URL root's work folder.
    env = env or connect_server(settings, settings.local_root(root))
    with watching(env):
        yield {
            "corpus_dir": str(corpus_dir) if corpus_dir is not None else None,
            "profile": profile,
            "data_root": str(root),
            "overrides": list(overrides or []),
        }


# -- errors to exit codes ----------------------------------------------------------------------
def exit_code(error: BaseException) -> int:
    """The exit code of an error under merflow's one rule (see the module docstring)."""
    from data_contracts.errors import BadInputError
    from flows.safety import UnsafeParameterError

    if isinstance(error, BadInputError):
        return 1  # the input was read and is bad: a failed piece of work, not a usage error
    if isinstance(error, ValueError | UnsafeParameterError | FileNotFoundError | LookupError):
        return 2
    return 1


def one_line(error: BaseException) -> str:
    """The error's message on one line: a list of problems becomes `head: a; b; c`."""
    lines = [ln.strip().removeprefix("- ").strip() for ln in str(error).splitlines()]
    lines = [ln for ln in lines if ln] or [type(error).__name__]
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


# typer.TyperException: the usage errors of typer's own click (no such option, a missing
# argument), which typer prints with their usage line and exit code 2.
_PASS_THROUGH = (typer.Exit, typer.Abort, typer.TyperException)


class MerflowGroup(TyperGroup):
    """The root command group: every command's error becomes `error: <one line>` on stderr and
    the exit code of `exit_code` (its traceback with -v/--verbose)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as e:
            if ctx.params.get("verbose"):
                raise
            code = exit_code(e)
            known = _is_known(e)
            message = one_line(e) if known else f"{type(e).__name__}: {one_line(e)}"
            if code == 2:
                command = " ".join(filter(None, ["merflow", ctx.invoked_subcommand]))
                message += f" (see `{command} --help`)"
            elif not known:
                message += " (`merflow -v ...` shows where)"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from e


def _is_known(error: BaseException) -> bool:
    """merflow's own errors and the kinds whose message is meant for the user."""
    from data_contracts.errors import MerflowError
    from flows.server import ServerError

    return isinstance(error, MerflowError | ServerError | ValueError | LookupError | OSError)
