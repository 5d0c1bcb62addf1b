"""Train on features brought from elsewhere (docs/import.md): the videos are scanned, their
MERTools-layout .npy features (and a Parquet table) imported, and `merflow train` runs from the
stores and a label CSV alone: no corpus folder, no model checkpoint built, no extraction; and
with no videos at all, the features imported --without-videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.labels import CLASS_INDEX
from data_contracts.store import Store
from flows.cli import app

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DIMS = {"visual": 16, "acoustic": 12, "text": 8}
FAST = [
    "train.n_splits=2",
    "train.pretrain_epochs=2",
    "train.max_epochs=15",
    "train.final_epochs=15",
    "train.threads=1",  # a second thread on a busy 2-core machine spins (models/settings.py)
]


def _features(truth: pd.DataFrame, out, seed: int = 0, text_npy: bool = False) -> None:
    """Each video's features: its class's centroid plus noise (every modality carries the
    class), as MERTools writes them: visual frame-level (T, D) .npy files, acoustic
    utterance-level (D,) ones; text as a Parquet table of MER's `name` and a vector column
    (`text_npy`: (D,) .npy files too)."""
    rng = np.random.default_rng(seed)
    labels = truth.discrete.map(CLASS_INDEX).to_numpy()
    centroids = {m: rng.normal(size=(6, d)) * 2 for m, d in DIMS.items()}
    for m in ("visual", "acoustic"):
        (out / m).mkdir(parents=True)
    for name, y in zip(truth.name, labels, strict=True):
        frames = rng.integers(2, 6)
        visual = centroids["visual"][y] + rng.normal(size=(frames, DIMS["visual"]))
        np.save(out / "visual" / f"{name}.npy", visual.astype(np.float32))
        acoustic = centroids["acoustic"][y] + rng.normal(size=DIMS["acoustic"])
        np.save(out / "acoustic" / f"{name}.npy", acoustic.astype(np.float32))
    text = centroids["text"][labels] + rng.normal(size=(len(labels), DIMS["text"]))
    if text_npy:
        (out / "text").mkdir()
        for name, vector in zip(truth.name, text.astype(np.float32), strict=True):
            np.save(out / "text" / f"{name}.npy", vector)
        return
    pd.DataFrame({"name": truth.name, "feature": list(text.astype(np.float32))}).to_parquet(
        out / "text.parquet"
    )


def _merflow(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _train_on(root, labels, table: str) -> tuple[str, Path, dict]:
    """`merflow train` from the stores alone on the table `table` of every modality: what it
    said, its report folder and its report."""
    chosen = "{" + ", ".join(f"{m}: {table}" for m in DIMS) + "}"
    said = _merflow(
        "train", "--data-root", str(root), "--labels", str(labels),
        f"train.feature_tables={chosen}", *FAST,
    )  # fmt: skip
    report_dir = next((root / "runs").glob("train-*/report"))
    return said, report_dir, json.loads((report_dir / "report.json").read_text())


def test_train_on_imported_mertools_features_without_a_corpus_folder(prefect_server, tmp_path):
    from tasks.demo.corpus import make_demo_corpus

    corpus, root = tmp_path / "corpus", tmp_path / "root"
    make_demo_corpus(corpus, n_labelled=36, n_unlabelled=12, seed=5)
    videos = [str(corpus / "video-labeled"), str(corpus / "video-unlabeled")]
    _merflow("scan", *videos, "--data-root", str(root))  # hashes and probes only
    truth = pd.read_csv(corpus / "demo-truth.csv")
    _features(truth, tmp_path / "mertools")
    for modality, source in (
        ("visual", "visual"),
        ("acoustic", "acoustic"),
        ("text", "text.parquet"),
    ):
        said = _merflow(
            "import-features", modality, "mertools", str(tmp_path / "mertools" / source),
            "--data-root", str(root),
        )  # fmt: skip
        assert f"features/{modality}/imported-mertools: 48 rows written" in said

    said, report_dir, report = _train_on(root, corpus / "label-disdim.csv", "imported-mertools")
    assert report["extractor_ids"] == dict.fromkeys(DIMS, "imported-mertools")
    assert report["n_labelled"] == 36 and str(report_dir) in said
    assert report["mean_waf"] > 0.6, report["fold_waf"]  # chance is ~0.2
    submission = pd.read_csv(report_dir / "submission.csv")
    unlabelled = truth[truth.pool == "unlabeled"].set_index("name")
    assert sorted(submission.name) == sorted(unlabelled.index)
    hit = (unlabelled.loc[submission.name, "discrete"].to_numpy() == submission.discrete).mean()
    assert hit > 0.5
    # The labels came from --labels; nothing was extracted and no checkpoint was built.
    assert len(Store(root).read(tables.LABELS)) == 36
    assert not (root / "models").exists() and not (root / "artifacts").exists()


def test_train_on_features_without_any_video(prefect_server, tmp_path):
    """MER2024's released features and a label CSV, no video file anywhere: the three folders
    are imported --without-videos into a data root without a manifest, and `merflow train`
    trains on them and writes the submission of the unlabelled ids."""
    rng = np.random.default_rng(3)
    classes = np.array(list(CLASS_INDEX))
    names = [f"sample_{i:05d}" for i in range(48)]
    truth = pd.DataFrame({"name": names, "discrete": classes[np.arange(48) % 6]})
    truth["discrete"] = rng.permutation(truth.discrete.to_numpy())
    labelled, unlabelled = truth.iloc[:36], truth.iloc[36:]
    labelled.to_csv(tmp_path / "label-disdim.csv", index=False)
    _features(truth, tmp_path / "mer2024", seed=1, text_npy=True)
    root = tmp_path / "root"
    for modality in DIMS:
        said = _merflow(
            "import-features", modality, "mer2024", str(tmp_path / "mer2024" / modality),
            "--data-root", str(root), "--without-videos",
        )  # fmt: skip
        assert f"features/{modality}/imported-mer2024: 48 rows written" in said
        assert "imported without videos (feature-only, sha256 no-video): 48" in said
    assert not Store(root).exists(tables.MANIFEST)

    said, report_dir, report = _train_on(root, tmp_path / "label-disdim.csv", "imported-mer2024")
    assert str(report_dir) in said
    assert (report["n_labelled"], report["n_unlabelled"]) == (36, 12)
    assert report["mean_waf"] > 0.5, report["fold_waf"]  # chance is ~0.17
    submission = pd.read_csv(report_dir / "submission.csv")
    assert sorted(submission.name) == sorted(unlabelled.name)
    expected = unlabelled.set_index("name").loc[submission.name, "discrete"].to_numpy()
    assert (expected == submission.discrete.to_numpy()).mean() > 0.5
    assert not Store(root).exists(tables.MANIFEST)  # nothing invented for the videos
    assert not (root / "models").exists() and not (root / "artifacts").exists()


def test_the_paper_profile_trains_on_imported_features_without_naming_them(
    prefect_server, tmp_path
):
    """A features-only store (MER2024's features imported --without-videos, no extraction
    checkpoint anywhere) trains with `--profile paper` and no train.feature_tables: each
    modality's only stored table is used, and the output says so, one line per modality."""
    rng = np.random.default_rng(4)
    classes = np.array(list(CLASS_INDEX))
    names = [f"sample_{i:05d}" for i in range(48)]
    truth = pd.DataFrame({"name": names, "discrete": rng.permutation(classes[np.arange(48) % 6])})
    truth.iloc[:36].to_csv(tmp_path / "label-disdim.csv", index=False)
    _features(truth, tmp_path / "mer2024", seed=2, text_npy=True)
    root = tmp_path / "root"
    for modality in DIMS:
        _merflow(
            "import-features", modality, "mer2024", str(tmp_path / "mer2024" / modality),
            "--data-root", str(root), "--without-videos",
        )  # fmt: skip
    small = [
        "train.n_splits=2", "train.hidden=16", "train.batch_size=16", "train.max_epochs=2",
        "train.final_epochs=2", "train.pretrain_epochs=2", "train.threads=1", "train.device=cpu",
        "train.oversample_step1={sad: 8, worried: 8, surprise: 8}",
        "train.oversample_step2={sad: 10, worried: 10, surprise: 10}",
    ]  # fmt: skip
    said = _merflow(
        "train", "--profile", "paper", "--data-root", str(root),
        "--labels", str(tmp_path / "label-disdim.csv"), *small,
    )  # fmt: skip
    for m in DIMS:
        line = f"- {m}: features/{m}/imported-mer2024 (the only stored {m} table; "
        assert line in said, said
    report_dir = next((root / "runs").glob("train-*/report"))
    report = json.loads((report_dir / "report.json").read_text())
    assert report["extractor_ids"] == dict.fromkeys(DIMS, "imported-mer2024")
    assert (report["n_labelled"], report["n_unlabelled"]) == (36, 12)
    assert set(report["feature_tables"]) == set(DIMS)
    # No extraction checkpoint was looked up to be built, nor anything extracted.
    assert not (root / "models").exists() and not (root / "artifacts").exists()


def test_without_a_plan_table_each_modality_falls_back_to_its_only_or_newest_table(tmp_path):
    """What training falls back on (tasks/stores/quality.py stored_table_choice): a modality's only
    stored table, or the newest of several, said so."""
    import time

    from tasks.stores.import_features import import_features
    from tasks.stores.quality import stored_table_choice

    names = [f"sample_{i:05d}" for i in range(12)]
    truth = pd.DataFrame({"name": names, "discrete": list(CLASS_INDEX) * 2})
    _features(truth, tmp_path / "mer2024", text_npy=True)
    store = Store(tmp_path / "root")
    import_features(store, "visual", "older", tmp_path / "mer2024" / "visual", True)
    time.sleep(1.1)  # a later created_at
    for m in DIMS:
        import_features(store, m, "mer2024", tmp_path / "mer2024" / m, True)
    chosen = stored_table_choice(store, ["visual", "acoustic"])
    assert set(chosen) == {"visual", "acoustic"}
    assert chosen["visual"][0].name == "features/visual/imported-mer2024"
    assert chosen["visual"][1] == "the newest of 2 stored visual tables (also imported-older)"
    assert chosen["acoustic"][1] == "the only stored acoustic table"
