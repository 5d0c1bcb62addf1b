"""`merflow check` and `merflow inspect` on videos imported without their files: they see the
videos training takes (the manifest's and the feature-only ones), so a features-only store
checks clean, feature-only rows are current, and the leakage and fold checks cover them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.labels import CLASSES, MODALITIES
from data_contracts.store import Store
from flows.cli import app
from tasks.stores.check import check_stores
from tasks.stores.import_features import NO_VIDEO, import_features
from tasks.training.folds import fold_assignment
from tests.quality.synthetic import make_root, manifest_rows

IDS = [f"mer_{i:02d}" for i in range(30)]
LABELLED = IDS[:20]
DIM = 8


def _npy_folder(folder, vectors: dict[str, np.ndarray]) -> None:
    """MERTools' layout: one <video_id>.npy per video."""
    folder.mkdir(parents=True, exist_ok=True)
    for v, x in vectors.items():
        np.save(folder / f"{v}.npy", x.astype(np.float32))


def _random(ids, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v: rng.normal(size=DIM) for v in ids}


def _merflow(*args: str):
    return CliRunner().invoke(app, list(args))


def _codes(findings, level=None) -> set[str]:
    return {f.code for f in findings.items if level is None or f.level == level}


def _only(findings, code, table=None):
    found = [f for f in findings.items if f.code == code and table in (None, f.table)]
    assert len(found) == 1, [(f.code, f.table) for f in findings.items]
    return found[0]


@pytest.fixture
def features_only(tmp_path) -> tuple[Store, tuple[str, str], tuple[str, str]]:
    """A data root made by `import-features --without-videos` alone (no manifest), 20 of its 30
    ids labelled; acoustic lacks one id and holds two planted near-copies: a labelled id ~ an
    unlabelled one, and two labelled ids in different CV folds."""
    root = tmp_path / "root"
    store = Store(root)
    for modality, seed in (("visual", 0), ("text", 1)):
        _npy_folder(tmp_path / modality, _random(IDS, seed))
        said = _merflow(
            "import-features", modality, "mer", str(tmp_path / modality),
            "--data-root", str(root), "--without-videos",
        )  # fmt: skip
        assert said.exit_code == 0, said.output
    labels = [CLASSES[i % 4] for i in range(len(LABELLED))]  # 5 a class: the default 5 folds
    store.upsert(
        tables.LABELS, pd.DataFrame({"video_id": LABELLED, "label": labels, "source": "l.csv"})
    )
    folds = fold_assignment(store, 3, 0).folds
    a = LABELLED[0]
    b = next(v for v in LABELLED if folds[v] != folds[a])
    acoustic = _random(IDS[:-1], 2)  # IDS[-1] has no acoustic features
    acoustic[b] = acoustic[a] + 1e-4  # across folds
    acoustic[IDS[25]] = acoustic[LABELLED[5]] + 1e-4  # across pools
    _npy_folder(tmp_path / "acoustic", acoustic)
    said = _merflow(
        "import-features", "acoustic", "mer", str(tmp_path / "acoustic"),
        "--data-root", str(root), "--without-videos",
    )  # fmt: skip
    assert said.exit_code == 0, said.output
    assert not store.exists(tables.MANIFEST)
    return store, (a, b), (LABELLED[5], IDS[25])


