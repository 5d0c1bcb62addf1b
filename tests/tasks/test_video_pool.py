"""The faces stage in worker processes: the same rows, crops and failure rows as in-process; a
worker that dies is a transient error and is replaced; other videos' rows are kept."""

from __future__ import annotations

import functools
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.store import Store
from models.settings import available_cpus
from tasks.engine import video_pool
from tasks.engine.errors import TransientError
from tasks.engine.stage import Stage, run_stage
from tasks.faces.crop import _cropper, crop_faces_shard, faces_stage, for_workers
from tasks.faces.crop_files import load_crops
from tasks.faces.settings import FaceSettings
from tests.tasks import badmedia

SHARD = ["face", "no_face", "zero_byte", "text", "face_then_blank", "rotated"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pool")
    return {
        "face": badmedia.face_clip(d / "face.mp4", seconds=0.6, rate=5),
        "rotated": badmedia.face_clip(d / "rotated.mp4", seconds=0.4, rate=5, angle=20),
        "face_then_blank": badmedia.face_then_blank_clip(d / "face_then_blank.mp4", rate=5),
        "no_face": badmedia.testsrc_clip(d / "no_face.mp4", seconds=0.6),
        "zero_byte": badmedia.zero_byte(d / "zero_byte.mp4"),
        "text": badmedia.text_as_mp4(d / "text.mp4"),
    }


def manifest(clips: dict[str, Path], names: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "video_id": [f"v{i:02d}_{n}" for i, n in enumerate(names)],
            "path": [str(clips[n]) for n in names],
            "sha256": [f"{i:064x}" for i in range(len(names))],
        }
    )


@pytest.fixture(autouse=True, scope="module")
def _stop_workers():
    yield
    video_pool.shutdown()


def _table(store: Store, table) -> pd.DataFrame:
    df = store.read(table).drop(columns=["created_at"], errors="ignore")
    return df.sort_values(list(df.columns[:2])).reset_index(drop=True)


def test_workers_give_the_rows_crops_and_failures_of_the_stage_in_process(clips, tmp_path):
    videos = manifest(clips, SHARD)
    stores = {}
    for processes in (0, 2):
        store = Store(tmp_path / f"p{processes}")
        report = crop_faces_shard(videos, store, FaceSettings(fps=5, processes=processes))
        assert (report.processed, report.failed) == (3, 3)
        stores[processes] = store
    inline, pooled = stores[0], stores[2]
    a, b = _table(inline, tables.FACES), _table(pooled, tables.FACES)
    pd.testing.assert_frame_equal(a.drop(columns="path"), b.drop(columns="path"))
    for pa, pb in zip(a.path, b.path, strict=True):
        ca, cb = load_crops(inline.root / pa), load_crops(pooled.root / pb)
        np.testing.assert_array_equal(ca.crops, cb.crops)
        np.testing.assert_array_equal(ca.frame_idx, cb.frame_idx)
    cols = ["video_id", "stage", "error_type", "message"]
    fa, fb = _table(inline, tables.FAILURES)[cols], _table(pooled, tables.FAILURES)[cols]
    pd.testing.assert_frame_equal(fa, fb)
    assert set(fa.error_type) == {"NoFaceError", "UnreadableMediaError"}


def test_a_worker_that_dies_is_a_transient_error_and_is_replaced(clips, tmp_path):
    setup = functools.partial(_cropper, FaceSettings(fps=5))
    workers = video_pool.pool(1)
    workers.warm(setup)
    workers.workers[0].proc.kill()
    workers.workers[0].proc.wait()
    lost = workers.submit(setup, clips["face"], tmp_path / "a.npz")
    with pytest.raises(video_pool.WorkerDiedError, match=r"faces\.processes=0") as err:
        lost.result(timeout=60)
    assert isinstance(err.value, TransientError)  # Prefect retries the shard
    again = workers.submit(setup, clips["face"], tmp_path / "b.npz").result(timeout=120)
    assert again.n_faces > 0 and (tmp_path / "b.npz").exists()


def test_one_pool_serves_other_settings_without_restarting(clips, tmp_path):
    workers = video_pool.pool(1)
    pid = workers.workers[0].proc.pid
    few = functools.partial(_cropper, FaceSettings(max_frames=2))
    many = functools.partial(_cropper, FaceSettings(fps=5))
    a = workers.submit(few, clips["face"], tmp_path / "few.npz").result(timeout=120)
    b = workers.submit(many, clips["face"], tmp_path / "many.npz").result(timeout=120)
    assert (a.n_frames_sampled, b.n_frames_sampled) == (2, 3)
    assert video_pool.pool(1).workers[0].proc.pid == pid


def test_the_rows_of_the_other_videos_are_committed_before_a_video_error_escapes(clips, tmp_path):
    # A compute that runs videos side by side answers one video with a transient error.
    faces = faces_stage(FaceSettings(fps=5, processes=0))
    good = faces.start

    def start(store: Store):
        compute = good(store)

        def side_by_side(items):
            done = compute(items[:1])
            return [*done, TransientError(f"{items[1][0].video_id}: the disk went away")]

        return side_by_side

    stage = Stage(faces.name, faces.table, faces.extractor_id, start, batch=2)
    store = Store(tmp_path / "data")
    videos = manifest(clips, ["face", "rotated"])
    with pytest.raises(TransientError, match="v01_rotated"):
        run_stage(stage, videos, store)
    assert store.read(tables.FACES).video_id.tolist() == ["v00_face"]  # not lost
    assert store.read(tables.FAILURES).empty  # a transient error is not the video's fault
    rerun = run_stage(faces_stage(FaceSettings(fps=5, processes=0)), videos, store)
    assert (rerun.processed, rerun.skipped) == (1, 1)


def test_the_process_count_defaults_to_the_cores_and_to_none_in_a_daemon(monkeypatch):
    assert video_pool.resolve_processes(None) == available_cpus()
    assert video_pool.resolve_processes(3) == 3
    assert video_pool.resolve_processes(0) == 0
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert video_pool.resolve_processes(None) == 0  # a Dask worker may not start processes
    with pytest.raises(ValueError, match="processes must be >= 0"):
        FaceSettings(processes=-1)


def test_workers_decode_on_their_share_of_the_cores_unless_told(monkeypatch):
    monkeypatch.setattr("tasks.faces.crop.available_cpus", lambda: 16)
    auto = FaceSettings()
    assert for_workers(auto, 16).decode_threads == 1  # a worker per core: no decoder threads
    assert for_workers(auto, 4).decode_threads == 4
    assert for_workers(auto, 0).decode_threads == 0  # in-process: FFmpeg's choice
    assert for_workers(FaceSettings(decode_threads=3), 16).decode_threads == 3  # as set
    assert for_workers(auto, 16).extractor_id == auto.extractor_id  # the same crops
