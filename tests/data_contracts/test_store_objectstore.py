"""The store on object storage: the same contract as on a local disk (round trips, idempotent
upserts, replace, delete, compaction, consistent reads, concurrent writers) against moto's S3
server on loopback, the core cases on fsspec's memory:// too; clear errors for a missing bucket,
refused credentials and an unreachable endpoint; artifacts uploaded and fetched back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store, StoreAccessError, StoreWriteError
from tasks.engine.shard import retry_if_transient
from tests.data_contracts.objectstore import moto_s3, new_bucket
from tests.data_contracts.objectstore_writer import window

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EXT = "tiny-clip-00000000"
TABLE = tables.features("visual", EXT, 8)
REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("objectstore_writer.py")


def feature_rows(ids, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "video_id": ids,
            "sha256": [f"{i:0>64}" for i in ids],
            "extractor_id": EXT,
            "embedding": list(rng.normal(size=(len(ids), 8)).astype(np.float32)),
            "n_items": 3,
            "provenance": '{"model": "tiny"}',
            "created_at": NOW,
        }
    )


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server for the module; yields its endpoint (the environment points at it)."""
    with moto_s3(tmp_path_factory.mktemp("s3-scratch")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_root(s3):
    return f"s3://{new_bucket(s3)}/merflow"


@pytest.fixture(params=["s3", "memory"])
def url(request, s3):
    """A fresh data root URL on moto's S3, or on fsspec's in-process memory filesystem."""
    if request.param == "s3":
        return f"s3://{new_bucket(s3)}/merflow"
    return f"memory://merflow-{uuid.uuid4().hex[:8]}/root"


def store_at(url, tmp_path, **kw):
    return Store(url, cache_dir=tmp_path / "local", **kw)


def objects(url, folder):
    fs, path = fsspec.core.url_to_fs(f"{url}/{folder}")
    fs.invalidate_cache()
    return sorted(fs.glob(f"{path}/part-*.parquet"))


def raw_keys(url, table):
    """Every (video_id) of every part object, duplicates included (no merflow dedup)."""
    fs, _ = fsspec.core.url_to_fs(url)
    ids = []
    for part in objects(url, f"stores/{table.name}"):
        with fs.open(part, "rb") as f:
            ids += pd.read_parquet(f, columns=["video_id"]).video_id.tolist()
    return ids


# -- the store's contract, on S3 and memory:// ----------------------------------------------------
def test_round_trip_reads_like_a_local_store(url, tmp_path):
    store = store_at(url, tmp_path)
    assert store.is_remote and not store.exists(TABLE) and len(store.read(TABLE)) == 0
    df = feature_rows(["a", "b", "c"])
    assert store.upsert(TABLE, df).inserted == 3
    back = store.read(TABLE)
    assert list(back.video_id) == ["a", "b", "c"]
    np.testing.assert_array_equal(np.stack(back.embedding), np.stack(df.embedding))
    keys, mat = store.read_vectors(TABLE)
    assert mat.shape == (3, 8) and mat.dtype == np.float32 and list(keys.video_id) == list("abc")
    assert store.read_arrow(TABLE, columns=["video_id"]).column_names == ["video_id"]
    assert store.existing_keys(TABLE) == {(v, f"{v:0>64}", EXT) for v in "abc"}
    # Plain Parquet at the documented place: pandas reads the prefix without merflow.
    assert len(objects(url, f"stores/{TABLE.name}")) == 1
    plain = pd.read_parquet(f"{url}/stores/{TABLE.name}")
    assert sorted(plain.video_id) == ["a", "b", "c"]
    assert store.has_stores() and store.list_tables("features", 2) == [TABLE.name]
    meta = store.part_schemas(TABLE.name)[0].metadata
    assert meta[b"merflow.contract"] == b"features_visual"


def test_upsert_is_idempotent_and_replaces_by_key(url, tmp_path):
    store = store_at(url, tmp_path)
    df = feature_rows(["a", "b", "c"])
    store.upsert(TABLE, df)
    again = store.upsert(TABLE, df)
    assert (again.written, again.unchanged) == (0, 3)
    assert len(objects(url, f"stores/{TABLE.name}")) == 1  # nothing new written
    changed = feature_rows(["b", "d"], seed=1)
    report = store.upsert(TABLE, changed)
    assert (report.inserted, report.replaced, report.unchanged) == (1, 1, 0)
    back = store.read(TABLE).set_index("video_id")
    assert list(back.index) == ["a", "b", "c", "d"] or sorted(back.index) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(back.loc["b", "embedding"], changed.embedding[0])
    np.testing.assert_array_equal(back.loc["a", "embedding"], df.embedding[0])
    # The old part was rewritten without "b" (under a new name, same sequence): no duplicates.
    assert sorted(raw_keys(url, TABLE)) == ["a", "b", "c", "d"]


def test_delete_removes_rows_by_key(url, tmp_path):
    store = store_at(url, tmp_path)
    store.upsert(TABLE, feature_rows(["a", "b"]))
    store.upsert(TABLE, feature_rows(["c"], seed=2))
    assert store.delete(TABLE, {("a", f"{'a':0>64}", EXT), ("zz", "0", EXT)}) == 1
    assert sorted(store.read(TABLE).video_id) == ["b", "c"]
    assert store.delete(TABLE, {("c", f"{'c':0>64}", EXT)}) == 1
    assert list(store.read(TABLE).video_id) == ["b"] and raw_keys(url, TABLE) == ["b"]


def test_small_parts_are_merged_once_old_enough(url, tmp_path):
    store = store_at(url, tmp_path, max_small_parts=3, compact_grace_s=0)
    for i in range(6):
        store.upsert(TABLE, feature_rows([f"v{i}"], seed=i))
    assert len(objects(url, f"stores/{TABLE.name}")) <= 4  # merged when a 4th small part came
    assert sorted(store.read(TABLE).video_id) == [f"v{i}" for i in range(6)]
    assert store.compact(TABLE) > 1
    assert len(objects(url, f"stores/{TABLE.name}")) == 1
    assert sorted(raw_keys(url, TABLE)) == [f"v{i}" for i in range(6)]
    # Parts younger than the grace time may still be uploading elsewhere: never merged.
    young = store_at(url, tmp_path, max_small_parts=1)
    other = tables.features("visual", "other-00000000", 8)
    for i in range(3):
        young.upsert(other, feature_rows([f"w{i}"], seed=i).assign(extractor_id="other-00000000"))
    assert len(objects(url, f"stores/{other.name}")) == 3 and young.compact(other) == 0


def test_merge_never_shadows_a_newer_unmerged_version(tmp_path):
    """Another machine's part, newer than one merged part and older than another, keeps its
    key: the merged part takes the newest merged sequence, so the row it would shadow is left
    out of it."""
    store = store_at(f"memory://merflow-{uuid.uuid4().hex[:8]}/root", tmp_path)
    t = TABLE.contract.to_arrow
    old = store._write_part(TABLE, t(feature_rows(["k", "a"], seed=1)), seq=100)
    store._write_part(TABLE, t(feature_rows(["k"], seed=2)), seq=200)  # newer k, elsewhere
    young = store._write_part(TABLE, t(feature_rows(["b"], seed=3)), seq=300)
    newer_k = store.read(TABLE).set_index("video_id").loc["k", "embedding"]
    np.testing.assert_array_equal(newer_k, feature_rows(["k"], seed=2).embedding[0])
    assert store._merge(TABLE, [old, young])
    after = store.read(TABLE).set_index("video_id")
    assert sorted(after.index) == ["a", "b", "k"]
    np.testing.assert_array_equal(after.loc["k", "embedding"], newer_k)


def test_text_files_beside_the_stores(url, tmp_path):
    store = store_at(url, tmp_path)
    assert store.read_text("runs/extract-settings.yaml") is None and not store.has_stores()
    where = store.write_text("reports/check.md", "# ok\n")
    assert where == f"{url}/reports/check.md" and store.read_text("reports/check.md") == "# ok\n"


def test_artifacts_upload_and_come_back_through_a_local_cache(url, tmp_path):
    writer = Store(url, cache_dir=tmp_path / "machine-a")
    out = writer.artifact_path("audio", "ffmpeg-16k-mono-s16", "vid", "f" * 64, ".wav")
    assert out.is_relative_to(tmp_path / "machine-a")  # written locally first
    out.write_bytes(b"RIFF-bytes")
    rel = writer.publish_artifact(out)
    assert rel == "artifacts/audio/ffmpeg-16k-mono-s16/vid-ffffffffffff.wav"
    fs, path = fsspec.core.url_to_fs(f"{url}/{rel}")
    assert fs.cat_file(path) == b"RIFF-bytes"
    reader = Store(url, cache_dir=tmp_path / "machine-b")  # another machine: empty cache
    assert reader.artifact_exists(rel)
    local = reader.local_file(rel)
    assert local.read_bytes() == b"RIFF-bytes" and local.is_relative_to(tmp_path / "machine-b")
    fs.rm_file(path)  # a cached artifact is reused, not fetched again
    assert reader.local_file(rel) == local and local.read_bytes() == b"RIFF-bytes"
    with pytest.raises(FileNotFoundError, match="not on the object store"):
        reader.local_file("artifacts/audio/x/missing.wav")
    assert not reader.artifact_exists("artifacts/audio/x/missing.wav")


def test_local_roots_keep_artifacts_in_place(tmp_path):
    store = Store(tmp_path / "root")
    assert not store.is_remote and store.local_dir == tmp_path / "root"
    out = store.artifact_path("faces", "faces-x", "vid", "e" * 64, ".npz")
    out.write_bytes(b"npz")
    rel = store.publish_artifact(out)
    assert rel == store.relative(out) and store.local_file(rel) == store.absolute(rel) == out
    assert sorted(p.name for p in (tmp_path / "root").rglob("*") if p.is_file()) == [out.name]


# -- concurrency on S3 ---------------------------------------------------------------------------
def test_reads_stay_consistent_while_a_writer_replaces_and_compacts(s3_root, tmp_path):
    store = store_at(s3_root, tmp_path, max_small_parts=2, compact_grace_s=0)
    ids = [f"v{i:02d}" for i in range(20)]
    store.upsert(TABLE, feature_rows(ids))
    done = threading.Event()
    problems: list = []

    def write() -> None:
        try:
            for r in range(12):
                store.upsert(TABLE, feature_rows(ids[r % 20 :][:5], seed=100 + r))
                time.sleep(0.1)  # let the reader in between writes too
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    reader = store_at(s3_root, tmp_path / "reader")
    while not done.is_set():
        try:
            got = reader.read(TABLE, columns=["video_id"]).video_id
            if sorted(got) != ids:
                problems.append(sorted(got))
        except Exception as e:  # pragma: no cover - the failure is what the test reports
            problems.append(repr(e))
        reads += 1
    writer.join()
    assert reads >= 3 and not problems, (reads, problems[:3])
    assert sorted(raw_keys(s3_root, TABLE)) == ids  # replaced rows left no duplicates behind


def _expected_private(name: str, rounds: int, n_keys: int) -> dict[str, str]:
    last = {}
    for r in range(rounds):
        for i in window(r, n_keys):
            last[f"{name}-{i:04d}"] = f"{name}:{r}"
    return last


@pytest.mark.parametrize("machines", [1, 2])
def test_two_writer_processes_end_with_an_exact_table(s3_root, tmp_path, machines):
    """Two processes upsert overlapping (shared) and disjoint (own) keys. On one machine they
    share the local lock; as two machines (separate local folders) they share nothing, and the
    unique part names plus newest-wins reads still give every key once, at the last write."""
    rounds, n_keys = 12, 24
    store = store_at(s3_root, tmp_path / "seed")
    seed = [failure_row(f"v{i:04d}", "0" * 64, "audio", "seed") for i in range(n_keys)]
    store.upsert(tables.FAILURES, failures_frame(seed))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # One machine: one lock, compaction as soon as parts pile up. Two machines: no shared lock,
    # compaction only of parts older than the grace time (here 1 s, uploads take ms).
    grace = "0" if machines == 1 else "1"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WRITER),
                s3_root,
                name,
                str(rounds),
                str(n_keys),
                str(tmp_path / ("machine" if machines == 1 else f"machine-{name}")),
                grace,
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    final = store.read(tables.FAILURES).set_index("video_id").message.to_dict()
    private = {**_expected_private("w1", rounds, n_keys), **_expected_private("w2", rounds, n_keys)}
    shared = {k: v for k, v in final.items() if k.startswith("v")}
    assert {k: v for k, v in final.items() if not k.startswith("v")} == private
    assert sorted(shared) == [f"v{i:04d}" for i in range(n_keys)]
    for key, message in shared.items():
        i = int(key[1:])
        lasts = {
            f"{w}:{max((r for r in range(rounds) if i in window(r, n_keys)), default=-1)}"
            for w in ("w1", "w2")
        }
        assert message in (
            lasts if any(i in window(r, n_keys) for r in range(rounds)) else {"seed"}
        )
    raw = raw_keys(s3_root, tables.FAILURES)
    assert set(raw) == set(final)
    # Parts were merged as they piled up (25 upserts), on two machines too.
    assert len(objects(s3_root, f"stores/{tables.FAILURES.name}")) < 12
    if machines == 1:
        assert len(raw) == len(final)  # one lock: never a duplicate left on disk


