"""Soak benchmark: extraction over a large demo corpus with tiny models, against a real server.

Prints what a long run must keep flat or proportional: the process's memory sampled over time
(no leak per shard), the Prefect database size and task-run count (per shard, not per video),
the transient faults injected and retried, and the rows lost (must be 0). A second run over
the same corpus shows what a rerun costs (every shard cached).

    python benchmarks/soak.py --out /tmp/merflow-soak --labelled 300 --unlabelled 700

Generating 1000 clips takes ~2 min on 2 cores; the corpus is reused when it is already there.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psutil

from data_contracts import tables
from data_contracts.store import Store
from flows import server

MB = 1 << 20


class RssSampler(threading.Thread):
    """Samples this process's resident memory every `every` seconds until stopped."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()
        self._proc = psutil.Process()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        """Sample until stop()."""
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter() - self._t0, self._proc.memory_info().rss))
            self._stop_event.wait(self.every)

    def stop(self) -> list[tuple[float, int]]:
        """Stop sampling; the (seconds, bytes) samples."""
        self._stop_event.set()
        self.join()
        return self.samples


class FaultInjector:
    """Makes the audio stage's first read of every `every`-th video raise a transient OSError.

    One faulty video per shard at most (when `every` >= the shard size), so each faulty shard
    needs exactly one of its two retries.
    """

    def __init__(self, every: int):
        import tasks.media

        self.every = every
        self.injected: list[str] = []
        self.calls: Counter = Counter()
        self._module = tasks.media
        self._real = tasks.media.audio_input
        self._lock = threading.Lock()
        self._targets: set[str] = set()

    def arm(self, video_ids: list[str]) -> None:
        """Choose the faulty videos among the sorted ids and patch the audio stage."""
        chosen = sorted(video_ids)[self.every // 2 :: self.every] if self.every else []
        self._targets = set(chosen)
        self._module.audio_input = self._extract

    def disarm(self) -> None:
        """Restore the real audio stage."""
        self._module.audio_input = self._real

    def _extract(self, video):
        stem = Path(video).stem
        with self._lock:
            self.calls[stem] += 1
            fail = stem in self._targets and self.calls[stem] == 1
            if fail:
                self.injected.append(stem)
        if fail:
            raise OSError(errno.EIO, "injected transient I/O fault (soak)", str(video))
        return self._real(video)


def db_bytes(home: Path) -> int:
    """Size of the server's SQLite database with its write-ahead log."""
    return sum(p.stat().st_size for p in home.glob("prefect.db*") if p.is_file())


def count_task_runs(api_url: str, flow_run_id: str | None = None) -> int:
    """Task runs on the server (of one flow run, if given), counted by the API."""
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}} if flow_run_id else {}
    req = urllib.request.Request(
        f"{api_url}/task_runs/count",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(json.loads(r.read()))


def rss_slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares RSS slope over the second half of the run (after warm-up), MB/min."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return float("nan")
    t = np.array([s[0] for s in half]) / 60.0
    y = np.array([s[1] for s in half]) / MB
    return float(np.polyfit(t, y, 1)[0])


def rows_lost(store: Store, summary: dict, videos: set[str]) -> dict[str, int]:
    """Per stage: videos with neither an output row nor a failure row (must be 0)."""
    failures = store.read(tables.FAILURES)
    names = {"audio": "audio", "faces": "faces", "transcribe": "transcripts"}
    names |= summary["feature_tables"]
    lost = {}
    for stage, name in names.items():
        rows = store.read(tables.TableRef(name, _contract(store, name, stage)))
        failed = set(failures[failures.stage == stage].video_id)
        lost[stage] = len(videos - set(rows.video_id) - failed)
    return lost


def _contract(store: Store, name: str, stage: str):
    fixed = {t.name: t.contract for t in tables.FIXED_TABLES}
    if name in fixed:
        return fixed[name]
    modality = name.split("/")[1]
    import pyarrow.parquet as pq

    part = next((store.stores / name).glob("part-*.parquet"))
    dim = pq.read_schema(part).field("embedding").type.list_size
    return tables.features(modality, name.rsplit("/", 1)[-1], dim).contract


def run_once(args, corpus: Path, data_root: Path, api_url: str, injector: FaultInjector) -> dict:
    """One extraction run with memory sampling; its figures."""
    from flows.extract import extract_flow

    sampler = RssSampler(args.sample_every)
    sampler.start()
    started = time.perf_counter()
    state = extract_flow(
        str(corpus),
        profile="demo",
        data_root=str(data_root),
        overrides=[
            f"models.models_dir={args.out / 'models'}",
            "models.build_tiny=false",
            f"extract.shard_size={args.shard_size}",
        ],
        return_state=True,
    )
    seconds = time.perf_counter() - started
    samples = sampler.stop()
    summary = state.result()
    rss = [s[1] for s in samples]
    quarters = [rss[min(len(rss) - 1, round(q * (len(rss) - 1)))] // MB for q in (0.25, 0.5, 0.75)]
    return {
        "seconds": round(seconds, 1),
        "videos": summary["videos"],
        "shards": summary["shards"],
        "task_runs": count_task_runs(api_url, str(state.state_details.flow_run_id)),
        "rss_start_mb": round(rss[0] / MB),
        "rss_peak_mb": round(max(rss) / MB),
        "rss_end_mb": round(rss[-1] / MB),
        "rss_at_25_50_75pct_time_mb": quarters,
        "rss_slope_mb_per_min_2nd_half": round(rss_slope_mb_per_min(samples), 2),
        "processed": {s: v["processed"] for s, v in summary["stages"].items()},
        "cached_shards": {s: v["cached_shards"] for s, v in summary["stages"].items()},
        "failed": {s: v["failed"] for s, v in summary["stages"].items()},
        "summary": summary,
        "samples": [(round(t, 1), b // MB) for t, b in samples[:: max(1, len(samples) // 200)]],
    }


def main() -> None:
    """Build the corpus and models, start a server, run twice, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/merflow-soak"))
    ap.add_argument("--labelled", type=int, default=300)
    ap.add_argument("--unlabelled", type=int, default=700)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--fault-every", type=int, default=200, help="0: inject no faults")
    ap.add_argument("--sample-every", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    args.out = args.out.resolve()
    if 0 < args.fault_every < args.shard_size:
        ap.error("--fault-every must be >= --shard-size (one fault per shard at most)")

    from models.tiny import build_tiny_models
    from tasks.demo.corpus import make_demo_corpus

    corpus = args.out / "corpus"
    t = time.perf_counter()
    if not (corpus / "label-disdim.csv").exists():
        make_demo_corpus(corpus, n_labelled=args.labelled, n_unlabelled=args.unlabelled, seed=0)
    corpus_s = time.perf_counter() - t
    build_tiny_models(args.out / "models", seed=0)
    data_root = args.out / "data"
    prefect_root = args.out / "prefect-root"
    server.stop(prefect_root)
    for old in (data_root, prefect_root):  # every soak starts from empty stores and database
        shutil.rmtree(old, ignore_errors=True)
    info = server.start(prefect_root, port=server.free_port())
    home = Path(info.home)
    figures: dict = {"corpus_seconds": round(corpus_s, 1)}
    injector = FaultInjector(args.fault_every)
    try:
        with server.use_server(server.client_env(prefect_root, info.api_url)):
            pools = ("video-labeled", "video-unlabeled")
            ids = [p.stem for d in pools for p in (corpus / d).glob("*.mp4")]
            injector.arm(ids)
            db0 = db_bytes(home)
            first = run_once(args, corpus, data_root, info.api_url, injector)
            db1 = db_bytes(home)
            injector.disarm()
            second = run_once(args, corpus, data_root, info.api_url, injector)
            db2 = db_bytes(home)
    finally:
        server.stop(prefect_root)
    store = Store(data_root)
    lost = rows_lost(store, first["summary"], set(ids))
    retried = {v: n for v, n in injector.calls.items() if n > 1}
    figures |= {
        "videos": first["videos"],
        "shards": first["shards"],
        "first_run": {k: v for k, v in first.items() if k not in ("summary", "samples")},
        "rerun": {k: v for k, v in second.items() if k not in ("summary", "samples")},
        "db_mb": {"before": db0 / MB, "after_first": db1 / MB, "after_rerun": db2 / MB},
        "db_kb_per_shard_first_run": round((db1 - db0) / 1024 / max(1, first["shards"]), 1),
        "task_runs_per_shard": round(first["task_runs"] / max(1, first["shards"]), 2),
        "faults_injected": len(injector.injected),
        "faulty_videos_recomputed": sum(1 for v in injector.injected if retried.get(v) == 2),
        "videos_computed_twice_besides_faults": sum(
            1 for v, n in injector.calls.items() if n > 1 and v not in injector.injected
        ),
        "rows_lost": lost,
    }
    print(json.dumps(figures, indent=2, default=float))
    if args.json:
        figures["rss_samples_first_run_s_mb"] = first["samples"]
        args.json.write_text(json.dumps(figures, indent=2, default=float))


if __name__ == "__main__":
    main()
