"""Any folder of videos is a corpus: `merflow extract FOLDER` on clips without MER2024's
video-labeled/ and video-unlabeled/ takes them as unlabelled videos, says so in one line, and
extracts every modality of them."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.store import Store
from flows.cli import app

pytestmark = pytest.mark.server


def test_a_plain_folder_of_clips_is_extracted_as_unlabelled_videos(
    prefect_server, small_corpus, tmp_path, tiny_models
):
    flat = tmp_path / "clips"
    flat.mkdir()
    picked = [
        *sorted((small_corpus / "video-labeled").glob("*.mp4"))[:2],
        *sorted((small_corpus / "video-unlabeled").glob("*.mp4"))[:1],
    ]
    for clip in picked:
        shutil.copy(clip, flat / clip.name)
    (flat / "notes.txt").write_text("not a video")
    root = tmp_path / "root"
    overrides = [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
    result = CliRunner().invoke(app, ["extract", str(flat), "--data-root", str(root), *overrides])
    assert result.exit_code == 0, result.output
    note = (
        f"{flat} has no video-labeled/ or video-unlabeled/: its 3 videos are treated as unlabelled"
    )
    assert result.stdout.count(note) == 1, result.stdout

    store = Store(root)
    manifest = store.read(tables.MANIFEST)
    ids = {clip.stem for clip in picked}  # the file stems, as for any corpus
    assert set(manifest.video_id) == ids
    assert set(manifest.pool) == {"unlabeled"}
    assert set(manifest.source_dir) == {str(flat.resolve())}
    assert not store.exists(tables.LABELS) or store.read(tables.LABELS).empty
    assert store.read(tables.FAILURES).empty
    for modality in ("visual", "acoustic", "text"):
        found = [
            set(pd.read_parquet(t).video_id)
            for t in (store.stores / "features" / modality).iterdir()
        ]
        assert ids in found, (modality, found)
