"""The demo corpus with planted problems, extracted once by the real flow: provenance, the check,
`merflow inspect`, and a re-extraction that recomputes only what its changed setting touches."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import typer
from prefect.artifacts import Artifact
from prefect.logging.handlers import APILogWorker
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.store import Store
from flows.check import ARTIFACT_KEY, check_flow
from flows.extract import extract_flow
from flows.quality_cli import register
from flows.safety import UnsafeParameterError
from models.acoustic import AcousticEncoder
from models.asr import AsrModel
from models.text import TextEncoder
from models.tiny import TINY_FORMAT
from models.visual import VisualEncoder
from tasks.stores.check import check_stores
from tasks.stores.quality import find_feature_tables
from tests.quality.synthetic import broken_extractor_write

pytestmark = pytest.mark.server

COPY = "sample_09999990"  # a labelled clip copied into the unlabelled pool under this name


def _run(corpus, root, tiny_models, *overrides):
    return extract_flow(
        str(corpus),
        profile="demo",
        data_root=str(root),
        overrides=[
            f"models.models_dir={tiny_models}",
            "models.build_tiny=false",
            "extract.shard_size=8",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def extracted(prefect_server, small_corpus, tiny_models, tmp_path_factory):
    """One extraction of the small corpus plus a duplicated clip across the pools."""
    base = tmp_path_factory.mktemp("quality")
    corpus = base / "corpus"
    shutil.copytree(small_corpus, corpus)
    original = sorted((corpus / "video-labeled").glob("*.mp4"))[0]
    shutil.copy(original, corpus / "video-unlabeled" / f"{COPY}.mp4")
    root = base / "root"
    summary = _run(corpus, root, tiny_models)
    return corpus, root, original.stem, summary


@pytest.fixture
def cli():
    from flows.cli_common import MerflowGroup

    app = typer.Typer(cls=MerflowGroup)  # the root command's error rule, as `merflow` has it
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # keeps `check` a named subcommand
    return app


def _copy_root(root, tmp_path):
    mine = tmp_path / "root"
    shutil.copytree(root, mine)
    return mine


def test_every_feature_row_carries_its_provenance(extracted):
    _, root, _, _ = extracted
    store = Store(root)
    try:
        version = importlib.metadata.version("merflow")
    except importlib.metadata.PackageNotFoundError:
        version = None
    found, problems = find_feature_tables(store)
    assert not problems and {ft.modality for ft in found} == {"visual", "acoustic", "text"}
    for ft in found:
        rows = store.read(ft.ref, columns=["video_id", "extractor_id", "provenance"])
        assert len(rows) == 19
        prov = [json.loads(p) for p in rows.provenance]
        assert all(p == prov[0] for p in prov)  # one extractor, one provenance
        p = prov[0]
        assert p["extractor_id"] == ft.extractor_id
        assert ft.extractor_id.endswith("-" + p["settings_hash"])
        assert p["checkpoint"] == f"tiny-seed0-v{TINY_FORMAT}" and p["layers"] >= 1 and p["pooling"]
        assert p["id_settings"]["settings"]["upstream"] == p["upstream"]
        assert p["merflow_version"] == version
        assert p["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])
        if ft.modality == "visual":
            assert p["face_backend"] == "dlib" and p["crop_size"] == 64
            assert p["frame_rate"] == 4.0 and p["face_thresholds"]["min_hog_score"] > 0
            assert p["faces_extractor_id"] == p["upstream"]
        elif ft.modality == "acoustic":
            assert p["sample_rate"] == 16000 and p["upstream"] == "ffmpeg-16k-mono-s16"
        else:
            assert p["max_tokens"] > 0 and p["upstream"].endswith("+official")


def test_duplicated_clip_across_pools_is_reported_as_leakage(extracted):
    _, root, original, _ = extracted
    findings = check_stores(Store(root), n_splits=3, seed=0, write=False)
    dup = [f for f in findings.items if f.code == "duplicate-content-across-pools"]
    assert len(dup) == 1 and dup[0].level == "error"
    assert dup[0].video_ids == tuple(sorted((original, COPY)))
    # The copy's identical features are not reported a second time as near-duplicates.
    for f in findings.items:
        if f.code.startswith("near-duplicate"):
            pairs = {tuple(sorted(p[:2])) for p in f.details["pairs"]}
            assert tuple(sorted((original, COPY))) not in pairs
    assert not [f for f in findings.items if f.code in ("nan-vectors", "zero-vectors")]
    assert {t["rows"] for t in findings.tables} == {19}


def test_nan_vector_of_a_broken_extractor_fails_the_check(extracted, tmp_path, cli):
    _, root, _, _ = extracted
    store = Store(_copy_root(root, tmp_path))
    visual = next(ft for ft in find_feature_tables(store)[0] if ft.modality == "visual")
    nan = np.full(visual.dim, np.nan, dtype=np.float32)
    # The broken tool overwrites one real video's row (its part sorts after the good one).
    vid = "sample_00000002"
    manifest = store.read(tables.MANIFEST)
    sha = manifest.sha256[manifest.video_id == vid].iloc[0]
    broken_extractor_write(store, "visual", visual.extractor_id, visual.dim, vid, nan, sha)
    rows = store.read(visual.ref)
    assert np.isnan(rows[rows.video_id == vid].embedding.iloc[0]).all()

    out = CliRunner().invoke(cli, ["check", str(store.root)])
    assert out.exit_code == 1, out.output
    assert "nan-vectors" in out.output and vid in out.output
    stored = store.read(tables.FINDINGS)
    nan_rows = stored[stored.code == "nan-vectors"]
    assert len(nan_rows) == 1 and nan_rows.level.iloc[0] == "error"
    assert list(nan_rows.video_ids.iloc[0]) == [vid]
    assert (store.root / "reports" / "check.md").read_text().count("nan-vectors") == 1


def test_inspect_prints_everything_known_about_a_video(extracted, cli):
    _, root, original, _ = extracted
    out = CliRunner().invoke(cli, ["inspect", COPY, "--data-root", str(root)])
    assert out.exit_code == 0, out.output
    text = out.output
    for section in ("Manifest", "Artifacts", "Transcripts", "Features", "Failures", "Label"):
        assert f"## {section}" in text
    assert "pool: unlabeled" in text and "(asr" in text  # no official transcript for the copy
    assert text.count('"extractor_id"') == 3 and '"face_backend": "dlib"' in text
    assert "present" in text and "speech_ratio" in text
    labelled = CliRunner().invoke(cli, ["inspect", original, "--data-root", str(root)])
    assert "(official" in labelled.output and "CV fold" in labelled.output
    missing = CliRunner().invoke(cli, ["inspect", "sample_0000002", "--data-root", str(root)])
    assert missing.exit_code == 2 and "did you mean" in missing.output


def test_changed_face_setting_recomputes_only_faces_and_visual(
    extracted, tmp_path, tiny_models, monkeypatch
):
    corpus, root, _, first = extracted
    mine = _copy_root(root, tmp_path)
    store = Store(mine)
    refs = {ft.ref.name: ft.ref for ft in find_feature_tables(store)[0]}
    before = {name: store.read(ref, columns=["created_at"]) for name, ref in refs.items()}
    calls: Counter = Counter()
    for cls, method in (
        (VisualEncoder, "embed"),
        (AcousticEncoder, "embed"),
        (TextEncoder, "embed"),
        (AsrModel, "transcribe"),
    ):
        original = getattr(cls, method)

        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] += 1  # Prefect runs tasks in threads of this process
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counted)

    second = _run(corpus, mine, tiny_models, "faces.size=48")
    assert calls["VisualEncoder"] == second["shards"]  # one batch per shard of <= 8 videos
    assert calls["AcousticEncoder"] == calls["TextEncoder"] == calls["AsrModel"] == 0
    stages = second["stages"]
    for stage in ("audio", "acoustic", "transcribe", "text"):
        assert stages[stage]["processed"] == stages[stage]["failed"] == 0, stage
    assert stages["faces"]["processed"] + stages["faces"]["failed"] == 19
    assert stages["visual"]["processed"] > 0
    assert second["feature_tables"]["visual"] != first["feature_tables"]["visual"]
    new_visual = next(
        ft.ref
        for ft in find_feature_tables(store)[0]
        if ft.ref.name == second["feature_tables"]["visual"]
    )
    prov = json.loads(store.read(new_visual, columns=["provenance"]).provenance.iloc[0])
    assert prov["crop_size"] == 48 and prov["face_backend"] == "dlib"
    for m in ("acoustic", "text"):
        name = first["feature_tables"][m]
        assert second["feature_tables"][m] == name
        assert store.read(refs[name], columns=["created_at"]).equals(before[name])  # untouched

    findings = check_stores(store, n_splits=3, seed=0, write=False)
    drift = [f for f in findings.items if f.code == "drift"]
    assert len(drift) == 1 and drift[0].table == second["feature_tables"]["visual"]
    assert drift[0].details["previous"] == first["feature_tables"]["visual"]
    assert drift[0].details["mean_shift"] > 0 and drift[0].details["rows"][1] == 19
    newest = {t["table"]: t["newest"] for t in findings.tables}
    assert (
        newest[second["feature_tables"]["visual"]] and not newest[first["feature_tables"]["visual"]]
    )


def test_check_flow_publishes_the_report_as_an_artifact(extracted, tmp_path):
    _, root, _, _ = extracted
    mine = _copy_root(root, tmp_path)
    summary = check_flow(str(mine))
    assert summary["errors"] == 1  # the duplicated clip
    report = (mine / "reports" / "check.md").read_text()
    assert summary["check_id"] in report and summary["report"].endswith("reports/check.md")
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and summary["check_id"] in artifact.data
    assert "duplicate-content-across-pools" in artifact.data


def test_check_flow_refuses_a_data_root_outside_the_allowed_roots(extracted, tmp_path, monkeypatch):
    _, root, _, _ = extracted
    mine = _copy_root(root, tmp_path)
    # The extraction flow already ran a check; start from a root without its outputs.
    shutil.rmtree(mine / "reports", ignore_errors=True)
    shutil.rmtree(mine / "stores" / "findings", ignore_errors=True)
    monkeypatch.setenv("MERFLOW_ALLOWED_ROOTS", str(tmp_path / "allowed"))
    with pytest.raises(UnsafeParameterError, match="outside the allowed roots"):
        check_flow(str(mine))
    # Send the failed run's error log now, while the session's server still listens.
    APILogWorker.drain_all(timeout=5)
    assert not (mine / "reports").exists() and not (mine / "stores" / "findings").exists()