def test_a_features_only_store_checks_clean_with_its_videos_current(features_only):
    store, across_folds, across_pools = features_only
    out = _merflow("check", str(store.root), "--n-splits", "3", "--seed", "0")
    assert out.exit_code == 0, out.output  # warnings only: the planted near-copies
    findings = check_stores(store, 3, 0, write=False)
    codes = _codes(findings)
    assert not _codes(findings, "error"), findings.markdown()
    assert not codes & {"no-manifest", "stale-rows", "not-extracted"}, codes
    assert not any(c.startswith("duplicate-content") for c in codes)  # no-video is no digest
    kind = _only(findings, "features-only-store")
    assert kind.level == "info" and kind.video_ids == tuple(IDS)
    for summary in findings.tables:  # every row is of a current video
        assert summary["current"] == summary["rows"] and summary["stale"] == 0
    acoustic = "features/acoustic/imported-mer"
    missing = _only(findings, "missing-modality", acoustic)
    assert missing.level == "info" and missing.video_ids == (IDS[-1],)
    assert missing.details["reason"] == "feature-only, not in this table"
    pools = _only(findings, "near-duplicate-across-pools", acoustic)
    assert [p[:2] for p in pools.details["pairs"]] == [list(across_pools)]
    folds = _only(findings, "near-duplicate-across-folds", acoustic)
    assert [sorted(p[:2]) for p in folds.details["pairs"]] == [sorted(across_folds)]
    assert "near-duplicate-across-pools" in out.output and "features-only-store" in out.output


def test_the_fold_preview_is_the_folds_training_makes_over_feature_only_videos(features_only):
    from tasks.training.data import load_training_data, with_folds

    store, _, _ = features_only
    refs = {m: tables.features(m, "imported-mer", DIM) for m in MODALITIES}
    trained = with_folds(load_training_data(store, refs), 3, 0)
    training = dict(zip(trained.labelled.video_ids, trained.folds.tolist(), strict=True))
    preview = fold_assignment(store, 3, 0)
    assert sorted(preview.folds) == LABELLED and preview.folds == training


def test_inspect_shows_a_feature_only_video(features_only):
    store, _, _ = features_only
    root = ["--data-root", str(store.root)]
    out = _merflow("inspect", IDS[0], *root)
    assert out.exit_code == 0, out.output
    text = out.output
    assert "## Manifest (none: a feature-only video)" in text
    assert f"sha256: {NO_VIDEO}" in text and "pool: labeled" in text
    for modality in MODALITIES:
        assert f"features/{modality}/imported-mer: dim {DIM}, 1 items" in text
    assert "[older bytes]" not in text
    assert "CV fold" in text and "preview" in text  # the default 5 folds, none run yet
    unknown = _merflow("inspect", "mer_3", *root)
    assert unknown.exit_code == 2 and "did you mean" in unknown.output
    assert "nor imported without its video file" in unknown.output


def test_feature_only_rows_beside_a_manifest_and_the_manifest_winning(tmp_path):
    """Feature-only rows next to scanned videos are current; once the manifest holds an id, its
    feature-only rows are stale (training ignores them) and the id is a manifest video again."""
    store, ids, _ = make_root(tmp_path / "root")
    ghosts = ["ghost_0", "ghost_1"]
    _npy_folder(tmp_path / "npy", _random([*ids[:4], *ghosts], 3))
    import_features(store, "acoustic", "m", tmp_path / "npy", without_videos=True)
    f = check_stores(store, write=False)
    assert "stale-rows" not in _codes(f) and not f.has_errors
    mixed = _only(f, "feature-only-videos")
    assert mixed.level == "info" and mixed.video_ids == tuple(ghosts)
    assert "besides the manifest's 36" in mixed.message
    # The visual table holds no ghost: training masks their visual, nothing is to extract.
    visual = _only(f, "missing-modality", "features/visual/vis-a")
    assert visual.video_ids == tuple(ghosts) and visual.level == "info"
    assert not [x for x in f.items if x.code == "not-extracted" and x.table == visual.table]

    store.upsert(tables.MANIFEST, manifest_rows(["ghost_0"], ["unlabeled"]))  # scanned since
    f = check_stores(store, write=False)
    stale = _only(f, "stale-rows", "features/acoustic/imported-m")
    assert stale.video_ids == ("ghost_0",) and "feature-only rows of ids" in stale.message
    assert _only(f, "feature-only-videos").video_ids == ("ghost_1",)
    assert "ghost_0" in _only(f, "not-extracted", "features/acoustic/imported-m").video_ids
    shown = _merflow("inspect", "ghost_0", "--data-root", str(store.root)).output
    assert "## Manifest\n" in shown and "[feature-only, not used" in shown
