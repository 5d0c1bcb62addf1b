"""`merflow ablate` on the demo corpus: Table 1's rows over two seeds from separate train
flow runs side by side, one pretraining per pretraining key, and a second invocation that
trains nothing; and the pretraining step those runs share, raced by two runs at once."""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data_contracts.labels import MODALITIES
from flows.ablate import ablate_flow
from flows.extract import extract_flow
from models.epoch_reports import EPOCH_RECORD
from tasks.training.ablate_report import BASELINE, BASELINE_OVERSAMPLED, SYSTEMS
from tasks.training.data import TrainingData
from tasks.training.steps import pretrain_step
from tests.models.synthetic import make_featureset
from tests.models.test_training import small_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "train.n_splits=2",
    "train.pretrain_epochs=1",
    "train.final_epochs=2",
    "train.max_epochs=2",
]
# Pretraining keeps these apart from the full method: no pretraining at all, and NEE's noisy
# view is part of the pretraining loss.
OWN_PRETRAINING = {"no_pretraining", "no_nee"}


@pytest.fixture(scope="module")
def extracted(prefect_server, tiny_models, tmp_path_factory):
    """36 labelled + 12 unlabelled demo clips, extracted once: corpus, data root, overrides."""
    from tasks.demo.corpus import make_demo_corpus

    base = tmp_path_factory.mktemp("ablate")
    corpus, root = base / "corpus", base / "root"
    make_demo_corpus(corpus, n_labelled=36, n_unlabelled=12, seed=5)
    models = [f"models.models_dir={tiny_models}", "models.build_tiny=false"]
    extract_flow(str(corpus), profile="demo", data_root=str(root), overrides=models)
    return corpus, root, [*models, *TINY]


def _ablate(extracted):
    corpus, root, overrides = extracted
    return ablate_flow(
        str(corpus), profile="demo", data_root=str(root), overrides=overrides, seeds=2, parallel=2
    )


def _epochs(caplog) -> dict[str, int]:
    """Epochs trained per stage kind (pretrain, step1, baseline, ..., step2) while capturing."""
    counts: dict[str, int] = {}
    for record in caplog.records:
        if (report := getattr(record, EPOCH_RECORD, None)) is not None:
            kind = report.stage.split()[-1]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _step_files(root: Path) -> dict[str, int]:
    """mtime of every step's done.json under runs/."""
    return {str(p): p.stat().st_mtime_ns for p in (root / "runs").glob("train-*/*/done.json")}


def _pretrain_key(run_dir: Path) -> str | None:
    return json.loads((run_dir / "pretrain" / "done.json").read_text()).get("pretrain_key")


def test_runs_racing_for_one_pretraining_train_it_once(tmp_path, caplog):
    """Two train-flow run folders pretrain at once with one pretraining key: one trains, the
    other waits and links the same files. Settings pretraining does not read share it; NEE,
    the seed and a run folder outside runs/ do not."""
    caplog.set_level(logging.INFO, logger="models.training")
    data = TrainingData(
        labelled=make_featureset(30, seed=1),
        unlabelled=make_featureset(12, seed=2, labelled=False),
        extractor_ids={m: f"{m}-synthetic" for m in MODALITIES},
    )
    recipe = small_recipe()  # one pretraining epoch
    runs = tmp_path / "runs"
    racing = [runs / "train-a", runs / "train-b"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda d: pretrain_step(d, data, recipe), racing))
    assert _epochs(caplog) == {"pretrain": 1}  # trained once, by one of them
    key = _pretrain_key(racing[0])
    assert key and _pretrain_key(racing[1]) == key
    inodes = {(d / "pretrain" / "model.safetensors").stat().st_ino for d in racing}
    assert inodes == {(runs / f"pretrain-{key}" / "model.safetensors").stat().st_ino}

    caplog.clear()
    replace = dataclasses.replace
    same = replace(recipe, use_pseudo_labels=False, use_oversampling=False, final_epochs=9)
    pretrain_step(runs / "train-c", data, same)
    assert _epochs(caplog) == {} and _pretrain_key(runs / "train-c") == key
    others = {
        "train-nee": replace(recipe, model=replace(recipe.model, use_nee=False)),
        "train-seed": replace(recipe, train=replace(recipe.train, seed=7)),
    }
    for name, changed in others.items():
        pretrain_step(runs / name, data, changed)
        assert _pretrain_key(runs / name) not in (None, key), name
    alone = tmp_path / "elsewhere"
    pretrain_step(alone, data, recipe)
    assert _pretrain_key(alone) is None  # tests' and benchmarks' run folders train their own
    assert _epochs(caplog) == {"pretrain": 3}


