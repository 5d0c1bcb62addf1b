"""The manifest scan: probed rows, incremental hashing, new/changed/gone, unreadable as data."""

from __future__ import annotations

import os

import pytest

from data_contracts import tables
from data_contracts.store import Store
from tasks.corpus.scan import list_videos, scan_videos, sha256_file
from tasks.engine.errors import BadInputError
from tests.tasks import badmedia


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "video-labeled"
    d.mkdir()
    badmedia.testsrc_clip(d / "sample_00000001.mp4", seconds=1.0)
    badmedia.testsrc_clip(d / "sample_00000002.mp4", seconds=0.5, audio=False)
    return d


def test_scan_builds_probed_manifest(folder, tmp_path):
    store = Store(tmp_path / "root")
    report, _ = scan_videos([folder], store)
    assert sorted(report.new) == ["sample_00000001", "sample_00000002"]
    m = store.read(tables.MANIFEST).set_index("video_id")
    one = m.loc["sample_00000001"]
    assert one.sha256 == sha256_file(folder / "sample_00000001.mp4")
    assert one.pool == "labeled" and one.has_audio and one.has_video
    assert one.fps == pytest.approx(25.0)
    assert one.duration == pytest.approx(1.0, abs=0.1)
    assert one.n_frames == 25 and one["size"] == (folder / "sample_00000001.mp4").stat().st_size
    assert not m.loc["sample_00000002"].has_audio


def test_second_scan_hashes_only_new_or_changed(folder, tmp_path):
    store = Store(tmp_path / "root")
    scan_videos([folder], store)
    again, _ = scan_videos([folder], store)
    assert again.hashed == 0 and again.unchanged == 2 and not (again.new or again.changed)

    badmedia.testsrc_clip(folder / "sample_00000003.mp4", seconds=0.5)
    badmedia.testsrc_clip(folder / "sample_00000001.mp4", seconds=0.7, freq=880)  # new bytes
    (folder / "sample_00000002.mp4").unlink()
    grown, _ = scan_videos([folder], store)
    assert grown.new == ["sample_00000003"]
    assert grown.changed == ["sample_00000001"]
    assert grown.gone == ["sample_00000002"]
    assert grown.hashed == 2
    ids = set(store.read(tables.MANIFEST).video_id)
    assert ids == {"sample_00000001", "sample_00000003"}

    # Touching a file (new mtime, same bytes) rehashes it but does not call it changed.
    st = (folder / "sample_00000003.mp4").stat()
    os.utime(folder / "sample_00000003.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched, _ = scan_videos([folder], store)
    assert touched.hashed == 1 and not touched.changed and touched.unchanged == 2


def test_unreadable_file_is_a_manifest_row_and_a_failure(folder, tmp_path):
    badmedia.zero_byte(folder / "sample_00000009.mp4")
    store = Store(tmp_path / "root")
    report, _ = scan_videos([folder], store)
    assert report.unreadable == ["sample_00000009"]
    row = store.read(tables.MANIFEST).set_index("video_id").loc["sample_00000009"]
    assert not row.has_video and not row.has_audio and row.probe_error
    fail = store.read(tables.FAILURES)
    assert list(fail.stage) == ["probe"] and "sample_00000009" in fail.message.item()


def test_duplicate_stems_are_refused_listing_all(folder, tmp_path):
    other = tmp_path / "video-unlabeled"
    other.mkdir()
    badmedia.testsrc_clip(other / "sample_00000001.mp4", seconds=0.3)
    with pytest.raises(BadInputError, match="sample_00000001"):
        list_videos([folder, other])
    with pytest.raises(BadInputError, match="does not exist"):
        list_videos([tmp_path / "nope"])


def test_scan_takes_the_video_extensions_setting(folder, tmp_path):
    (folder / "sample_00000003.MKV").write_bytes((folder / "sample_00000001.mp4").read_bytes())
    (folder / "notes.txt").write_text("not a video")
    store = Store(tmp_path / "root")
    report, _ = scan_videos([folder], store, extensions=["mkv"])
    assert report.new == ["sample_00000003"]
    # The default is the setting's default list, which has .mp4 and .mkv and no .txt.
    assert set(list_videos([folder])) == {"sample_00000001", "sample_00000002", "sample_00000003"}


def test_the_corpus_names_are_declared_once_and_are_the_settings_defaults():
    from flows.config import CorpusSettings
    from tasks.corpus import layout

    c = CorpusSettings()
    assert (c.labelled_dir, c.unlabelled_dir) == (layout.LABELLED_DIR, layout.UNLABELLED_DIR)
    assert (c.labels_csv, c.transcripts_csv) == (layout.LABELS_CSV, layout.TRANSCRIPTS_CSV)
    assert tuple(c.video_extensions) == layout.VIDEO_EXTENSIONS
    assert layout.POOL_OF_FOLDER == {"video-labeled": "labeled", "video-unlabeled": "unlabeled"}


def test_a_mer_corpus_keeps_its_two_pool_folders(folder, tmp_path):
    from tasks.corpus.layout import corpus_layout

    (folder.parent / "loose.mp4").write_bytes(b"")  # beside the pool folders: not scanned
    found = corpus_layout(folder.parent)
    assert found.video_dirs == [folder.resolve()] and not found.plain
    assert found.pool is None and found.note() == ""


def test_a_plain_folder_is_a_corpus_of_unlabelled_videos(folder, tmp_path):
    from tasks.corpus.layout import corpus_layout

    flat = tmp_path / "clips"
    flat.mkdir()
    for p in folder.iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    (flat / "notes.txt").write_text("not a video")
    found = corpus_layout(flat)
    assert found.plain and found.video_dirs == [flat.resolve()] and found.n_videos == 2
    assert found.note() == (
        f"{flat.resolve()} has no video-labeled/ or video-unlabeled/: its 2 videos are treated "
        "as unlabelled"
    )
    store = Store(tmp_path / "root")
    scan_videos(found.video_dirs, store, pool=found.pool)
    m = store.read(tables.MANIFEST)
    assert set(m.video_id) == {"sample_00000001", "sample_00000002"}  # the file stems
    assert set(m.pool) == {"unlabeled"}


def test_a_missing_or_video_less_corpus_is_refused(tmp_path):
    from tasks.corpus.layout import CorpusError, corpus_layout

    with pytest.raises(CorpusError, match="does not exist"):
        corpus_layout(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(CorpusError, match="holds no videos"):
        corpus_layout(tmp_path)
    assert isinstance(CorpusError("x"), ValueError)  # exit 2 under the command line's rule
