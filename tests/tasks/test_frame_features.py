"""Frame-level features, stored once: the same model pass writes the utterance rows and the
frame rows (visual: one per face crop; acoustic: HuBERT frames pooled to a fixed rate), and the
utterance vector is the pooling of the stored frames (docs/features.md)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data_contracts.store import Store
from flows.config import load_settings
from flows.plan import plan_extraction
from tasks.corpus.scan import scan_videos
from tasks.engine.stage import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES_ON = ["extract.frame_features=[visual,acoustic]"]


@pytest.fixture(scope="module")
def videos(small_corpus, tmp_path_factory):
    """Two demo clips' manifest rows (fps and duration included), in their own folder."""
    folder = tmp_path_factory.mktemp("frames-videos")
    for clip in sorted((small_corpus / "video-labeled").glob("*.mp4"))[:2]:
        shutil.copy(clip, folder / clip.name)
    _, manifest = scan_videos([folder], Store(tmp_path_factory.mktemp("scan")))
    return manifest


def _extract(root, videos, tiny_models, extra=()):
    """Audio, faces, acoustic and visual stages on the videos; the plan they ran with."""
    overrides = [f"models.models_dir={tiny_models}", "models.build_tiny=false", *extra]
    plan = plan_extraction(load_settings("demo", overrides), root, None)
    store = Store(root)
    reports = {s: run_stage(plan.stage(s), videos, store) for s in ("audio", "faces")}
    for s in ("acoustic", "visual"):
        reports[s] = run_stage(plan.stage(s), videos, store)
    return plan, store, reports


def test_frame_rows_pool_to_the_utterance_rows(videos, tiny_models, tmp_path):
    plan, store, _ = _extract(tmp_path / "on", videos, tiny_models, FRAMES_ON)
    for name in ("visual", "acoustic"):
        stage = plan.stage(name)
        utter = store.read(stage.table).set_index("video_id")
        frames = store.read(stage.side.table)
        assert set(frames.video_id) == set(videos.video_id) == set(utter.index), name
        for vid, rows in frames.groupby("video_id"):
            rows = rows.sort_values("frame")
            assert rows.frame.tolist() == list(range(len(rows)))
            assert (rows.start_s.diff().dropna() > 0).all(), (name, vid)  # in time order
            vectors = np.stack(rows.embedding.to_numpy())
            weights = rows.n_items.to_numpy()[:, None]
            pooled = (vectors * weights).sum(0) / weights.sum()
            np.testing.assert_allclose(pooled, utter.loc[vid].embedding, rtol=1e-5, atol=1e-6)
    # Visual: one frame row per face crop of the chosen face; acoustic: 10 windows a second.
    faces = store.read(plan.stage("faces").table).set_index("video_id")
    visual = store.read(plan.stage("visual").side.table)
    for vid, rows in visual.groupby("video_id"):
        assert len(rows) == faces.loc[vid].n_faces
        assert (rows.n_items == 1).all()
    acoustic = store.read(plan.stage("acoustic").side.table)
    for vid, rows in acoustic.groupby("video_id"):
        seconds = float(videos.set_index("video_id").loc[vid].duration)
        assert abs(len(rows) - 10 * seconds) <= 2, (vid, len(rows), seconds)
        assert rows.n_items.max() == 5  # HuBERT's 50 frames a second, five to a window
        np.testing.assert_allclose(np.diff(np.sort(rows.start_s))[:-1], 0.1, atol=1e-4)


def test_utterance_rows_do_not_change_with_frames_on(videos, tiny_models, tmp_path):
    plan_off, store_off, _ = _extract(tmp_path / "off", videos, tiny_models)
    plan_on, store_on, _ = _extract(tmp_path / "on", videos, tiny_models, FRAMES_ON)
    for name in ("visual", "acoustic"):
        off, on = plan_off.stage(name), plan_on.stage(name)
        assert off.extractor_id == on.extractor_id  # the same utterance table: no new features
        assert off.cache_id != on.cache_id  # but not the same work: Prefect's cache tells apart
        a = store_off.read(off.table).set_index("video_id").sort_index()
        b = store_on.read(on.table).set_index("video_id").sort_index()
        np.testing.assert_allclose(
            np.stack(a.embedding.to_numpy()), np.stack(b.embedding.to_numpy()), rtol=1e-5
        )


def test_turning_frames_on_later_computes_only_the_frames_missing(videos, tiny_models, tmp_path):
    root = tmp_path / "root"
    _extract(root, videos, tiny_models)
    plan, store, reports = _extract(root, videos, tiny_models, FRAMES_ON)
    for name in ("acoustic", "visual"):
        assert reports[name].processed == len(videos), name  # the utterance rows were there
        assert len(store.read(plan.stage(name).side.table).video_id.unique()) == len(videos)
    _, _, again = _extract(root, videos, tiny_models, FRAMES_ON)
    assert again["acoustic"].processed == again["visual"].processed == 0
    assert again["acoustic"].skipped == len(videos)
    # Another window rate is another frame table; the utterance table stays the same.
    other, _, rerun = _extract(
        root, videos, tiny_models, [*FRAMES_ON, "extract.acoustic_frame_rate=5"]
    )
    assert other.stage("acoustic").side.table.name != plan.stage("acoustic").side.table.name
    assert other.stage("acoustic").table.name == plan.stage("acoustic").table.name
    assert rerun["acoustic"].processed == len(videos) and rerun["visual"].processed == 0
