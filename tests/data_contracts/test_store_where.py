"""Reads that take a row filter (`where`), on a local disk, on moto's S3 and on memory://: the
right rows, the newest version of a key still wins, an empty collection gives an empty frame
with the contract's columns, and key filters are pushed down to the part reads. Also: the
stores import no task or flow module (the layers point one way)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import rows, tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store
from tests.data_contracts.objectstore import moto_s3, new_bucket
from tests.data_contracts.test_store import feature_rows as features

EXT = "tiny-clip-00000000"
FEATURES = tables.features("visual", EXT, 8)
FAILURES = tables.FAILURES
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("s3-scratch")) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3", "memory"])
def store(request, tmp_path):
    """A fresh store on a local disk, on moto's S3 or on fsspec's memory filesystem."""
    if request.param == "local":
        return Store(tmp_path / "root")
    if request.param == "s3":
        url = f"s3://{new_bucket(request.getfixturevalue('s3'))}/merflow"
    else:
        url = f"memory://merflow-{uuid.uuid4().hex[:8]}/root"
    return Store(url, cache_dir=tmp_path / "local")


def failures(ids, stage="audio", message="x") -> pd.DataFrame:
    return failures_frame([failure_row(v, "0" * 64, stage, message) for v in ids])


def test_where_keeps_the_rows_whose_values_are_listed(store):
    store.upsert(FAILURES, failures(["a", "b", "c", "d"]))
    store.upsert(FAILURES, failures(["b", "c"], stage="faces"))
    got = store.read(FAILURES, where={"video_id": {"b", "d", "zz"}})
    assert sorted(zip(got.video_id, got.stage, strict=True)) == [
        ("b", "audio"),
        ("b", "faces"),
        ("d", "audio"),
    ]
    both = store.read(
        FAILURES, columns=["video_id"], where={"video_id": ["b", "c"], "stage": ["faces"]}
    )
    assert list(both.columns) == ["video_id"] and sorted(both.video_id) == ["b", "c"]
    # A non-key column, as a pandas Series: applied after the newest row per key is chosen.
    by_message = store.read(FAILURES, where={"message": pd.Series(["x"])})
    assert len(by_message) == 6
    keys = store.existing_keys(FAILURES, where={"stage": ["faces"]})
    assert keys == {(v, "0" * 64, "faces", "") for v in "bc"}
    assert store.existing_keys(FAILURES) == store.existing_keys(FAILURES, where=None)


def test_where_on_vectors(store):
    df = features(["a", "b", "c"])
    store.upsert(FEATURES, df)
    keys, mat = store.read_vectors(FEATURES, where={"video_id": np.array(["c", "a"])})
    assert sorted(keys.video_id) == ["a", "c"] and mat.shape == (2, 8)
    by_id = dict(zip(keys.video_id, mat, strict=True))
    np.testing.assert_array_equal(by_id["c"], df.embedding[2])
    keys, mat = store.read_vectors(FEATURES, where={"extractor_id": ["other"]})
    assert len(keys) == 0 and mat.shape == (0, 8)


def test_newest_version_of_a_key_still_wins_after_filtering(store):
    """Two parts hold a version of key b (as after a crash, or writers on two machines): a
    filter on the key returns the newer one; a filter on another column that only the older
    version matches returns nothing for b, not the overridden version."""
    t = FAILURES.contract.to_arrow
    store._write_part(FAILURES, t(failures(["a", "b"], message="old")), seq=100)
    store._write_part(FAILURES, t(failures(["b", "c"], message="new")), seq=200)
    got = store.read(FAILURES, where={"video_id": ["b"]})
    assert list(got.message) == ["new"]
    assert sorted(store.read(FAILURES, where={"message": ["old"]}).video_id) == ["a"]
    assert sorted(store.read(FAILURES, where={"message": ["new"]}).video_id) == ["b", "c"]
    both = store.read(FAILURES, where={"video_id": ["a", "b"], "message": ["old"]})
    assert list(both.video_id) == ["a"]


def test_an_empty_collection_gives_an_empty_frame_with_the_contract_columns(store):
    names = FAILURES.contract.schema.names
    assert list(store.read(FAILURES, where={"video_id": []}).columns) == names  # no table yet
    assert list(store.read(FAILURES, where={"video_id": ["a"]}).columns) == names
    store.upsert(FAILURES, failures(["a", "b"]))
    empty = store.read(FAILURES, where={"video_id": [], "stage": ["audio"]})
    assert len(empty) == 0 and list(empty.columns) == names
    t = store.read_arrow(FAILURES, columns=["video_id", "stage"], where={"stage": set()})
    assert t.num_rows == 0 and t.column_names == ["video_id", "stage"]
    assert t.schema.field("video_id").type == FAILURES.contract.schema.field("video_id").type
    assert store.existing_keys(FAILURES, where={"video_id": []}) == set()
    keys, mat = store.read_vectors(FEATURES, where={"video_id": []})
    assert len(keys) == 0 and mat.shape == (0, 8)


def test_key_filters_are_pushed_down_to_the_part_reads(store):
    """The backend returns only the matching rows of each part: nothing is read to be
    thrown away after."""
    ids = [f"v{i:04d}" for i in range(500)]
    store.upsert(FAILURES, failures(ids[:250]))
    store.upsert(FAILURES, failures(ids[250:]))
    listing = store._listing(FAILURES.name)
    assert len(listing) == 2
    wanted = {"video_id": ids[240:260]}
    pieces = store.backend.read_parts(
        FAILURES.name, listing, ["video_id"], rows.isin(FAILURES, wanted)
    )
    assert sum(t.num_rows for _, _, t in pieces) == 20
    assert sorted(store.read(FAILURES, where=wanted).video_id) == ids[240:260]


def test_where_names_columns_of_the_table(store):
    with pytest.raises(ValueError, match="lacks"):
        store.read(FAILURES, where={"no_such_column": ["a"]})
    with pytest.raises(TypeError, match="collection"):
        store.read(FAILURES, where={"video_id": "abc"})


def test_the_stores_import_no_task_or_flow_module():
    code = (
        "import json, sys\n"
        "import data_contracts.store, data_contracts.objectstore, data_contracts.location\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'flows'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
