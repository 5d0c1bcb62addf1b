"""Store on object storage vs a local disk: upserts in shards, then the reads a stage makes.

Runs the same work against a local folder and against moto's S3 server on loopback (no
network latency: real S3 adds ~10-50 ms per request; a store call makes one listing, one GET
per part file, fetched concurrently, and one PUT per write), and prints seconds per operation
and the request count of one S3 run. "S3 fresh": every part younger than compact_grace_s, so
none is merged yet; "S3 merged": parts merged as they pile up (compact_grace_s=0), as they
are once a long extraction's parts are older than the grace time.

Then what one extraction shard pays to learn which of its videos are done and to read their
vectors: a shard of `--shard-ids` video ids reading the whole table and keeping its own rows,
against a read with `where={"video_id": ids}` (pushed down to the Parquet reads), in seconds
and in rows out of the part reads.

    python benchmarks/store_objectstore.py --rows 4000 --shard 128 --dim 768
    python benchmarks/store_objectstore.py --rows 20000 --shard 1000 --dim 768 --shard-ids 64
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd


def rows(ids: list[str], dim: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "video_id": ids,
            "sha256": [f"{i:0>64}" for i in ids],
            "extractor_id": "bench-00000000",
            "embedding": list(rng.normal(size=(len(ids), dim)).astype(np.float32)),
            "n_items": 1,
            "provenance": "{}",
            "created_at": datetime.now(UTC),
        }
    )


def count_rows_read(store) -> list[int]:
    """Count the rows the store's backend reads out of part files from now on."""
    backend = store.backend
    real = backend.read_parts
    seen = [0]

    def read_parts(*args, **kwargs):
        for part, schema, t in real(*args, **kwargs):
            seen[0] += t.num_rows
            yield part, schema, t

    backend.read_parts = read_parts
    return seen


def shard_reads(store, table, ids: list[str], out: dict, rows_read: dict) -> None:
    """A shard's reads of its own rows, without and with `where`: seconds and rows read."""
    seen = count_rows_read(store)
    n = len(ids)
    for how, where in (("all rows", None), ("where", {"video_id": ids})):
        mine = set(ids)
        seen[0] = 0
        t0 = time.perf_counter()
        keys = {k for k in store.existing_keys(table, where=where) if k[0] in mine}
        out[f"shard of {n}: existing_keys, {how}"] = time.perf_counter() - t0
        rows_read[f"shard of {n}: existing_keys, {how}"] = seen[0]
        seen[0] = 0
        t0 = time.perf_counter()
        got, mat = store.read_vectors(table, where=where)
        mat = mat[got.video_id.isin(mine).to_numpy()]
        out[f"shard of {n}: read_vectors, {how}"] = time.perf_counter() - t0
        rows_read[f"shard of {n}: read_vectors, {how}"] = seen[0]
        assert len(keys) == n and mat.shape[0] == n, (len(keys), mat.shape)


def run(
    root: str,
    n: int,
    shard: int,
    dim: int,
    cache: Path,
    grace: float = 300.0,
    shard_ids: int = 64,
    rows_read: dict | None = None,
) -> dict:
    from data_contracts import tables
    from data_contracts.store import Store

    table = tables.features("visual", "bench-00000000", dim)
    store = Store(root, cache_dir=cache, compact_grace_s=grace)
    ids = [f"sample_{i:08d}" for i in range(n)]
    out = {}
    t0 = time.perf_counter()
    for k in range(0, n, shard):
        store.upsert(table, rows(ids[k : k + shard], dim, k))
    out["upsert all shards"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.upsert(table, rows(ids[:shard], dim, 0))  # a rerun of the first shard: all unchanged
    out["idempotent re-upsert of one shard"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = store.existing_keys(table)
    out["existing_keys"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, mat = store.read_vectors(table)
    out["read_vectors"] = time.perf_counter() - t0
    assert len(keys) == n and mat.shape == (n, dim)
    out["parts"] = len(store._parts(table))
    mid = n // 2  # a shard in the middle of the table, as most shards are
    shard_reads(
        store, table, ids[mid : mid + shard_ids], out, {} if rows_read is None else rows_read
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--shard", type=int, default=128)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shard-ids", type=int, default=64, help="video ids of one reading shard")
    args = ap.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    requests = [0]

    def count(record: logging.LogRecord) -> bool:  # werkzeug logs one line per request
        requests[0] += 1
        return False

    wz = logging.getLogger("werkzeug")
    wz.setLevel(logging.INFO)
    wz.addFilter(count)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    read = {"local": {}, "fresh": {}, "merged": {}}
    common = {"n": args.rows, "shard": args.shard, "dim": args.dim, "shard_ids": args.shard_ids}
    with tempfile.TemporaryDirectory() as tmp:
        local = run(
            str(Path(tmp) / "root"), cache=Path(tmp) / "c1", rows_read=read["local"], **common
        )
        requests[0] = 0
        remote = run("s3://bench/fresh", cache=Path(tmp) / "c2", rows_read=read["fresh"], **common)
        fresh_requests = requests[0]
        # Parts older than compact_grace_s are merged as on a local disk; a fresh store keeps
        # its young parts apart (another machine may still be uploading one before them).
        merged = run(
            "s3://bench/old", cache=Path(tmp) / "c3", grace=0.0, rows_read=read["merged"], **common
        )
    server.stop()
    print(f"{args.rows} rows x {args.dim} float32 in shards of {args.shard}")
    print(f"{'operation':<36} {'local s':>9} {'S3 fresh s':>11} {'S3 merged s':>12}")
    for k in local:
        print(f"{k:<36} {local[k]:>9.3f} {remote[k]:>11.3f} {merged[k]:>12.3f}")
    print(f"HTTP requests to the S3 server in the 'fresh' run: {fresh_requests}")
    print(f"{'rows out of the part reads':<36} {'local':>9} {'S3 fresh':>11} {'S3 merged':>12}")
    for k in read["local"]:
        print(f"{k:<36} {read['local'][k]:>9} {read['fresh'][k]:>11} {read['merged'][k]:>12}")


if __name__ == "__main__":
    main()
