"""A running command notices within seconds that its Prefect server is gone.

`ServerWatch` is a thread in the process that runs flows (`merflow extract`, `train`, `demo`,
`serve`; started by `watching(env)`, which also points the clients at the server). It asks the
server's health check every second. When the server stops answering:

* a local server merflow started for the command's data root (its `server.json` still names it
  and its process is gone: it died, it was not stopped) is started again on the same database,
  host and port; Prefect's clients retry a refused connection once they have connected, so the
  run goes on;
* any other (a server from PREFECT_API_URL or prefect.api_url, one stopped with
  `merflow server stop`, one that cannot start again, e.g. PostgreSQL is down) ends the command
  after `give_up_s` with one line: the server, what was kept, the command that resumes.
  It exits at once (os._exit): the events and logs Prefect still holds would otherwise be
  retried for minutes at interpreter exit. Everything the stores hold stays: they are written
  atomically and a rerun skips what is there, as after a SIGKILL of the command.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flows import server


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that runs this command again."""
    argv = list(sys.argv if argv is None else argv)
    name = Path(argv[0]).name if argv else ""
    prog = ["merflow"] if name in ("merflow", "cli.py", "__main__.py") else [argv[0]]
    return shlex.join(prog + argv[1:])


def exit_now(line: str) -> None:
    """Print `line`, end this command's child processes (not the servers it started: they run
    in sessions of their own) and exit with code 1 without Prefect's exit-time flush."""
    import psutil

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    print(line, file=sys.stderr, flush=True)
    session = os.getsid(0)
    for child in psutil.Process().children(recursive=True):
        try:
            if os.getsid(child.pid) == session:
                child.terminate()
        except (OSError, psutil.Error):
            pass
    os._exit(1)


@contextlib.contextmanager
def watching(env: dict[str, str]):
    """`server.use_server(env)` with a ServerWatch on that server for the block."""
    watcher = ServerWatch(env)  # before env is set: it tells where the URL came from
    with server.use_server(env):
        watcher.start()
        try:
            yield
        finally:
            watcher.close()


class ServerWatch(threading.Thread):
    """Watch the server `env` (a client environment, `server.client_env`) points at."""

    def __init__(
        self,
        env: dict[str, str],
        check_s: float = 1.0,
        misses: int = 2,
        give_up_s: float = 20.0,
        on_fatal: Callable[[str], None] = exit_now,
        say: Callable[[str], None] | None = None,
    ):
        super().__init__(name="merflow-server-watch", daemon=True)
        self.api_url = env["PREFECT_API_URL"]
        self.auth = env.get("PREFECT_API_AUTH_STRING")
        self.data_root = Path(env["PREFECT_HOME"]).parent
        self.check_s, self.misses, self.give_up_s = check_s, misses, give_up_s
        self.on_fatal = on_fatal
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        # PREFECT_API_URL as the command found it (the setting's URL is set in it for the flows)
        self.outer_env = dict(os.environ)
        self.restarts: list[dict] = []  # pid before and after, seconds to notice and restart
        self._done, self._closing = threading.Event(), False
        self.known = self.local_server()  # the data root's server, when the command uses it

    def local_server(self) -> server.ServerInfo | None:
        """The server merflow recorded for the data root, if it is the one this command uses."""
        info = server._read(server._state_file(self.data_root))
        return info if info is not None and info.api_url == self.api_url else None

    def close(self) -> None:
        """The command's flows are done: stop watching, unless the server does not answer now
        (then go on until it answers again, or the command has ended with the line)."""
        self._closing = True
        if server.healthy(self.api_url, self.auth, timeout=self.check_s * 3):
            self._done.set()

    def run(self) -> None:
        down_since, misses = None, 0
        while not self._done.wait(self.check_s):
            if server.healthy(self.api_url, self.auth, timeout=max(self.check_s, 2.0)):
                if self._closing:
                    return
                down_since, misses = None, 0
                continue
            misses += 1
            down_since = down_since or time.monotonic() - self.check_s
            if misses < self.misses:
                continue
            info, now_or_never = self.local_server(), False
            if info is None:
                why = "it is not a server merflow started for this data root"
                if self.known is not None:
                    why = "it was stopped (`merflow server stop`), so it is not started again"
            elif server._alive(info):
                continue  # its process runs: busy, not gone; Prefect's clients wait for it
            else:
                tried = time.monotonic()
                try:
                    self._restart(info, down_since)
                    down_since, misses = None, 0
                    continue
                except server.ServerError as e:
                    why = f"it could not be started again: {e}"
                # Try again only if another try would still end within `give_up_s`.
                now_or_never = 2 * time.monotonic() - tried - down_since >= self.give_up_s
            if now_or_never or time.monotonic() - down_since >= self.give_up_s:
                down_s = time.monotonic() - down_since
                self.on_fatal(self.fatal_line(info or self.known, why, down_s))
                return

    def _restart(self, info: server.ServerInfo, down_since: float) -> None:
        noticed = time.monotonic()
        database = server._DATABASE_URLS.get(info.home) or info.database
        if "://" not in database:  # recorded by an older merflow without its scheme
            raise server.ServerError(f"its database URL is not recorded ({database})")
        new = server.start(
            info.data_root,
            host=info.host,
            port=info.port,
            auth_string=self.auth,
            database_url=database,
            fixed_port=True,
            timeout=max(15.0, self.give_up_s),  # the command must end within ~30 s otherwise
        )
        if new.api_url != self.api_url:
            raise server.ServerError(f"it came back at {new.api_url}, not {self.api_url}")
        took = time.monotonic() - noticed
        self.known = new
        self.restarts.append(
            {"old_pid": info.pid, "pid": new.pid, "notice_s": noticed - down_since, "start_s": took}
        )
        self.say(
            f"The Prefect server of {info.data_root} (pid {info.pid}) died; started it again on "
            f"the same database and port in {took:.1f} s (pid {new.pid}); the run goes on."
        )

    def fatal_line(self, info: server.ServerInfo | None, why: str, down_s: float) -> str:
        """The one line a command ends with when its server is gone for good."""
        who = f"the server of {info.data_root}, pid {info.pid}" if info else "PREFECT_API_URL"
        if info is None and "PREFECT_API_URL" not in self.outer_env:
            who = "the prefect.api_url setting"
        return (
            f"error: the Prefect server at {self.api_url} ({who}) has not answered for "
            f"{down_s:.0f} s and {why}; kept: everything this command stored so far (a rerun "
            f"skips it); resume, once a server answers there: {resume_command()}"
        )
