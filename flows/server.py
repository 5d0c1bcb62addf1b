"""A local Prefect server under the data root: start, stop, status, and client settings.

merflow runs flows against a real server (SQLite under the data root, or PostgreSQL by URL):
Prefect's ephemeral mode drops task-run records on exit and starts a server per process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
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

    @property
    def ui_url(self) -> str:
        """The UI's address."""
        return self.api_url.removesuffix("/api")


def prefect_home(data_root: Path) -> Path:
    """PREFECT_HOME for a data root: the SQLite database, results and server logs live here."""
    return Path(data_root).resolve() / "prefect"


def _state_file(data_root: Path) -> Path:
    return prefect_home(data_root) / "server.json"


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


def healthy(api_url: str, auth_string: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the server at `api_url` answers its health check."""
    req = urllib.request.Request(f"{api_url}/health")
    if auth_string:
        req.add_header("Authorization", "Basic " + b64encode(auth_string.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
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
    path = _state_file(data_root)
    if not path.exists():
        return None
    info = ServerInfo(**json.loads(path.read_text()))
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return info


def start(
    data_root: Path,
    host: str = "127.0.0.1",
    port: int = 4200,
    auth_string: str | None = None,
    database_url: str | None = None,
    timeout: float = 90.0,
) -> ServerInfo:
    """Start `prefect server start` in the background; return once its health check answers.

    Binding beyond loopback needs an auth string (PREFECT_SERVER_API_AUTH_STRING), or the
    server would take unauthenticated flow runs from the network.
    """
    auth_string = auth_string or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    if not is_loopback(host) and not auth_string:
        raise ServerError(
            f"refusing to bind the Prefect server to {host}, which is not a loopback address, "
            f"without an auth string: set PREFECT_SERVER_API_AUTH_STRING=user:password (clients "
            f"then set PREFECT_API_AUTH_STRING to the same) or bind to 127.0.0.1"
        )
    running = status(data_root)
    if running is not None:
        if healthy(running.api_url, auth_string):
            return running
        raise ServerError(
            f"a Prefect server (pid {running.pid}) is recorded for {data_root} but does not "
            f"answer at {running.api_url}; stop it with `merflow server stop` and start again"
        )
    home = prefect_home(data_root)
    home.mkdir(parents=True, exist_ok=True)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    api_url = f"http://{url_host}:{port}/api"
    if healthy(api_url):
        raise ServerError(
            f"port {port} on {host} already serves a Prefect API that this data root did not "
            f"start; pick another port (prefect.port=N) or point prefect.api_url at it"
        )
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
        database=database.split("@")[-1],  # never record a password
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"the Prefect server exited with code {proc.returncode} during start-up; "
                f"see its log {log_path}"
            )
        if healthy(api_url, auth_string):
            with atomic_path(_state_file(data_root)) as tmp:
                tmp.write_text(json.dumps(asdict(info), indent=2))
            return info
        time.sleep(0.5)
    _terminate(proc.pid)
    raise ServerError(f"the Prefect server did not answer within {timeout:.0f} s; see {log_path}")


def stop(data_root: Path, timeout: float = 20.0) -> bool:
    """Stop the server recorded for this data root; False if none was running."""
    info = status(data_root)
    _state_file(data_root).unlink(missing_ok=True)
    if info is None:
        return False
    _terminate(info.pid, timeout)
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
    """Point this process's Prefect clients at a server for the duration of the block.

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


def connect(
    data_root: Path, api_url: str | None = None, port: int = 4200, host: str = "127.0.0.1"
) -> tuple[str, dict[str, str]]:
    """The API URL and client environment for a data root, starting its server when needed.

    Order: an explicit `api_url`, then PREFECT_API_URL from the environment, then the server
    recorded for the data root, then a new one started on `port` (a free port if taken).
    """
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        info = status(data_root)
        if info is None:
            if healthy(f"http://{host}:{port}/api"):
                port = free_port(host)
            info = start(data_root, host=host, port=port)
        url = info.api_url
    if not healthy(url, auth):
        raise ServerError(
            f"no Prefect API answers at {url}; start one with `merflow server start` or fix "
            f"prefect.api_url / PREFECT_API_URL"
        )
    return url, client_env(data_root, url, auth)
