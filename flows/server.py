"""A local Prefect server under the data root: start, stop, status, and client settings.

merflow runs flows against a real server (SQLite under the data root, or PostgreSQL by URL):
Prefect's ephemeral mode drops task-run records on exit and starts a server per process.
Which server a command uses is `connect`'s order (docs/servers.md); every server merflow starts
is also listed per user (`registry_dir`), so that `merflow server list` and
`merflow server stop --all` find them after the commands that started them have ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from data_contracts.atomic import atomic_path


class ServerError(RuntimeError):
    """The Prefect server could not be started, reached or stopped."""


@dataclass
class ServerInfo:
    """A server merflow started: where it listens and its real PID."""

    pid: int
    host: str
    port: int
    api_url: str
    home: str
    log: str
    database: str
    # time.time() at launch: tells the server from a later process that got its pid
    started_at: float = 0.0
    asked_port: int = 0  # the port asked for, when it was busy and `port` is a free one instead

    @property
    def ui_url(self) -> str:
        """The UI's address."""
        return self.api_url.removesuffix("/api")

    @property
    def data_root(self) -> Path:
        """The (local) data root whose server this is."""
        return Path(self.home).parent

    @property
    def port_note(self) -> str:
        """What to say when the server could not have the port it was asked for."""
        if not self.asked_port or self.asked_port == self.port:
            return ""
        return f"port {self.asked_port} was busy; the server listens on port {self.port} instead"

    @property
    def stop_command(self) -> str:
        """The command that stops this server."""
        return f"merflow server stop --data-root {shlex.quote(str(self.data_root))}"


def prefect_home(data_root: Path) -> Path:
    """PREFECT_HOME for a data root: the SQLite database, results and server logs live here."""
    return Path(data_root).resolve() / "prefect"


def _state_file(data_root: Path) -> Path:
    return prefect_home(data_root) / "server.json"


# -- the per-user list of started servers ------------------------------------------------------
STATE_ENV = "MERFLOW_STATE_DIR"


