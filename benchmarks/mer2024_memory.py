"""Peak resident memory at MER2024's size: importing the three feature tables, and training on
them up to the first batches of pretraining.

MER2024: 115,595 videos, 5,030 labelled, features 768 (CLIP), 1024 (HuBERT) and 5120 (Baichuan)
float32 per video, 3.2 GB in all. This writes seeded random features of that shape as Parquet
tables (a list column per row, as a MERTools-style export), then in fresh processes:

1. `merflow import-features MODALITY bench SOURCE --without-videos` for each table: peak
   resident memory and wall time of the command (its whole process tree, sampled every 0.2 s);
2. `merflow train --profile paper` on the imported tables with a label CSV for the labelled
   5,030: RSS of the command's process tree until pretraining has logged its first batches (or
   `--train-seconds` pass), then it is stopped; the Prefect server it started is stopped too.

    python benchmarks/mer2024_memory.py --out /tmp/merflow-mer2024 [--rows 115595]
        [--labelled 5030] [--phases import,train] [--train-seconds 600]

Resident memory is reported whole and as its anonymous part (the process's own arrays): the
file-backed part of training is the run's frozen inputs mapped from disk, page cache that the
ranks of a step share and the kernel can drop. Figures depend on the machine; the features
alone are printed beside them for the ratio. The
server's own memory (a separate process, not the command's child) is left out of the train
figure. Nothing here is a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from data_contracts.labels import CLASSES, MER2024_TRAIN_COUNTS  # noqa: E402

DIMS = {"visual": 768, "acoustic": 1024, "text": 5120}
ROW_GROUP = 4096
GIB = 2**30


def write_sources(out: Path, rows: int, labelled: int, seed: int) -> dict[str, Path]:
    """Seeded random features of MER2024's shape, one Parquet table per modality (written row
    group by row group), and a label CSV for the first `labelled` ids (MER's class mix)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"sample_{i:08d}" for i in range(rows)]
    paths = {}
    for k, (m, d) in enumerate(DIMS.items()):
        path = out / f"{m}.parquet"
        paths[m] = path
        if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
            continue
        rng = np.random.default_rng(seed + k)
        schema = pa.schema([("video_id", pa.string()), ("vector", pa.list_(pa.float32()))])
        with pq.ParquetWriter(path, schema) as w:
            for start in range(0, rows, ROW_GROUP):
                n = min(ROW_GROUP, rows - start)
                x = rng.standard_normal((n, d), dtype=np.float32)
                vectors = pa.ListArray.from_arrays(
                    pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32)), pa.array(x.ravel())
                )
                w.write_table(pa.table({"video_id": ids[start : start + n], "vector": vectors}))
        print(f"wrote {path} ({path.stat().st_size / GIB:.2f} GiB)", flush=True)
    weights = np.array([MER2024_TRAIN_COUNTS[c] for c in CLASSES], dtype=float)
    classes = np.random.default_rng(seed).choice(CLASSES, size=labelled, p=weights / weights.sum())
    labels = out / "labels.csv"
    labels.write_text(
        "name,discrete\n" + "".join(f"{v},{c}\n" for v, c in zip(ids, classes, strict=False))
    )
    paths["labels"] = labels
    return paths


def _anon_file_mib(pid: int) -> tuple[float, float]:
    """A process's anonymous resident memory (its own: arrays, tensors) and its file-backed
    resident pages (mapped files such as a run's frozen inputs: page cache the kernel can drop
    and other processes share), in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (
        (int(fields["RssAnon"].split()[0]) + int(fields["RssShmem"].split()[0])) / 1024,
        int(fields["RssFile"].split()[0]) / 1024,
    )


class TreeRss:
    """Peak resident memory (MiB) of a process and its children, sampled every 0.2 s: `peak`
    (anonymous + file-backed), `peak_anon` (anonymous alone) and `peak_file`."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc, self.peak, self.samples = psutil.Process(pid), 0.0, []
        self.peak_anon = self.peak_file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        started = time.perf_counter()
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                pairs = [_anon_file_mib(p.pid) for p in procs if p.is_running()]
            except (psutil.Error, OSError, KeyError):
                pairs = []
            anon, file = sum(a for a, _ in pairs), sum(f for _, f in pairs)
            rss = anon + file
            self.peak = max(self.peak, rss)
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            self.samples.append((round(time.perf_counter() - started, 1), round(rss)))
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def merflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run_import(paths: dict[str, Path], root: Path) -> list[dict]:
    results = []
    for m in DIMS:
        started = time.perf_counter()
        cmd = merflow(
            "import-features",
            m,
            "bench",
            str(paths[m]),
            "--data-root",
            str(root),
            "--without-videos",
        )
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        rss = TreeRss(proc.pid)
        output = proc.communicate()[0].decode()
        peak = rss.stop()
        if proc.returncode:
            raise SystemExit(f"import of {m} failed:\n{output[-3000:]}")
        table = paths[m].stat().st_size / 2**20
        row = {
            "phase": "import",
            "modality": m,
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(peak),
            "peak_anon_mib": round(rss.peak_anon),
            "source_mib": round(table),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def run_train(paths: dict[str, Path], root: Path, seconds: float, rows: int) -> dict:
    tables = ", ".join(f"{m}: imported-bench" for m in DIMS)
    cmd = merflow(
        "train",
        "--data-root",
        str(root),
        "--profile",
        "paper",
        "--labels",
        str(paths["labels"]),
        f"train.feature_tables={{{tables}}}",
        "train.device=cpu",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    rss = TreeRss(proc.pid)
    first_epoch = first_batches = None
    log = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        now = round(time.perf_counter() - started, 1)
        if first_epoch is None and "pretrain" in line and "threads" in line:
            first_epoch = now
        if first_epoch is not None and " batch " in line and "rows/s" in line:
            first_batches = now
            time.sleep(5)  # a few more batches at full size
            break
        if now > seconds:
            break
    peak = rss.stop()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run(merflow("server", "stop", "--data-root", str(root)), cwd=ROOT, check=False)
    features = rows * sum(DIMS.values()) * 4 / 2**20
    row = {
        "phase": "train",
        "seconds_to_pretraining": first_epoch,
        "seconds_to_first_batches": first_batches,
        "peak_rss_mib": round(peak),
        "peak_anon_mib": round(rss.peak_anon),
        "peak_file_mib": round(rss.peak_file),
        "features_mib": round(features),
        "anon_ratio": round(rss.peak_anon / features, 2),
    }
    if first_batches is None:
        row["log_tail"] = "".join(log[-20:])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/merflow-mer2024"))
    ap.add_argument("--rows", type=int, default=115_595)
    ap.add_argument("--labelled", type=int, default=5_030)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="import,train")
    ap.add_argument("--train-seconds", type=float, default=600)
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    paths = write_sources(args.out / "sources", args.rows, args.labelled, args.seed)
    root = args.out / "root"
    results = []
    if "import" in phases:
        shutil.rmtree(root, ignore_errors=True)
        results += run_import(paths, root)
    if "train" in phases:
        shutil.rmtree(root / "runs", ignore_errors=True)
        results.append(run_train(paths, root, args.train_seconds, args.rows))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