# -- errors --------------------------------------------------------------------------------------
def test_missing_bucket_is_a_clear_error_naming_the_url(s3, tmp_path):
    url = f"s3://merflow-no-such-bucket-{uuid.uuid4().hex[:6]}/root"
    store = store_at(url, tmp_path)
    with pytest.raises(StoreAccessError) as read:
        store.read(TABLE)
    with pytest.raises(StoreWriteError) as write:
        store.upsert(TABLE, feature_rows(["a"]))
    for err in (read.value, write.value):
        text = str(err)
        assert url in text and "does not exist" in text and "aws s3 mb" in text
        assert not err.transient
        assert not retry_if_transient(None, None, type("S", (), {"data": err})())
    assert "botocore" not in str(read.value) and read.value.__cause__ is not None


def test_refused_credentials_are_a_clear_error(s3_root, tmp_path, monkeypatch):
    import moto.settings

    store = store_at(s3_root, tmp_path)
    # moto checks signatures against its IAM users once this count is reached: our keys are
    # unknown there, as wrong keys would be on a real server.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(StoreWriteError) as err:
        store.upsert(TABLE, feature_rows(["a"]))
    text = str(err.value)
    assert s3_root in text and "AWS_ACCESS_KEY_ID" in text and not err.value.transient


def test_unreachable_endpoint_is_a_clear_transient_error(s3, tmp_path):
    with socket_closed_port() as port:
        store = store_at(
            "s3://bucket/root",
            tmp_path,
            storage_options={
                "endpoint_url": f"http://127.0.0.1:{port}",
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
            },
        )
        started = time.monotonic()
        with pytest.raises(StoreAccessError) as err:
            store.read(TABLE)
    text = str(err.value)
    assert "s3://bucket/root" in text and "did not answer" in text and f":{port}" in text
    assert err.value.transient and retry_if_transient(
        None, None, type("S", (), {"data": err.value})()
    )
    assert time.monotonic() - started < 30


class socket_closed_port:
    """A loopback port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_mangled_url_is_refused_not_created_locally(tmp_path):
    from data_contracts.location import DataRootError

    with pytest.raises(DataRootError, match="collapsed"):
        Store(Path("s3://bucket/prefix"))
    with pytest.raises(DataRootError, match=r"'\.\.'"):
        Store("s3://bucket/a/../b")


def test_rows_of_a_table_on_s3_stay_arrow_typed(s3_root, tmp_path):
    store = store_at(s3_root, tmp_path)
    store.upsert(tables.FAILURES, failures_frame([failure_row("a", "0" * 64, "audio", "x")]))
    t = store.read_arrow(tables.FAILURES)
    assert t.schema.metadata == tables.FAILURES.contract.schema.metadata
    assert isinstance(t, pa.Table) and t.num_rows == 1