@pytest.mark.server
@pytest.mark.slow
def test_table_1_shares_pretraining_and_a_second_invocation_trains_nothing(extracted, caplog):
    caplog.set_level(logging.INFO, logger="models.training")
    table = _ablate(extracted)
    root = extracted[1]

    rows = {r["name"]: r for r in table["rows"]}
    baselines = (BASELINE.name, BASELINE_OVERSAMPLED.name)
    assert list(rows) == [*(s.name for s in SYSTEMS), *baselines]
    assert [r["follows"] for r in rows.values()] == ["paper"] * 6 + ["merflow"]
    assert table["seeds"] == [0, 1]
    for name, row in rows.items():
        assert len(row["waf"]) == 2 and all(0 <= w <= 100 for w in row["waf"]), row
        assert row["mean"] == pytest.approx(sum(row["waf"]) / 2, abs=0.02)
        assert row["std"] == pytest.approx(abs(row["waf"][0] - row["waf"][1]) / 2**0.5, abs=0.02)
        assert row["delta"] == pytest.approx(row["mean"] - rows["full"]["mean"], abs=0.02)
        assert set(row["per_class_f1"]) == set(table["classes"]), name
    assert rows["baseline"]["run_keys"] == rows["full"]["run_keys"]
    assert rows["baseline_oversampled"]["run_keys"] == rows["full"]["run_keys"]
    keys = [k for name, r in rows.items() if name not in baselines for k in r["run_keys"]]
    assert len(set(keys)) == 10  # five systems, two seeds: ten separate runs

    # One pretraining per pretraining key: the full method's serves w/o pseudo labels and w/o
    # oversampling of the same seed (the same files), and w/o NEE has its own.
    shared = {}
    for name, row in rows.items():
        for seed, key in zip(table["seeds"], row["run_keys"], strict=True):
            done = json.loads(
                (root / "runs" / f"train-{key}" / "pretrain" / "done.json").read_text()
            )
            shared[name, seed] = done.get("pretrain_key")
            weights = root / "runs" / f"train-{key}" / "pretrain" / "model.safetensors"
            if shared[name, seed]:
                source = root / "runs" / f"pretrain-{shared[name, seed]}" / "model.safetensors"
                assert weights.stat().st_ino == source.stat().st_ino  # linked, not retrained
    for seed in table["seeds"]:
        assert shared["no_pretraining", seed] is None
        full = shared["full", seed]
        assert full and shared["no_pseudo_labels", seed] == full == shared["no_oversampling", seed]
        assert shared["no_nee", seed] not in (None, full)
    assert shared["full", 0] != shared["full", 1]
    assert len(list((root / "runs").glob("pretrain-*"))) == 4  # 2 keys x 2 seeds
    epochs = _epochs(caplog)
    assert epochs["pretrain"] == 4, epochs  # 1 epoch per key, not 1 per run (8)
    # 2 epochs a stage, 2 folds a run (the demo trains fixed epochs). Steps 1 and 2: all ten
    # runs, w/o pseudo labels too; the paper's baseline: the eight with pseudo labels; merflow's
    # oversampled one: those with oversampling as well (full, w/o pretraining, w/o NEE).
    assert epochs == {
        "pretrain": 4, "step1": 40, "baseline": 32, "baseline_oversampled": 24, "step2": 40
    }  # fmt: skip

    out = Path(table["report_dir"])
    assert out == root / "runs" / f"ablate-{table['key']}"
    assert json.loads((out / "table1.json").read_text())["rows"] == table["rows"]
    assert "| **full method** |" in (out / "table1.md").read_text()
    assert (out / "table1.png").read_bytes()[:4] == b"\x89PNG"

    before = _step_files(root)
    assert len(before) == 10 * 3  # pretrain, fold-0, fold-1 of each run
    caplog.clear()
    again = _ablate(extracted)
    assert _epochs(caplog) == {}  # nothing trained
    assert _step_files(root) == before  # no step redone or rewritten
    assert again["key"] == table["key"] and again["rows"] == table["rows"]


def test_robustness_compares_the_systems_on_the_same_corrupted_copies(extracted):
    """With robustness levels the finished runs are scored, not retrained: the corrupted
    features are computed for the first run only and read by the others, and the clean row is
    each system's Table 1 figure."""
    corpus, root, overrides = extracted
    table = ablate_flow(
        str(corpus),
        profile="demo",
        data_root=str(root),
        overrides=overrides,
        seeds=2,
        parallel=2,
        robustness=["noise:5", "blur:2"],
    )
    r = table["robustness"]
    assert r["systems"] == [s.name for s in SYSTEMS]
    assert [row["level"] for row in r["rows"]] == ["clean", "blur:2", "noise:5"]
    computed = list(r["computed"].values())
    assert len(computed) == 10 and computed[0] > 0 and not any(computed[1:])
    rows = {row["name"]: row for row in table["rows"]}
    for s in SYSTEMS:
        clean = r["rows"][0]["systems"][s.name]
        assert clean["waf"] == pytest.approx(rows[s.name]["waf"], abs=0.006)
        assert clean["drop"] == 0
    out = Path(table["report_dir"])
    md = (out / "robustness.md").read_text()
    assert "| noise 5 dB SNR |" in md and "w/o NEE" in md
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"
