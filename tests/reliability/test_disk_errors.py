"""Disk full and read-only data roots: a StoreWriteError naming the path and the way out, and
stores that stay readable and unchanged."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store, StoreWriteError
from flows.extract import extract_flow
from tests.reliability.helpers import REPO, raw_rows, table_folders


def rows(ids: list[str], message: str = "x") -> pd.DataFrame:
    return failures_frame([failure_row(v, "0" * 64, "audio", message) for v in ids])


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("code", "transient", "needles"),
    [
        (errno.ENOSPC, True, ("no space left", "free space", "data_root")),
        (errno.EDQUOT, True, ("no space left", "free space")),
        (errno.EROFS, False, ("not writable", "read-write", "data_root")),
        (errno.EACCES, False, ("not writable", "permission", "data_root")),
    ],
)
def test_refused_write_is_a_clear_error_and_leaves_the_table_unchanged(
    tmp_path, monkeypatch, code, transient, needles
):
    store = Store(tmp_path / "root")
    store.upsert(tables.FAILURES, rows(["a", "b"]))
    folder = store.table_dir(tables.FAILURES)
    before, files = store.read(tables.FAILURES), listing(folder)

    def refuse(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")  # a disk that fills up mid-write
        raise OSError(code, os.strerror(code), str(where))

    monkeypatch.setattr("data_contracts.store.pq.write_table", refuse)
    with pytest.raises(StoreWriteError) as info:
        store.upsert(tables.FAILURES, rows(["a", "c"], message="new"))
    err = info.value
    assert err.errno == code and err.transient is transient
    assert isinstance(err, OSError)  # code that handles I/O errors still handles it
    message = str(err).lower()
    assert "'failures'" in message and str(folder) in str(err), message
    for needle in needles:
        assert needle in message, (needle, message)
    monkeypatch.undo()
    assert listing(folder) == files  # no temporary file left, no part touched
    pd.testing.assert_frame_equal(store.read(tables.FAILURES), before)
    assert len(pd.read_parquet(folder)) == 2


def test_full_disk_during_compaction_loses_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path / "root", max_small_parts=2)
    for i in range(2):
        store.upsert(tables.FAILURES, rows([f"v{i}"]))
    real = Store._merge

    def full(self, table, parts):
        monkeypatch.setattr(
            "data_contracts.store.pq.write_table",
            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")),
        )
        return real(self, table, parts)

    monkeypatch.setattr(Store, "_merge", full)
    with pytest.raises(StoreWriteError, match="no space left"):
        store.upsert(tables.FAILURES, rows(["v2"]))  # the part lands, the merge does not
    monkeypatch.undo()
    assert sorted(store.read(tables.FAILURES).video_id) == ["v0", "v1", "v2"]
    assert not list(store.table_dir(tables.FAILURES).glob(".*.tmp"))


READ_ONLY_SCRIPT = """
import sys
from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store, StoreWriteError
store = Store(sys.argv[1])
assert sorted(store.read(tables.FAILURES).video_id) == ["a", "b"]
try:
    store.upsert(tables.FAILURES, failures_frame([failure_row("c", "0" * 64, "audio", "x")]))
except StoreWriteError as e:
    print("REFUSED", e.transient, e)
else:
    print("WROTE")
"""


def test_really_read_only_data_root_refuses_writes_and_stays_readable():
    # chmod stops no write by root, so as root the writer runs as the user nobody instead.
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    if os.geteuid() == 0:
        # The unprivileged user must be able to run this interpreter and read the project
        # (a checkout under a 0700 folder, as mktemp makes, is out of its reach).
        probe = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
             "import data_contracts.store"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot import the project from {REPO}: {probe.stderr[-200:]}")
    base = Path(tempfile.mkdtemp(prefix="merflow-ro-", dir="/tmp"))
    try:
        store = Store(base / "root")
        store.upsert(tables.FAILURES, rows(["a", "b"]))
        for d in [base, *(p for p in base.rglob("*") if p.is_dir())]:
            d.chmod(0o755 if os.geteuid() == 0 else 0o555)
        cmd = [sys.executable, "-c", READ_ONLY_SCRIPT, str(store.root)]
        if os.geteuid() == 0:
            cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("REFUSED False"), proc.stdout
        assert "not writable" in proc.stdout and str(store.root) in proc.stdout
        assert sorted(store.read(tables.FAILURES).video_id) == ["a", "b"]
    finally:
        for d in [base, *(p for p in base.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.server
def test_read_only_store_stops_the_flow_with_the_way_out(
    prefect_server, corpus, tmp_path, model_overrides, monkeypatch
):
    import pyarrow.parquet as pq

    real = pq.write_table

    def read_only_features(table, where, **kwargs):
        if "/features/visual/" in str(where):
            raise OSError(errno.EROFS, "Read-only file system", str(where))
        return real(table, where, **kwargs)

    monkeypatch.setattr("data_contracts.store.pq.write_table", read_only_features)
    root = tmp_path / "root"
    with pytest.raises(StoreWriteError, match="not writable") as info:
        extract_flow(
            str(corpus),
            profile="demo",
            data_root=str(root),
            overrides=[*model_overrides, "extract.shard_size=6"],
            video_dirs=[str(corpus / "video-unlabeled")],
        )
    assert "read-write" in str(info.value) and "features/visual" in str(info.value)
    monkeypatch.undo()
    store = Store(root)
    videos = set(store.read(tables.MANIFEST).video_id)
    known = videos | set(store.read(tables.LABELS).video_id)  # labels: the whole CSV
    assert len(videos) == 6
    # Every store stays readable (each part file whole) and nothing is half-written.
    for folder in table_folders(root):
        rows = raw_rows(folder)
        assert not list(folder.glob(".part-*.tmp")), folder
        assert set(rows.video_id) <= known and rows.video_id.is_unique, folder
    # The stages before the refused write committed every video; the refused one none.
    for table in (tables.AUDIO, tables.FACES):
        assert set(store.read(table).video_id) == videos, table.name
    assert not raw_rows(root / "stores" / "features" / "visual").shape[0]
