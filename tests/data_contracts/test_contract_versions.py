"""Contract versions: a faces table written under version 1 (before it recorded the face
selection) stays readable and writable, its rows read with the new columns null, and compaction
rewrites it in the current layout; unknown versions and damaged files are refused by name."""

from __future__ import annotations

import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import contracts as c
from data_contracts import tables
from data_contracts.contracts import ContractMismatch
from data_contracts.store import Store
from tests.data_contracts.old_layouts import ADDED, FACES_V1, v1_rows, v2_rows


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "root")
    url = f"memory://merflow-{uuid.uuid4().hex[:8]}/root"
    return Store(url, cache_dir=tmp_path / "local", compact_grace_s=0)


def _versions(store: Store) -> list[str]:
    return [s.metadata[c.META_VERSION].decode() for s in store.part_schemas("faces")]


def test_a_new_store_keeps_the_selection_columns(store):
    store.upsert(tables.FACES, v2_rows(["a", "b"]))
    back = store.read(tables.FACES).set_index("video_id")
    assert back.loc["a", "select_rule"] == "speaking" and back.loc["b", "n_tracks"] == 2
    assert back.loc["a", "select_score"] == pytest.approx(0.7)
    assert _versions(store) == ["2"]


def test_an_old_faces_table_reads_with_the_new_columns_null(store):
    store.upsert(FACES_V1, v1_rows(["a", "b", "c"]))
    assert _versions(store) == ["1"]
    back = store.read(tables.FACES).set_index("video_id")
    assert list(back.columns) == [f for f in c.FACES.columns if f != "video_id"]
    assert back[list(ADDED)].isna().all().all()
    assert back.face_ratio.tolist() == pytest.approx([0.8] * 3)
    # Some columns (new ones among them), a pushed-down key filter, a filter on a new column.
    some = store.read(tables.FACES, ["video_id", "select_score"], where={"video_id": ["b"]})
    assert some.video_id.tolist() == ["b"] and some.select_score.isna().all()
    assert store.read(tables.FACES, where={"select_rule": ["speaking"]}).empty
    assert store.existing_keys(tables.FACES) == {(v, f"{v:0>64}", "faces-x") for v in "abc"}


def test_writes_to_an_old_table_mix_versions_and_compaction_upgrades_it(store):
    store.upsert(FACES_V1, v1_rows(["a", "b", "c"]))
    # A new row, a replaced old row, and an old row sent again unchanged in the old layout's
    # values plus nulls (what a reader of the old file sees) is not rewritten.
    report = store.upsert(tables.FACES, v2_rows(["b", "d"]))
    assert (report.inserted, report.replaced) == (1, 1)
    same = v1_rows(["c"]).assign(**{col: None for col in ADDED})
    assert store.upsert(tables.FACES, same).unchanged == 1
    assert sorted(_versions(store)) == ["1", "2"]
    before = store.read(tables.FACES).sort_values("video_id").reset_index(drop=True)
    assert before.set_index("video_id").select_rule.fillna("-").to_dict() == {
        "a": "-", "b": "speaking", "c": "-", "d": "speaking"
    }  # fmt: skip
    assert store.compact(tables.FACES) == 2
    assert _versions(store) == ["2"]  # rewritten in the current layout, values unchanged
    after = store.read(tables.FACES).sort_values("video_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)


def test_unknown_versions_and_damaged_files_are_refused(tmp_path):
    store = Store(tmp_path / "root")
    store.upsert(FACES_V1, v1_rows(["a"]))
    part = next(store.table_dir(tables.FACES).glob("part-*.parquet"))
    t = pq.read_table(part)
    pq.write_table(t.drop_columns(["crop_size"]), part)  # a v1 file without a v1 column
    with pytest.raises(ContractMismatch, match=r"lacks its columns \['crop_size'\]"):
        store.read(tables.FACES)
    meta = dict(t.schema.metadata)
    meta[c.META_VERSION] = b"0"
    pq.write_table(t.replace_schema_metadata(meta), part)
    with pytest.raises(ContractMismatch, match=r"version '0'.* reads 'faces' version '2', '1'"):
        store.read(tables.FACES)


def test_only_nullable_non_key_columns_can_be_added_to_an_older_version():
    assert c.FACES.versions == ("2", "1")
    fields = (pa.field("video_id", pa.string(), nullable=False), pa.field("x", pa.int32()))
    c.Contract("t", "2", fields, ("video_id",), older=(("1", ("x",)),))  # nullable: fine
    strict = (fields[0], pa.field("x", pa.int32(), nullable=False))
    with pytest.raises(ValueError, match=r"cannot read v1 files by filling \['x'\]"):
        c.Contract("t", "2", strict, ("video_id",), older=(("1", ("x",)),))
    with pytest.raises(ValueError, match="video_id"):
        c.Contract("t", "2", fields, ("video_id",), older=(("1", ("video_id",)),))
