"""`merflow server start|stop|status|list`: the local Prefect servers merflow starts, one per
data root (flows/server.py, docs/servers.md). Nothing heavy loads with the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import UsageProblem
from flows.config import load_settings

server_app = typer.Typer(
    help="The local Prefect servers merflow starts, one per data root (docs/servers.md).",
    no_args_is_help=True,
)
_ROOT_HELP = "the data root whose server this is (for an s3:// root: its local work folder's)"
RootArg = Annotated[str, typer.Option("--data-root", help=_ROOT_HELP)]


def _server_home(data_root: str) -> Path:
    """Where a data root's Prefect server lives: the root, or a URL root's local work folder."""
    from data_contracts.location import normalize_root

    return load_settings("demo").local_root(normalize_root(data_root))


@server_app.command("start")
def server_start(
    data_root: RootArg,
    host: Annotated[
        str | None,
        typer.Option(
            help="bind address (default: the prefect.host setting, 127.0.0.1; beyond loopback "
            "only with an auth string)"
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="API and UI port (default: the prefect.port setting, 4200)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL URL for teams (default: SQLite under the data root)"),
    ] = None,
) -> None:
    """Start a Prefect server in the background (SQLite under the data root)."""
    from flows import server

    settings = load_settings("demo")
    host = host or settings.prefect.host
    port = settings.prefect.port if port is None else port
    info = server.start(_server_home(data_root), host=host, port=port, database_url=database_url)
    typer.echo(f"Prefect server pid {info.pid} at {info.ui_url} (log {info.log})")
    if info.port_note:
        typer.echo(f"  ({info.port_note})")
    typer.echo(f"clients: export PREFECT_API_URL={info.api_url}")
    typer.echo(f"stop:    {info.stop_command}")


@server_app.command("stop")
def server_stop(
    data_root: Annotated[str | None, typer.Option("--data-root", help=_ROOT_HELP)] = None,
    every: Annotated[
        bool, typer.Option("--all", help="stop every server `merflow server list` shows")
    ] = False,
) -> None:
    """Stop the data root's Prefect server, or with --all every one merflow started."""
    from flows import server

    if every == bool(data_root):
        raise UsageProblem(
            "give --data-root ROOT (that data root's server) or --all (every server merflow "
            "started on this machine: `merflow server list` shows them), one of the two"
        )
    if data_root:
        typer.echo("stopped" if server.stop(_server_home(data_root)) else "no server was running")
        return
    infos = server.started_servers()
    for info in infos:
        server.stop(info.data_root)
        typer.echo(f"stopped pid {info.pid} ({info.ui_url}, data root {info.data_root})")
    if not infos:
        typer.echo("no server that merflow started is running")


@server_app.command("status")
def server_status(data_root: RootArg) -> None:
    """Say whether the data root's Prefect server runs, and where."""
    from flows import server

    info = server.status(_server_home(data_root))
    if info is None:
        typer.echo("not running")
        raise typer.Exit(1)
    state = "healthy" if server.healthy(info.api_url) else "not answering"
    typer.echo(f"pid {info.pid} at {info.ui_url}: {state} (database {info.database})")


@server_app.command("list")
def server_list() -> None:
    """Every Prefect server merflow started on this machine that still runs."""
    import os

    from flows import server

    infos = server.started_servers()
    if not infos:
        typer.echo(f"no server that merflow started is running (list: {server.registry_dir()})")
        return
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    rows = [("DATA ROOT", "PID", "UI", "UP", "STATE")]
    for i in infos:
        state = "healthy" if server.healthy(i.api_url, auth, timeout=1.0) else "not answering"
        rows.append((str(i.data_root), str(i.pid), i.ui_url, server.age(i), state))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join([*(v.ljust(w) for v, w in zip(r, widths, strict=False)), r[-1]]))
    typer.echo(
        "stop one: merflow server stop --data-root ROOT; all of them: merflow server stop --all"
    )


def register(app: typer.Typer) -> None:
    """Add `merflow server ...` to the command line."""
    app.add_typer(server_app, name="server")
