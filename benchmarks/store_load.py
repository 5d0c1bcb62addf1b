"""Time to load the feature stores into training tensors, and peak memory.

Writes N synthetic videos of the real dimensions (visual 768, acoustic 1024, text 5120) into a
fresh data root through the Store (in shards, as extraction does), then times
`tasks.training.data.load_training_data` (join on video id, masks, standardisation).

Then compares what one torchrun rank pays to get its inputs, each in a fresh process: reading
the stores itself, or mapping the inputs the train flow froze in the run folder
(tasks/training/inputs.py). "own" is the rank's anonymous memory (RssAnon), which no other rank
can share; "mapped" is file pages (RssFile), one copy in the page cache for every rank.

    python benchmarks/store_load.py --rows 20000 [--out /tmp/merflow-store-load]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts import tables
from data_contracts.labels import CLASSES
from data_contracts.store import Store
from models.featureset import FeatureSet
from tasks.training.data import load_training_data

DIMS = {"visual": 768, "acoustic": 1024, "text": 5120}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory() -> dict[str, float]:
    """This process's resident memory in MiB: anonymous (its own) and file-backed (shareable)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def _rank(out: Path, how: str) -> None:
    """One rank's inputs (`how`: stores or inputs) and pretraining's all-rows set, touched once
    as training does; prints JSON."""
    from tasks.training.inputs import load_inputs

    started = time.perf_counter()
    if how == "nothing":  # the imports alone: what every rank pays before any data
        print(json.dumps({"seconds": 0.0, **_memory()}))
        return
    if how == "stores":
        refs = {m: tables.features(m, f"synthetic-{m}", d) for m, d in DIMS.items()}
        data = load_training_data(Store(out), refs)
    else:
        data, _ = load_inputs(out / "run" / "inputs", "bench")
    ready = time.perf_counter() - started
    # What pretraining holds: every row in one set (a concatenated copy unless mapped).
    everything = data.everything or FeatureSet.concat([data.labelled, data.unlabelled])
    total = sum(float(everything.features[m].sum()) for m in DIMS)
    # (No peak here: a child's ru_maxrss starts from its parent's at fork.)
    print(json.dumps({"seconds": ready, **_memory(), "checksum": total}))


def _ranks(out: Path) -> None:
    for how in ("nothing", "stores", "inputs"):
        cmd = [sys.executable, __file__, "--rank", how, "--out", str(out)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"one rank, data from {how}: ready in {r['seconds']:.2f} s, "
            f"own {r['RssAnon']:.0f} MiB, mapped {r['RssFile']:.0f} MiB"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", choices=["nothing", "stores", "inputs"], help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--shard", type=int, default=2000, help="rows per write, like a shard")
    ap.add_argument("--labelled", type=float, default=0.05, help="fraction with a label")
    ap.add_argument("--out", type=Path, default=Path("/tmp/merflow-store-load"))
    args = ap.parse_args()
    if args.rank:
        return _rank(args.out, args.rank)
    shutil.rmtree(args.out, ignore_errors=True)
    store = Store(args.out)
    rng = np.random.default_rng(0)
    ids = [f"sample_{i:08d}" for i in range(args.rows)]
    shas = [f"{i:064x}" for i in range(args.rows)]
    now = datetime.now(UTC)
    manifest = pd.DataFrame(
        {
            "video_id": ids,
            "sha256": shas,
            "path": [f"/videos/{i}.mp4" for i in ids],
            "source_dir": "/videos",
            "pool": "unlabeled",
            "size": 1,
            "mtime_ns": 0,
            "duration": 3.0,
            "fps": 25.0,
            "n_frames": 75,
            "width": 256,
            "height": 256,
            "has_video": True,
            "has_audio": True,
            "audio_sample_rate": 16000,
            "probe_error": None,
            "scanned_at": now,
        }
    )
    store.upsert(tables.MANIFEST, manifest)
    n_lab = int(args.rows * args.labelled)
    store.upsert(
        tables.LABELS,
        pd.DataFrame({"video_id": ids[:n_lab], "label": rng.choice(CLASSES, n_lab), "source": "x"}),
    )
    refs = {}
    started = time.perf_counter()
    for modality, dim in DIMS.items():
        ref = tables.features(modality, f"synthetic-{modality}", dim)
        refs[modality] = ref
        for lo in range(0, args.rows, args.shard):
            hi = min(args.rows, lo + args.shard)
            store.upsert(
                ref,
                pd.DataFrame(
                    {
                        "video_id": ids[lo:hi],
                        "sha256": shas[lo:hi],
                        "extractor_id": f"synthetic-{modality}",
                        "embedding": list(rng.normal(size=(hi - lo, dim)).astype(np.float32)),
                        "n_items": 1,
                        "provenance": None,
                        "created_at": now,
                    }
                ),
            )
    write_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in (args.out / "stores").rglob("*.parquet")) / 2**20
    before = _peak_mib()
    started = time.perf_counter()
    data = load_training_data(store, refs)
    load_s = time.perf_counter() - started
    print(f"rows {args.rows} ({len(data.labelled)} labelled), store {size:.0f} MiB on disk")
    print(f"write through the Store in shards of {args.shard}: {write_s:.1f} s")
    print(f"load into tensors (join, masks, z-score): {load_s:.2f} s")
    print(f"peak RSS: {_peak_mib():.0f} MiB (before load {before:.0f} MiB)")
    from tasks.training.data import with_folds
    from tasks.training.inputs import save_inputs

    started = time.perf_counter()
    data = with_folds(data, 5, 0)
    save_inputs(args.out / "run" / "inputs", data, key="bench", fingerprint="bench")
    print(f"freeze the run's inputs (folds assigned): {time.perf_counter() - started:.2f} s")
    del data
    _ranks(args.out)


if __name__ == "__main__":
    main()
