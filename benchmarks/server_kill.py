"""How long a `merflow extract` takes to react when its Prefect server is killed (SIGKILL).

Runs `merflow extract` on a small demo corpus with tiny models, kills the server after the first
stored shard and times, from the kill: the command's reaction (its line saying it restarted the
server, or its error line), a server answering again on the same address, and its exit.
`--remote` points the command at a server it did not start (PREFECT_API_URL): no restart.
`--repo` runs another checkout's merflow (e.g. an older commit exported with `git archive`).

    python benchmarks/server_kill.py [--remote] [--clips 12] [--repo DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    """Run the extraction, kill its server, print the timings as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--remote", action="store_true")
    ap.add_argument("--limit", type=float, default=600.0)
    args = ap.parse_args()
    from flows import server
    from models.tiny import build_tiny_models
    from tasks.demo.corpus import make_demo_corpus

    tmp = Path(tempfile.mkdtemp(prefix="server-kill-"))
    corpus, root, models = tmp / "corpus", tmp / "root", tmp / "models"
    make_demo_corpus(corpus, n_labelled=args.clips // 2, n_unlabelled=args.clips // 2, seed=3)
    build_tiny_models(models, seed=0)
    env = {**os.environ, "PYTHONPATH": str(args.repo), "MERFLOW_STATE_DIR": str(tmp / "state")}
    env.pop("PREFECT_API_URL", None)
    other = None
    if args.remote:
        os.environ["MERFLOW_STATE_DIR"] = env["MERFLOW_STATE_DIR"]
        other = server.start(tmp / "other", port=server.free_port())
        env["PREFECT_API_URL"] = other.api_url
    cmd = [sys.executable, "-m", "flows.cli", "extract", str(corpus), "--data-root", str(root)]
    cmd += [f"prefect.port={server.free_port()}", "extract.shard_size=4"]
    cmd += [f"models.models_dir={models}", "models.build_tiny=false"]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=args.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip()))

    threading.Thread(target=read, daemon=True).start()
    while not any((root / "stores").rglob("part-*.parquet")) and proc.poll() is None:
        time.sleep(0.2)
    info = other or server._read(server._state_file(root))
    api_url = info.api_url
    os.kill(info.pid, signal.SIGKILL)
    killed = time.monotonic()
    back = None
    while proc.poll() is None and time.monotonic() - killed < args.limit:
        if back is None and server.healthy(api_url, timeout=1.0):
            back = time.monotonic() - killed
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    time.sleep(0.5)
    after = [(round(t - killed, 1), ln) for t, ln in lines if t > killed]
    # The command's reaction: it says it restarted the server, or it ends with an error line.
    said = [t for t, ln in after if "started it again" in ln or ln.startswith("error:")]
    print(
        json.dumps(
            {
                "remote": args.remote,
                "killed_after_s": round(killed - t0, 1),
                "reaction_s": said[0] if said else None,
                "server_back_s": None if back is None else round(back, 1),
                "exit_after_kill_s": round(time.monotonic() - killed, 1),
                "returncode": proc.returncode,
                "lines_after_kill": after[-8:],
            },
            indent=1,
        )
    )
    if other is not None:
        server.stop(other.data_root)
    if server.status(root) is not None:
        server.stop(root)


if __name__ == "__main__":
    main()
