"""Concurrent writers and readers: the store stays exact (one row per key) and every lock-free
read is one consistent version; two extraction runs over overlapping folders write each video
once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.failures import failures_frame
from data_contracts.store import Store
from tests.reliability.helpers import (
    REPO,
    raw_rows,
    stage_dirs,
    summary_of,
    table_folders,
    table_key,
)
from tests.reliability.store_hammer import key_rows

HAMMER = os.path.join(os.path.dirname(__file__), "store_hammer.py")
N_KEYS = 60


def test_two_writer_processes_and_a_reader_keep_the_table_exact(tmp_path):
    root = tmp_path / "root"
    store = Store(root)
    store.upsert(tables.FAILURES, failures_frame(key_rows(N_KEYS, "seed")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen(
            [sys.executable, HAMMER, str(root), name, "60", str(N_KEYS)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    # Read without a lock while both write, replace and compact: every read must be one whole
    # version of the table (all keys, once each), never a mix or a missing file.
    bad_reads, reads = [], 0
    while any(w.poll() is None for w in writers):
        try:
            keys = store.existing_keys(tables.FAILURES)
            if len(keys) != N_KEYS:
                bad_reads.append(len(keys))
        except Exception as e:
            bad_reads.append(repr(e))
        reads += 1
    for w in writers:
        _, err = w.communicate()
        assert w.returncode == 0, err[-3000:]
    assert reads > 5 and not bad_reads, (reads, bad_reads[:5])
    raw = raw_rows(store.table_dir(tables.FAILURES))
    assert len(raw) == N_KEYS and raw.video_id.is_unique
    final = store.read(tables.FAILURES)
    assert set(final.message) <= {"seed"} | {f"{w}:{r}" for w in ("w1", "w2") for r in range(60)}
    assert not list(store.table_dir(tables.FAILURES).glob(".*.tmp"))


def test_threads_of_one_process_read_consistently_while_another_writes(tmp_path):
    store = Store(tmp_path / "root", max_small_parts=2)
    rows = key_rows(N_KEYS, "seed")
    store.upsert(tables.FAILURES, failures_frame(rows))
    stop = threading.Event()
    problems: list = []

    def write() -> None:
        for r in range(80):
            window = [{**row, "message": f"t:{r}"} for row in rows[(r * 7) % N_KEYS :][:10]]
            store.upsert(tables.FAILURES, failures_frame(window))
        stop.set()

    def read() -> None:
        reader = Store(store.root)
        while not stop.is_set():
            try:
                n = len(reader.read(tables.FAILURES, columns=["message"]))
                if n != N_KEYS:
                    problems.append(n)
            except Exception as e:
                problems.append(repr(e))

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not problems, problems[:5]


def _completed_runs(api_url: str) -> int:
    """How many flow runs the server at `api_url` has recorded as completed."""
    completed = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    req = urllib.request.Request(
        f"{api_url}/flow_runs/count",
        data=json.dumps(completed).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.server
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_extraction_runs_over_overlapping_folders_write_each_video_once(
    corpus, tmp_path, extract_process, database, request, model_overrides
):
    # The Prefect server on SQLite (the session's) or on PostgreSQL (the team setup).
    on = request.getfixturevalue("postgres_server") if database == "postgresql" else None
    api_url = (on or request.getfixturevalue("prefect_server")).api_url
    completed = _completed_runs(api_url)
    # Three folders of six clips; run 1 scans A+B, run 2 scans B+C at the same time. B's ids
    # sort first in both runs, so both compute B's videos at once.
    videos = sorted((corpus / "video-labeled").glob("*.mp4"))
    videos += sorted((corpus / "video-unlabeled").glob("*.mp4"))
    ordered = sorted(videos, key=lambda p: p.stem)
    folders = {name: corpus / f"video-{name}" for name in ("a", "b", "c")}
    for folder in folders.values():
        folder.mkdir()
    groups = {"b": ordered[:6], "a": ordered[6:12], "c": ordered[12:18]}
    for name, files in groups.items():
        for f in files:
            shutil.move(f, folders[name] / f.name)
    root = tmp_path / "root"
    shard = "extract.shard_size=6"
    first = extract_process(
        corpus, root, shard, video_dirs=[folders["a"], folders["b"]], server_info=on
    )
    second = extract_process(
        corpus, root, shard, video_dirs=[folders["b"], folders["c"]], server_info=on
    )
    one, two = summary_of(first), summary_of(second)
    # Both runs are recorded by that server (and so in its database).
    assert _completed_runs(api_url) >= completed + 2
    assert one["videos"] == two["videos"] == 12
    for summary in (one, two):
        for stage, s in summary["stages"].items():
            assert s["failed"] == 0 and s["processed"] + s["skipped"] == 12, (stage, s)

    store = Store(root)
    for stage, folder in stage_dirs(root, one["feature_tables"]).items():
        raw = raw_rows(folder)
        assert len(raw) == 18 and raw.video_id.is_unique, (stage, len(raw))
    for folder in table_folders(root):
        raw = raw_rows(folder)  # a corrupt or half-written file would fail this read
        key = table_key(folder)
        assert not key or not raw.duplicated(subset=key).any(), folder
    manifest = store.read(tables.MANIFEST)
    assert len(manifest) == 18 and set(manifest.source_dir) == {str(f) for f in folders.values()}
    assert pd.read_parquet(store.table_dir(tables.MANIFEST)).video_id.is_unique
    if on is not None:
        _ablate_side_by_side(corpus, root, on, model_overrides, api_url)


def _ablate_side_by_side(corpus, root, on, model_overrides, api_url) -> None:
    """The team setup's other concurrency: `merflow ablate --parallel 2` trains its five runs
    two at a time as subflows on the PostgreSQL server, each recorded there."""
    from flows.server import client_env

    before = _completed_runs(api_url)
    env = {
        **os.environ,
        **client_env(Path(on.home).parent, on.api_url),
        "PYTHONPATH": str(REPO),
    }
    tiny = ["train.n_splits=2", "train.pretrain_epochs=1", "train.max_epochs=2"]
    cmd = [sys.executable, "-m", "flows.cli", "ablate", str(corpus), "--seeds", "1"]
    cmd += ["--parallel", "2", "--data-root", str(root), *model_overrides, *tiny]
    cmd += ["train.final_epochs=2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| **full method** |" in done.stdout
    assert _completed_runs(api_url) >= before + 6  # the ablate flow and its five train runs
