"""The extraction flow against a real Prefect server: every modality lands; reruns do no work."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.store import Store
from flows.extract import extract_flow

pytestmark = pytest.mark.server


def _run(corpus, root, tiny_models, **kw):
    return extract_flow(
        str(corpus),
        profile="demo",
        data_root=str(root),
        overrides=[
            f"models.models_dir={tiny_models}",
            "models.build_tiny=false",
            "extract.shard_size=8",
        ],
        **kw,
    )


def _table(summary, modality):
    name = summary["feature_tables"][modality]
    ext = name.rsplit("/", 1)[-1]
    return ext


@pytest.fixture
def corpus(small_corpus, tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(small_corpus, dst)
    return dst


def test_extract_fills_every_store_and_reruns_do_nothing(
    prefect_server, corpus, tmp_path, tiny_models
):
    root = tmp_path / "root"
    first = _run(corpus, root, tiny_models)
    n = 18
    assert first["videos"] == n and first["shards"] == 3
    for stage, s in first["stages"].items():
        assert s["processed"] == n and s["failed"] == 0, (stage, s)
    store = Store(root)
    for modality, path in first["feature_tables"].items():
        rows = pd.read_parquet(store.stores / path)
        assert len(rows) == n and rows.video_id.is_unique, modality
        mat = np.stack(rows.embedding)
        assert np.isfinite(mat).all() and (np.linalg.norm(mat, axis=1) > 0).all()
    transcripts = store.read(tables.TRANSCRIPTS)
    assert set(transcripts.source) == {"official"}  # the corpus ships label-transcription.csv
    assert len(store.read(tables.LABELS)) == 12
    assert (root / "runs" / "extract-settings.yaml").exists()

    again = _run(corpus, root, tiny_models)
    for stage, s in again["stages"].items():
        assert s["processed"] == 0 and s["cached_shards"] == 3, (stage, s)


def test_grown_folder_computes_only_new_videos(prefect_server, corpus, tmp_path, tiny_models):
    root = tmp_path / "root"
    _run(corpus, root, tiny_models)
    src = sorted((corpus / "video-unlabeled").glob("*.mp4"))[0]
    shutil.copy(src, corpus / "video-unlabeled" / "sample_09999999.mp4")
    grown = _run(corpus, root, tiny_models, only_new=True)
    assert grown["videos"] == 1
    for stage, s in grown["stages"].items():
        assert s["processed"] == 1, (stage, s)
    store = Store(root)
    for path in grown["feature_tables"].values():
        assert len(pd.read_parquet(store.stores / path)) == 19


def test_lost_store_is_recomputed_not_trusted_from_cache(
    prefect_server, corpus, tmp_path, tiny_models
):
    root = tmp_path / "root"
    _run(corpus, root, tiny_models)
    shutil.rmtree(root / "stores" / "audio")
    shutil.rmtree(root / "stores" / "features" / "acoustic")
    rerun = _run(corpus, root, tiny_models)
    assert rerun["stages"]["audio"]["processed"] == 18
    assert rerun["stages"]["acoustic"]["processed"] == 18
    assert rerun["stages"]["visual"]["processed"] == 0


def test_task_command_and_flow_store_the_same_rows(prefect_server, corpus, tmp_path, tiny_models):
    """`merflow task` runs the flow's stages with the flow's engine: the same rows, to the bit."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.config import load_settings
    from flows.plan import plan_extraction
    from flows.task_cli import run_video
    from tasks.dag import STAGES

    folder = tmp_path / "one"
    folder.mkdir()
    video = folder / sorted((corpus / "video-labeled").glob("*.mp4"))[0].name
    shutil.copy(corpus / "video-labeled" / video.name, video)
    overrides = [
        f"models.models_dir={tiny_models}",
        "models.build_tiny=false",
        "extract.prefer_official_transcripts=false",  # ASR, as `merflow task` runs it
        # The same threads in both: a model stage of the flow otherwise takes its share of the
        # machine's cores, and another thread count sums floats in another order (the random
        # tiny ASR's greedy decoding then picks another token where two scores nearly tie).
        "extract.model_threads=1",
    ]
    root = tmp_path / "root"
    extract_flow(
        str(corpus), profile="demo", data_root=str(root), overrides=overrides,
        video_dirs=[str(folder)],
    )  # fmt: skip
    flow_store = Store(root)

    plan = plan_extraction(load_settings("demo", overrides), tmp_path / "cli", None)
    rows = run_video(video, [plan.stage(s) for s in STAGES], Store(tmp_path / "cli-store"))
    assert list(rows) == list(STAGES)
    for name, row in rows.items():
        stored = flow_store.read(plan.stage(name).table)
        assert len(stored) == 1, name
        flow_row = stored.iloc[0]
        for column in stored.columns.drop("created_at"):
            a, b = row[column], flow_row[column]
            same = np.array_equal(a, b) if column == "embedding" else (a == b or a is b)
            assert same or (pd.isna(a) and pd.isna(b)), (name, column, a, b)

    # The command prints the norm of that very vector.
    acoustic = rows["acoustic"].embedding
    result = CliRunner().invoke(
        app, ["task", "embed-audio", str(video), "--data-root", str(tmp_path / "cli"), *overrides]
    )
    assert result.exit_code == 0, result.output
    assert f"L2 norm {np.linalg.norm(acoustic):.4f}" in result.output
