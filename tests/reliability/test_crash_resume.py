"""SIGKILL the extraction in the middle of a shard's write, rerun: every video exactly once in
every store, no temporary file visible to readers, finished shards not recomputed."""

from __future__ import annotations

import signal

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.atomic import FAULT_ENV
from data_contracts.store import Store
from tests.reliability.helpers import raw_rows, stage_dirs, summary_of, table_folders

pytestmark = pytest.mark.server

N_VIDEOS = 12  # the labelled pool only: a subprocess starts cold, keep its work small
SHARD_SIZE = 4  # three shards, run concurrently by Prefect's thread pool
SHARD = f"extract.shard_size={SHARD_SIZE}"


def test_killed_extraction_resumes_without_loss_duplication_or_recompute(
    corpus, tmp_path, extract_process
):
    root = tmp_path / "root"
    # The process kills itself (SIGKILL) on its second visual-feature part file, after the
    # temporary file is written and before the rename: one visual shard is committed, one is
    # half-written, and the other stages are wherever the thread pool had got them.
    dirs = [corpus / "video-labeled"]
    killed = extract_process(
        corpus, root, SHARD, video_dirs=dirs, extra_env={FAULT_ENV: "stores/features/visual/:2"}
    )
    out, _ = killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL, out[-3000:]

    visual_dirs = list((root / "stores" / "features" / "visual").iterdir())
    assert len(visual_dirs) == 1
    visual = visual_dirs[0]
    assert list(visual.glob(".part-*.tmp")), "the crash did not happen inside a part-file write"
    # Readers see committed shards only: plain pandas ignores the dot-named temporary file.
    assert len(pd.read_parquet(visual)) == SHARD_SIZE
    after_crash = {}
    for folder in table_folders(root):
        rows = raw_rows(folder)
        assert rows.video_id.is_unique, folder
        after_crash[folder] = len(rows)

    rerun = summary_of(extract_process(corpus, root, SHARD, video_dirs=dirs))
    store = Store(root)
    stage_had = {}
    for stage, folder in stage_dirs(root, rerun["feature_tables"]).items():
        s = rerun["stages"][stage]
        had = stage_had[stage] = after_crash.get(folder, 0)
        # Exactly the videos the crash left without a row are computed, nothing else.
        assert s["failed"] == 0 and s["processed"] == N_VIDEOS - had, (stage, had, s)
        assert s["skipped"] == had, (stage, had, s)  # cached shards count as skipped
        rows = raw_rows(folder)
        assert len(rows) == N_VIDEOS and rows.video_id.is_unique, stage
        assert not list(folder.glob(".*.tmp")), f"{stage}: a temporary file outlived the rerun"
    assert any(n == N_VIDEOS for n in stage_had.values()), f"no stage had finished: {stage_had}"
    assert stage_had["visual"] == SHARD_SIZE

    # Rows point at finished artifacts only, and the features are real vectors.
    for table in (tables.AUDIO, tables.FACES):
        for rel in store.read(table).path:
            assert store.absolute(rel).is_file() and not store.absolute(rel).name.startswith(".")
    for name in rerun["feature_tables"].values():
        mat = np.stack(pd.read_parquet(store.stores / name).embedding)
        assert np.isfinite(mat).all() and (np.linalg.norm(mat, axis=1) > 0).all()
    assert len(store.read(tables.MANIFEST)) == N_VIDEOS
