"""Contracts round-trip, bad rows are refused with every problem listed, writes are atomic."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_contracts import tables
from data_contracts.contracts import ContractMismatch, ContractViolation
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def feature_rows(ids, dim=8, seed=0, ext="tiny-clip-00000000"):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "video_id": ids,
            "sha256": [f"{i:0>64}" for i in range(len(ids))],
            "extractor_id": ext,
            "embedding": list(rng.normal(size=(len(ids), dim)).astype(np.float32)),
            "n_items": 3,
            "provenance": '{"model": "tiny"}',
            "created_at": NOW,
        }
    )


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "root")


def test_feature_table_round_trips_with_self_description(store):
    table = tables.features("visual", "tiny-clip-00000000", 8)
    df = feature_rows(["a", "b", "c"])
    report = store.upsert(table, df)
    assert report.inserted == 3
    back = store.read(table)
    assert list(back["video_id"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(np.stack(back["embedding"]), np.stack(df["embedding"]))
    _, mat = store.read_vectors(table)
    assert mat.shape == (3, 8) and mat.dtype == np.float32
    part = next(store.table_dir(table).glob("part-*.parquet"))
    meta = pq.read_schema(part).metadata
    assert meta[b"merflow.contract"] == b"features_visual"
    assert meta[b"merflow.contract_version"] == b"1"
    vec = pq.read_schema(part).field("embedding").type
    assert vec.list_size == 8 and str(vec.value_type) == "float"


def test_bad_rows_list_every_problem_and_write_nothing(store):
    table = tables.features("visual", "tiny-clip-00000000", 8)
    df = feature_rows(["a", "b", "b", None])
    df.at[0, "embedding"] = np.full(8, np.nan, np.float32)
    df.at[1, "embedding"] = np.zeros(5, np.float32)
    df.at[2, "sha256"] = df.at[1, "sha256"]
    with pytest.raises(ContractViolation) as err:
        store.upsert(table, df)
    text = str(err.value)
    assert "NaN" in text and "dimension 8" in text and "duplicate keys" in text
    assert "null" in text
    assert len(err.value.problems) >= 4
    assert not store.exists(table)


def test_unknown_label_and_missing_columns_are_refused(store):
    bad = pd.DataFrame({"video_id": ["a", "b"], "label": ["happy", "elated"], "source": "x"})
    with pytest.raises(ContractViolation, match="elated"):
        store.upsert(tables.LABELS, bad)
    with pytest.raises(ContractViolation, match="missing columns: source"):
        store.upsert(tables.LABELS, bad.drop(columns=["source"]))


def test_upsert_is_idempotent_and_replaces_changed_rows(store):
    table = tables.features("acoustic", "tiny-hubert-00000000", 8)
    df = feature_rows(["a", "b"])
    store.upsert(table, df)
    again = store.upsert(table, df)
    assert again.written == 0 and again.unchanged == 2
    assert len(pd.read_parquet(store.table_dir(table))) == 2  # one physical copy, plain pandas
    changed = feature_rows(["b", "c"], seed=1)
    changed["sha256"] = df["sha256"].iloc[1], "f" * 64
    rep = store.upsert(table, changed)
    assert (rep.inserted, rep.replaced) == (1, 1)
    back = store.read(table).set_index("video_id")
    np.testing.assert_array_equal(back.loc["b", "embedding"], changed["embedding"].iloc[0])
    assert sorted(back.index) == ["a", "b", "c"]
    assert len(pd.read_parquet(store.table_dir(table))) == 3
    assert store.existing_keys(table) == set(
        zip(back.index, back["sha256"], back["extractor_id"], strict=True)
    )


def test_interrupted_write_leaves_store_readable_and_unchanged(store, monkeypatch):
    table = tables.features("text", "tiny-lm-00000000", 8)
    store.upsert(table, feature_rows(["a", "b"]))
    before = store.read(table)

    def explode(*args, **kwargs):
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr("data_contracts.store.pq.write_table", explode)
    with pytest.raises(OSError, match="mid-write"):
        store.upsert(table, feature_rows(["c"], seed=3))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(store.read(table), before)
    leftovers = [p.name for p in store.table_dir(table).iterdir() if p.name != ".lock"]
    assert all(n.startswith("part-") and n.endswith(".parquet") for n in leftovers)


def test_many_writes_are_compacted_into_few_files(tmp_path):
    store = Store(tmp_path, max_small_parts=4)
    table = tables.features("visual", "tiny-clip-00000000", 8)
    for i in range(12):
        store.upsert(table, feature_rows([f"v{i:03d}"], seed=i))
    assert len(list(store.table_dir(table).glob("part-*.parquet"))) <= 5
    assert len(store.read(table)) == 12
    assert store.compact(table) >= 1
    assert len(list(store.table_dir(table).glob("part-*.parquet"))) == 1
    n = duckdb.sql(
        f"select count(*) from read_parquet('{store.table_dir(table)}/*.parquet')"
    ).fetchall()[0][0]
    assert n == 12


def test_file_of_another_contract_version_is_refused(store):
    table = tables.features("visual", "tiny-clip-00000000", 8)
    store.upsert(table, feature_rows(["a"]))
    part = next(store.table_dir(table).glob("part-*.parquet"))
    t = pq.read_table(part)
    meta = dict(t.schema.metadata)
    meta[b"merflow.contract_version"] = b"0"
    pq.write_table(t.replace_schema_metadata(meta), part)
    with pytest.raises(ContractMismatch, match="version '0'"):
        store.read(table)


def test_failures_are_rows(store):
    rows = [
        failure_row("x", "0" * 64, "audio", ValueError("video x.mp4 has no audio stream")),
        failure_row("y", "1" * 64, "faces", "no face in 40 sampled frames", extractor_id="dlib-1"),
    ]
    store.upsert(tables.FAILURES, failures_frame(rows))
    back = store.read(tables.FAILURES)
    assert set(back["stage"]) == {"audio", "faces"}
    assert back.loc[back.video_id == "x", "error_type"].item() == "ValueError"


def test_vector_parts_give_each_keys_newest_vector_one_part_at_a_time(store):
    """What load_training_data reads part by part is what read_vectors reads whole: every key
    once, its newest version, even where a crash left an older copy in another part."""
    table = tables.features("visual", "tiny-clip-00000000", 8)
    store.upsert(table, feature_rows(["a", "b", "c"], seed=1))
    store.upsert(table, feature_rows(["d", "e"], seed=2))
    store.upsert(table, feature_rows(["b", "x"], seed=3))  # b replaced: b's old row is dropped
    # A second copy of e's key with other values in a newer part, as a crash between writing a
    # merged part and removing its sources leaves: the newer one wins, in both reads.
    newer = table.contract.to_arrow(feature_rows(["d", "e"], seed=4).iloc[[1]])
    store._write_part(table, newer)
    parts = list(store.vector_parts(table))
    assert len(parts) == len(list(store.table_dir(table).glob("part-*.parquet")))  # one at a time
    got = {}
    for keys, mat in parts:
        assert mat.dtype == np.float32 and mat.shape == (len(keys), 8)
        for (v, s), row in zip(zip(keys.video_id, keys.sha256, strict=True), mat, strict=True):
            assert (v, s) not in got
            got[(v, s)] = row
    keys, whole = store.read_vectors(table)
    assert set(got) == set(zip(keys.video_id, keys.sha256, strict=True))
    for (v, s), row in zip(zip(keys.video_id, keys.sha256, strict=True), whole, strict=True):
        np.testing.assert_array_equal(got[(v, s)], row)
    assert np.array_equal(got[("e", f"{1:0>64}")], feature_rows(["d", "e"], seed=4).embedding[1])
