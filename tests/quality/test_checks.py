"""The store check on small synthetic data roots: each planted problem is reported, nothing else."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.labels import MODALITIES
from data_contracts.store import Store
from flows.quality_cli import register
from tasks.engine.errors import BadInputError
from tasks.stores.check import check_stores
from tasks.stores.quality import near_duplicate_pairs, quality_mask, quality_signals
from tasks.training.folds import fold_assignment
from tests.data_contracts.old_layouts import FACES_V1, v1_rows, v2_rows
from tests.quality.synthetic import (
    add_failure,
    broken_extractor_write,
    feature_rows,
    make_root,
    manifest_rows,
    sha,
)


def _codes(findings, level=None):
    return {f.code for f in findings.items if level is None or f.level == level}


def _one(findings, code):
    found = [f for f in findings.items if f.code == code]
    assert len(found) == 1, [f.code for f in findings.items]
    return found[0]


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # keeps `check` a named subcommand
    return app


def test_near_duplicate_blocks_match_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[250] = x[10] + 1e-3  # planted near-copies
    x[120] = x[40] * 2.0  # same direction, other scale: cosine 1
    a, b = np.arange(0, 200), np.arange(200, 300)
    i, j, cos, total = near_duplicate_pairs(x, a, b, threshold=0.95, block=7)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit[a] @ unit[b].T
    ii, jj = np.nonzero(sim > 0.95)
    assert {(int(p), int(q)) for p, q in zip(i, j, strict=True)} == {
        (int(a[p]), int(b[q])) for p, q in zip(ii, jj, strict=True)
    }
    assert total == len(ii) and (10, 250) in set(zip(i.tolist(), j.tolist(), strict=True))
    np.testing.assert_allclose(cos, np.sum(unit[i] * unit[j], axis=1), rtol=1e-5)
    # Within one set: each pair once, never a row with itself.
    i, j, _, _ = near_duplicate_pairs(x, np.arange(300), None, threshold=0.95, block=16)
    full = unit @ unit.T
    want = {(p, q) for p, q in zip(*np.nonzero(np.triu(full, 1) > 0.95), strict=True)}
    assert {(int(p), int(q)) for p, q in zip(i, j, strict=True)} == want
    assert (40, 120) in want


def test_near_duplicate_search_never_holds_an_n_by_n_matrix():
    x = np.random.default_rng(2).normal(size=(3000, 16)).astype(np.float32)
    tracemalloc.start()
    near_duplicate_pairs(x, np.arange(3000), None, threshold=0.99, block=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3000 * 3000 * 4 / 8, peak  # an N x N float32 matrix would be 36 MB


def test_clean_root_passes_and_a_broken_extractors_nan_fails(tmp_path, cli):
    store, ids, _ = make_root(tmp_path / "root")
    clean = CliRunner().invoke(cli, ["check", str(store.root), "--n-splits", "3"])
    assert clean.exit_code == 0, clean.output
    assert "0 error(s)" in clean.output and "features/visual/vis-a" in clean.output

    bad = np.full(16, np.nan, dtype=np.float32)
    broken_extractor_write(store, "visual", "vis-a", 16, ids[3], bad)
    out = CliRunner().invoke(cli, ["check", str(store.root), "--n-splits", "3"])
    assert out.exit_code == 1, out.output
    assert "nan-vectors" in out.output and ids[3] in out.output
    finding = _one(check_stores(store, n_splits=3, write=False), "nan-vectors")
    assert finding.level == "error" and finding.video_ids == (ids[3],)


def test_zero_and_outlying_vectors(tmp_path):
    store, ids, x = make_root(tmp_path / "root", dim=16)
    x = x.copy()
    x[5] = 0.0
    x[6] *= 40.0
    store.upsert(tables.features("visual", "vis-a", 16), feature_rows(ids, x, "vis-a"))
    f = check_stores(store, n_splits=3, write=False)
    assert _one(f, "zero-vectors").video_ids == (ids[5],)
    assert _one(f, "zero-vectors").level == "error"
    outliers = _one(f, "outlying-norms")
    assert outliers.level == "warning" and outliers.video_ids == (ids[6],)


def test_identical_bytes_across_pools_is_an_error(tmp_path):
    store, ids, _ = make_root(tmp_path / "root")
    copy = manifest_rows(["sample_09000000"], ["unlabeled"], [sha(ids[0])])
    store.upsert(tables.MANIFEST, copy)
    f = check_stores(store, n_splits=3, write=False)
    dup = _one(f, "duplicate-content-across-pools")
    assert dup.level == "error" and dup.video_ids == (ids[0], "sample_09000000")
    assert f.has_errors


def test_near_duplicate_features_across_pools_and_folds(tmp_path):
    store, ids, x = make_root(tmp_path / "root", n_labelled=24, n_unlabelled=12)
    folds = fold_assignment(store, 3, 0).folds
    spare = ids[3:24]
    other = next(v for v in spare if folds[v] != folds[ids[0]])
    same = next(v for v in spare if folds[v] == folds[ids[1]] and v != other)
    x = x.copy()
    noise = 1e-3 * np.random.default_rng(5).normal(size=(3, 16))
    x[ids.index(other)] = x[0] + noise[0]  # a re-encoded copy in another fold: leakage
    x[ids.index(same)] = x[1] + noise[1]  # a copy in the same fold: validated together
    x[30] = x[2] + noise[2]  # a labelled clip's copy in the unlabelled pool
    store.upsert(tables.features("visual", "vis-a", 16), feature_rows(ids, x, "vis-a"))
    f = check_stores(store, n_splits=3, seed=0, write=False)
    pools = _one(f, "near-duplicate-across-pools")
    assert pools.level == "warning" and pools.video_ids == tuple(sorted((ids[2], ids[30])))
    assert pools.details["pairs"][0][2] > 0.99
    across = _one(f, "near-duplicate-across-folds")
    assert across.level == "warning" and across.video_ids == tuple(sorted((ids[0], other)))
    assert not f.has_errors


def test_folds_are_the_ones_training_makes(tmp_path):
    """Before any run, check and inspect show the folds training would make over the rows it
    trains on (a labelled video without features is not one of them); after a run, the run's
    own folds, named as such."""
    from tasks.training.data import load_training_data, with_folds
    from tasks.training.folds import fold_assignment, run_assignment, save_folds

    store, _, _ = make_root(tmp_path / "root", n_labelled=24)
    empty = manifest_rows(["sample_00000100"], ["labeled"])  # a zero-byte video: no features
    store.upsert(tables.MANIFEST, empty)
    store.upsert(
        tables.LABELS,
        pd.DataFrame({"video_id": ["sample_00000100"], "label": ["sad"], "source": "x.csv"}),
    )
    refs = {m: tables.features(m, f"{m}-a" if m != "visual" else "vis-a", 16) for m in MODALITIES}
    trained = with_folds(load_training_data(store, refs), 3, 0)
    training = dict(zip(trained.labelled.video_ids, trained.folds.tolist(), strict=True))
    preview = fold_assignment(store, 3, 0)
    assert preview.folds == training and preview.run_key is None
    assert "preview" in preview.source
    with pytest.raises(ValueError, match="cannot make 30 folds"):
        fold_assignment(store, 30, 0)

    lab = trained.labelled
    run = run_assignment(lab.video_ids, lab.labels, 3, 0, run_key="abc123")
    save_folds(run, tmp_path / "run", store)
    assert fold_assignment(store) == run  # the latest run's, whatever the defaults say
    assert fold_assignment(store, 4, 0).run_key is None  # other folds asked for: a preview
    f = check_stores(store, write=False)
    assert "training run abc123" in f.markdown()


def test_the_fold_preview_uses_the_tables_the_saved_settings_train_on(tmp_path):
    """A labelled video whose only features are in a newer visual table is in the preview's
    folds by default, and not when the saved settings train on the older table."""
    import yaml

    from tasks.training.folds import fold_assignment

    store, ids, x = make_root(tmp_path / "root", n_labelled=24)
    new = "sample_00000100"
    store.upsert(tables.MANIFEST, manifest_rows([new], ["labeled"]))
    labels = pd.DataFrame({"video_id": [new], "label": ["sad"], "source": "x.csv"})
    store.upsert(tables.LABELS, labels)
    rows = feature_rows([*ids, new], np.vstack([x, x[:1]]), "vis-new", minute=5)
    store.upsert(tables.features("visual", "vis-new", 16), rows)
    assert new in fold_assignment(store, 3, 0).folds  # the newest table has it
    train = {"n_splits": 3, "seed": 0, "feature_tables": {"visual": "vis-a"}}
    store.write_text("runs/extract-settings.yaml", yaml.safe_dump({"train": train}))
    preview = fold_assignment(store)
    assert new not in preview.folds and len(preview.folds) == 24


def test_drift_and_not_comparable(tmp_path):
    store, ids, x = make_root(tmp_path / "root", dim=16)
    shifted = x + 2.0  # a re-extraction whose features moved by about two SDs
    store.upsert(
        tables.features("visual", "vis-b", 16), feature_rows(ids, shifted, "vis-b", minute=5)
    )
    rng = np.random.default_rng(3)
    store.upsert(
        tables.features("acoustic", "ac-a", 8), feature_rows(ids, rng.normal(size=(36, 8)), "ac-a")
    )
    store.upsert(
        tables.features("acoustic", "ac-b", 12),
        feature_rows(ids, rng.normal(size=(36, 12)), "ac-b", minute=5),
    )
    f = check_stores(store, n_splits=3, write=False)
    drift = _one(f, "drift")
    assert drift.level == "warning" and drift.table == "features/visual/vis-b"
    assert drift.details["previous"] == "features/visual/vis-a"
    assert 1.5 < drift.details["mean_shift"] < 2.5
    assert abs(drift.details["std_ratio_median"] - 1.0) < 1e-3
    other = _one(f, "drift-not-comparable")
    assert other.table == "features/acoustic/ac-b" and "dims 12 vs 8" in other.message
    newest = {t["table"]: t["newest"] for t in f.tables}
    assert newest["features/visual/vis-b"] and not newest["features/visual/vis-a"]


def test_same_features_under_a_new_id_is_info_level_drift(tmp_path):
    store, ids, x = make_root(tmp_path / "root", dim=16)
    store.upsert(tables.features("visual", "vis-b", 16), feature_rows(ids, x, "vis-b", minute=5))
    drift = _one(check_stores(store, n_splits=3, write=False), "drift")
    assert drift.level == "info" and drift.details["mean_shift"] < 1e-6


def test_missing_modalities_by_reason(tmp_path):
    store, ids, _ = make_root(tmp_path / "root", dim=16)
    keep = [v for v in ids if v not in ids[:3]]
    ref = tables.features("visual", "vis-a", 16)
    store.delete(ref, {(v, sha(v), "vis-a") for v in ids[:3]})
    add_failure(store, ids[0], "faces", "NoFaceError: no face in 12 sampled frames", "faces-x")
    add_failure(store, ids[0], "visual", "MissingModalityError: no crops", "vis-a")
    add_failure(store, ids[1], "visual", "OSError: crops file unreadable", "vis-a")
    f = check_stores(store, n_splits=3, write=False)
    summary = next(t for t in f.tables if t["table"] == ref.name)
    assert summary["rows"] == len(keep)
    assert summary["missing"] == {"faces: NoFaceError": 1, "not extracted": 1, "visual: OSError": 1}
    reasons = {
        f_.details.get("reason"): f_.video_ids for f_ in f.items if f_.code == "missing-modality"
    }
    assert reasons == {"faces: NoFaceError": (ids[0],), "visual: OSError": (ids[1],)}
    assert _one(f, "not-extracted").video_ids == (ids[2],)


def test_findings_table_and_markdown_report(tmp_path):
    store, ids, _ = make_root(tmp_path / "root")
    f = check_stores(store, n_splits=3)
    stored = store.read(tables.FINDINGS)
    assert set(stored.check_id) == {f.check_id} and len(stored) == len(f.items)
    table_row = stored[stored.code == "table"].iloc[0]
    assert json.loads(table_row.details)["rows"] == len(ids)
    report = (store.root / "reports" / "check.md").read_text()
    assert report == f.markdown() and f"merflow check `{f.check_id}`" in report
    part = next(store.table_dir(tables.FINDINGS).glob("part-*.parquet"))
    assert pq.read_schema(part).metadata[b"merflow.contract"] == b"findings"
    second = check_stores(store, n_splits=3)
    assert store.read(tables.FINDINGS).check_id.nunique() == 2 and second.check_id != f.check_id


def test_contract_mismatch_and_not_a_data_root(tmp_path):
    store, _, _ = make_root(tmp_path / "root")
    part = next(store.table_dir(tables.features("visual", "vis-a", 16)).glob("part-*.parquet"))
    t = pq.read_table(part)
    meta = dict(t.schema.metadata)
    meta[b"merflow.contract_version"] = b"0"
    pq.write_table(t.replace_schema_metadata(meta), part)
    f = check_stores(store, n_splits=3, write=False)
    mismatch = _one(f, "contract-mismatch")
    assert mismatch.level == "error" and "version 1" in mismatch.message
    with pytest.raises(BadInputError, match="not a merflow data root"):
        check_stores(Store(tmp_path / "elsewhere"))


def _signal_rows(store, ids):
    now = pd.Timestamp("2026-01-01", tz="UTC")
    store.upsert(
        tables.FACES,
        pd.DataFrame(
            {
                "video_id": ids[:3], "sha256": [sha(v) for v in ids[:3]], "extractor_id": "faces-x",
                "path": "x.npz", "backend": "dlib", "n_frames_decoded": 10,
                "n_frames_sampled": 10, "n_faces": [10, 2, 0], "face_ratio": [1.0, 0.2, 0.0],
                "mean_confidence": [1.2, 0.4, None], "crop_size": 64, "created_at": now,
                "any_face_ratio": [1.0, 0.9, 0.0], "n_faces_all": [10, 12, 0],
                "n_tracks": [1, 2, 0], "select_rule": ["largest", "speaking", "speaking"],
                "chosen_track": [0, 1, -1], "select_score": [None, 0.45, None],
                "select_reason": "why",
            }
        ),
    )  # fmt: skip
    store.upsert(
        tables.AUDIO,
        pd.DataFrame(
            {
                "video_id": ids[:3], "sha256": [sha(v) for v in ids[:3]], "extractor_id": "ff",
                "path": "x.wav", "sample_rate": 16000, "n_samples": 32000, "duration": 2.0,
                "speech_ratio": [0.6, 0.05, None], "created_at": now,
            }
        ),
    )  # fmt: skip
    store.upsert(
        tables.TRANSCRIPTS,
        pd.DataFrame(
            {
                "video_id": ids[:3], "sha256": [sha(v) for v in ids[:3]], "extractor_id": "asr",
                "text": ["你好", "嗯", "今天很好"], "source": ["asr", "asr", "official"],
                "confidence": [0.9, 0.1, None], "n_chars": [2, 1, 4], "created_at": now,
            }
        ),
    )  # fmt: skip


def test_quality_signals_and_masks(tmp_path):
    store, ids, _ = make_root(tmp_path / "root")
    _signal_rows(store, ids)
    s = quality_signals(store).set_index("video_id")
    assert s.loc[ids[1], "face_ratio"] == pytest.approx(0.2)
    assert s.loc[ids[0], "asr_confidence"] == pytest.approx(0.9)
    assert s.loc[ids[2], "transcript_source"] == "official" and np.isnan(
        s.loc[ids[5], "face_ratio"]
    )
    # The speaking face's score; NaN where the rule scores nothing (largest) or no row.
    assert s.loc[ids[1], "speaker_score"] == pytest.approx(0.45)
    assert np.isnan(s.loc[ids[0], "speaker_score"]) and np.isnan(s.loc[ids[5], "speaker_score"])

    off = quality_mask(store, ids)
    assert all(m.all() and m.shape == (len(ids),) for m in off.values())
    masks = quality_mask(
        store, ids[:4], min_face_ratio=0.5, min_speech_ratio=0.1, min_asr_confidence=0.5,
        min_transcript_chars=2,
    )  # fmt: skip
    # ids[2]: no face (0.0) is masked; unknown speech ratio keeps; its official transcript is
    # not judged by ASR confidence. ids[3]: no signals at all, nothing masked.
    assert masks["visual"].tolist() == [True, False, False, True]
    assert masks["acoustic"].tolist() == [True, False, True, True]
    assert masks["text"].tolist() == [True, False, True, True]


def test_quality_signals_of_an_old_faces_table(tmp_path):
    """A faces table of contract version 1 (before the selection columns) still gives its
    signals: face ratios as stored, speaker score unknown, nothing masked by default."""
    store, ids, _ = make_root(tmp_path / "root")
    store.upsert(FACES_V1, v1_rows(ids[:2], 3, [sha(v) for v in ids[:2]]))
    store.upsert(tables.FACES, v2_rows(ids[2:3], 0.6, [sha(ids[2])]))
    s = quality_signals(store).set_index("video_id")
    assert s.loc[ids[:3], "face_ratio"].tolist() == pytest.approx([0.3, 0.3, 0.6])
    assert s.loc[ids[:2], "speaker_score"].isna().all()
    assert s.loc[ids[2], "speaker_score"] == pytest.approx(0.6)
    assert all(m.all() for m in quality_mask(store, ids, signals=s.reset_index()).values())
    f = check_stores(store, n_splits=3, write=False)
    assert "speaker_score" in f.markdown() and "contract-mismatch" not in _codes(f)