def registry_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder listing the servers merflow started on this machine for this user, one JSON
    file each: $MERFLOW_STATE_DIR/servers, else $XDG_STATE_HOME/merflow/servers
    (~/.local/state/merflow/servers)."""
    environ = os.environ if environ is None else environ
    base = environ.get(STATE_ENV) or Path(environ.get("XDG_STATE_HOME") or "~/.local/state") / (
        "merflow"
    )
    return Path(base).expanduser().resolve() / "servers"


def _entry(home: str | Path) -> Path:
    return registry_dir() / f"{hashlib.sha256(str(home).encode()).hexdigest()[:16]}.json"


def _read(path: Path) -> ServerInfo | None:
    try:
        return ServerInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent, half-written by an old merflow, foreign
        return None


def _write(path: Path, info: ServerInfo) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(info), indent=2))


def _alive(info: ServerInfo) -> bool:
    """Whether the recorded process still runs and is the one that was recorded."""
    import psutil

    try:
        proc = psutil.Process(info.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A process created after the launch is another one that got the pid.
        return not info.started_at or proc.create_time() < info.started_at + 2.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def started_servers() -> list[ServerInfo]:
    """The servers merflow started on this machine that still run, oldest first. The entries
    of servers that are gone are removed; running ones that an older merflow started without
    listing them are added (`_adopt`)."""
    _adopt()
    folder = registry_dir()
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        info = _read(path)
        if info is not None and _alive(info):
            found.append(info)
        else:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda i: i.started_at)


def _adopt() -> None:
    """List the `prefect server start` processes of this user that merflow started (their
    PREFECT_HOME's server.json names them) for this same list, but that are not in it yet."""
    import psutil

    mine = registry_dir()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not ({"server", "start"} <= set(cmd) and any(Path(c).name == "prefect" for c in cmd)):
            continue
        try:
            environ, created = proc.environ(), proc.create_time()
        except psutil.Error:  # another user's, or gone
            continue
        home = environ.get("PREFECT_HOME")
        if not home or registry_dir(environ) != mine or _entry(home).exists():
            continue
        info = _read(Path(home) / "server.json")
        if info is not None and info.pid == proc.pid:
            info.started_at = info.started_at or created
            _write(_entry(home), info)


def age(info: ServerInfo) -> str:
    """How long the server has run, e.g. `3 h 05 min`."""
    if not info.started_at:
        return "?"
    minutes, seconds = divmod(max(0, int(time.time() - info.started_at)), 60)
    (days, hours), minutes = divmod(minutes // 60, 24), minutes % 60
    if days or hours:
        return f"{days} d {hours:02d} h" if days else f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, auth_string: str | None, timeout: float):
    req = urllib.request.Request(url)
    if auth_string:
        req.add_header("Authorization", "Basic " + b64encode(auth_string.encode()).decode())
    return urllib.request.urlopen(req, timeout=timeout)


def healthy(api_url: str, auth_string: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the server at `api_url` answers its health check."""
    try:
        with _get(f"{api_url}/health", auth_string, timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def identity(api_url: str, auth_string: str | None = None, timeout: float = 5.0) -> str | None:
    """Who answers at `api_url`: the PREFECT_HOME the server runs with. merflow gives each
    server its data root's (`prefect_home`), so this tells a data root's server from any other."""
    try:
        with _get(f"{api_url}/admin/settings", auth_string, timeout) as r:
            return json.loads(r.read()).get("home")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError, AttributeError):
        return None


def warm_routes(api_url: str, auth_string: str | None = None, timeout: float = 30.0) -> None:
    """Have the server build its API routes now. FastAPI builds each included router's routes
    on the first request that reaches it, ~1 s of the server's CPU on 2 cores: a request that
    matches no route walks them all (a 404), so the first flow run does not pay it."""
    # The 404 it should give, or a slow server (the first flow run builds them then).
    with contextlib.suppress(urllib.error.URLError, OSError, TimeoutError):
        _get(f"{api_url}/merflow-warm-up", auth_string, timeout).close()


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` or one of its children listens on TCP `port`: then every answer on
    that port comes from it (a port has one listener)."""
    import psutil

    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if any(c.status == "LISTEN" and c.laddr[1:] == (port,) for c in proc.net_connections()):
                return True
    return False


def port_busy(host: str, port: int) -> bool:
    """Whether a server could not bind `host:port` now (as uvicorn binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def client_env(data_root: Path, api_url: str, auth_string: str | None = None) -> dict[str, str]:
    """Environment for Prefect clients (flows, workers, `merflow serve`) of this data root."""
    home = prefect_home(data_root)
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    }
    if auth_string:
        env["PREFECT_API_AUTH_STRING"] = auth_string
    return env


def status(data_root: Path) -> ServerInfo | None:
    """The server recorded for this data root, if its process is alive."""
    info = _read(_state_file(data_root))
    return info if info is not None and _alive(info) else None


# The database URL (with its password, unlike server.json) of each server this process started.
_DATABASE_URLS: dict[str, str] = {}


def setting_port() -> int:
    """The prefect.port setting (its default, or MERFLOW_PREFECT__PORT): the one source of the
    port a server merflow starts listens on when no port is given."""
    from flows.config import load_settings

    return load_settings("demo").prefect.port


def start(
    data_root: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth_string: str | None = None,
    database_url: str | None = None,
    timeout: float = 90.0,
    fixed_port: bool = False,
) -> ServerInfo:
    """Start `prefect server start` in the background, or return the data root's running one.

    One start per data root at a time (a lock): a second command waits, then shares the first
    one's server rather than migrate the same database again. A server counts as started once
    its own process listens on the port and the API there answers as this data root's; a port
    another process takes, before or during the start, moves it to a free port (`port_note`)
    unless `fixed_port`. Beyond loopback it needs PREFECT_SERVER_API_AUTH_STRING.
    `port` None: the prefect.port setting (setting_port).
    """
    from filelock import FileLock, Timeout

    port = setting_port() if port is None else port

    auth_string = auth_string or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    if not is_loopback(host) and not auth_string:
        raise ServerError(
            f"refusing to bind the Prefect server to {host}, which is not a loopback address, "
            f"without an auth string: set PREFECT_SERVER_API_AUTH_STRING=user:password (clients "
            f"then set PREFECT_API_AUTH_STRING to the same) or bind to 127.0.0.1"
        )
    home = prefect_home(data_root)
    home.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(home / "server.lock", timeout=timeout + 30):
            running = status(data_root)
            if running is not None:
                if healthy(running.api_url, auth_string):
                    return running
                raise ServerError(
                    f"a Prefect server (pid {running.pid}) is recorded for {data_root} but does "
                    f"not answer at {running.api_url}; stop it with `merflow server stop` and "
                    "start again"
                )
            asked = port
            for _ in range(5):
                if fixed_port or not port_busy(host, port):
                    info = _launch(data_root, host, port, auth_string, database_url, timeout)
                    if info is not None:
                        info.asked_port = asked
                        _write(_state_file(data_root), info)
                        _write(_entry(info.home), info)  # `merflow server list` finds it
                        if database_url:
                            _DATABASE_URLS[info.home] = database_url
                        return info
                if fixed_port:
                    raise ServerError(f"port {port} on {host} is taken by another process")
                port = free_port(host)
    except Timeout as e:
        raise ServerError(f"another merflow is starting the server of {data_root}") from e
    raise ServerError(f"no free port for the Prefect server of {data_root} on {host}")


def _launch(data_root, host, port, auth_string, database_url, timeout) -> ServerInfo | None:
    """Run a server on `port` until it answers as this data root's; None if another process
    holds the port (then this one cannot bind it and exits, or is stopped)."""
    from sqlalchemy.engine import make_url  # to record the URL without its password

    home = prefect_home(data_root)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    api_url = f"http://{url_host}:{port}/api"
    database = database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = {
        **os.environ,
        **client_env(data_root, api_url, auth_string),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": database,
    }
    env.pop("PREFECT_API_URL")  # the server must not try to talk to itself as a client
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    log_path = home / "server.log"
    prefect_bin = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect_bin) if prefect_bin.exists() else "prefect", "server", "start"]
    cmd += ["--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    info = ServerInfo(
        pid=proc.pid,
        host=host,
        port=port,
        api_url=api_url,
        home=str(home),
        log=str(log_path),
        database=make_url(database).set(password=None).render_as_string(hide_password=False),
        started_at=time.time(),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if port_busy(host, port):
                return None  # another process took the port first
            raise ServerError(
                f"the Prefect server exited with code {proc.returncode} during start-up; "
                f"see its log {log_path}"
            )
        if _listening(proc.pid, port) and healthy(api_url, auth_string):
            if identity(api_url, auth_string) != str(home):
                _terminate(proc.pid)
                raise ServerError(f"the server at {api_url} does not answer as {data_root}'s")
            warm_routes(api_url, auth_string)
            return info
        time.sleep(0.5)
    _terminate(proc.pid)
    raise ServerError(f"the Prefect server did not answer within {timeout:.0f} s; see {log_path}")


def stop(data_root: Path, timeout: float = 20.0) -> bool:
    """Stop the server recorded for this data root and return once its port is free; False if
    none was running."""
    home = prefect_home(data_root)
    listed = _read(_entry(home))
    # The list still knows a server whose data root was deleted while it ran.
    info = status(data_root) or (listed if listed is not None and _alive(listed) else None)
    _state_file(data_root).unlink(missing_ok=True)
    _entry(home).unlink(missing_ok=True)
    if info is None:
        return False
    _terminate(info.pid, timeout)
    deadline = time.monotonic() + timeout
    while port_busy(info.host, info.port):
        if time.monotonic() > deadline:
            raise ServerError(f"stopped pid {info.pid}, but port {info.port} is still taken")
        time.sleep(0.1)
    return True


def _terminate(pid: int, timeout: float = 20.0) -> None:
    # The server runs in its own session: signal the whole group (uvicorn workers included).
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            pass
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def use_server(env: dict[str, str]):
    """Point this process's Prefect clients at a server for the duration of the block
    (`flows.server_watch.watching` adds the watch that restarts a local server that dies).

    Environment variables alone do not reach a Prefect that was already imported, so the
    same values also go through `temporary_settings`.
    """
    import prefect.settings as ps

    updates = {getattr(ps, k): v for k, v in env.items() if getattr(ps, k, None) is not None}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with ps.temporary_settings(updates=updates):
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Connection:
    """The Prefect API a command uses, why that one, and its clients' environment."""

    api_url: str
    env: dict[str, str]
    # "setting" (prefect.api_url), "environment" (PREFECT_API_URL), "running" (the data
    # root's server, started earlier) or "started" (started now, for this data root)
    source: str
    server: ServerInfo | None = None  # the data root's server, for "running" and "started"

    def describe(self) -> list[str]:
        """What to tell the user: which server, why, and, for one started now, how to stop it."""
        ui = self.api_url.removesuffix("/api")
        if self.server is None:
            why = "the prefect.api_url setting" if self.source == "setting" else "PREFECT_API_URL"
            return [f"Prefect API {self.api_url} (from {why}; UI {ui})"]
        info = self.server
        note = [f"  ({info.port_note})"] if info.port_note else []
        if self.source == "running":
            return [f"Prefect server of {info.data_root} (pid {info.pid}, up {age(info)}): UI {ui}"]
        return [
            f"Started a Prefect server for {info.data_root} (pid {info.pid}); it keeps running "
            "after this command.",
            f"  UI:   {ui}",
            f"  stop: {info.stop_command}",
            "  every server merflow started: `merflow server list`, `merflow server stop --all`",
            f"  one server for every data root: export PREFECT_API_URL={self.api_url}",
            *note,
        ]


def connect(
    data_root: Path, api_url: str | None = None, port: int | None = None, host: str = "127.0.0.1"
) -> Connection:
    """The Prefect API for a data root and its clients' environment, starting the data root's
    server when needed.

    Order: an explicit `api_url` (the prefect.api_url setting), then PREFECT_API_URL from the
    environment, then the server running for the data root, then a new one started on `port`
    (None: the prefect.port setting; a free port if taken).
    """
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    url = api_url or os.environ.get("PREFECT_API_URL")
    source, info = ("setting" if api_url else "environment"), None
    if not url:
        source, info = "running", status(data_root)
        if info is None:  # started now, or by a command that started at the same moment
            asked = time.time()
            info = start(data_root, host=host, port=port)
            source = "started" if info.started_at >= asked else "running"
        url = info.api_url
    if not healthy(url, auth):
        raise ServerError(
            f"no Prefect API answers at {url}; start one with `merflow server start` or fix "
            f"prefect.api_url / PREFECT_API_URL"
        )
    return Connection(url, client_env(data_root, url, auth), source, info)
