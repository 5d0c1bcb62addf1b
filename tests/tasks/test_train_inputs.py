"""A run's inputs frozen for torchrun ranks: written once, mapped back equal, tied to its key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_contracts.labels import MODALITIES
from flows.config import load_settings
from tasks.training.data import TrainingData, with_folds
from tasks.training.inputs import (
    INPUTS,
    META,
    TrainingInputsError,
    inputs_key,
    load_inputs,
    save_inputs,
)
from tests.models.synthetic import make_featureset


def _data() -> TrainingData:
    labelled = make_featureset(30, seed=1, missing=0.2)
    unlabelled = make_featureset(17, seed=2, labelled=False, missing=0.3)
    stats = {
        m: (np.full(d, 0.5, np.float32), np.full(d, 2.0, np.float32))
        for m, d in labelled.dims.items()
    }
    data = TrainingData(
        labelled=labelled,
        unlabelled=unlabelled,
        dropped=["gone_1"],
        missing={"visual": 3, "acoustic": 1, "text": 7},
        extractor_ids={m: f"{m}-ext" for m in MODALITIES},
        stats=stats,
    )
    return with_folds(data, 3, 0)


def _assert_same(a: TrainingData, b: TrainingData) -> None:
    for part in ("labelled", "unlabelled"):
        x, y = getattr(a, part), getattr(b, part)
        np.testing.assert_array_equal(x.video_ids, y.video_ids)
        np.testing.assert_array_equal(x.labels, y.labels)
        for m in MODALITIES:
            np.testing.assert_array_equal(x.features[m], y.features[m])
            np.testing.assert_array_equal(x.present[m], y.present[m])
    assert (a.dropped, a.missing, a.extractor_ids) == (b.dropped, b.missing, b.extractor_ids)
    np.testing.assert_array_equal(a.folds, b.folds)
    for m in MODALITIES:
        np.testing.assert_array_equal(a.stats[m][0], b.stats[m][0])
        np.testing.assert_array_equal(a.stats[m][1], b.stats[m][1])


def test_round_trip_is_exact_and_mapped_copy_on_write(tmp_path):
    data = _data()
    folder = save_inputs(tmp_path / INPUTS, data, key="k1", fingerprint="fp1")
    loaded, fingerprint = load_inputs(folder, "k1")
    assert fingerprint == "fp1"
    _assert_same(data, loaded)
    x = loaded.labelled.features["text"]
    assert isinstance(x, np.memmap) or isinstance(x.base, np.memmap)  # mapped, not read
    # Pretraining's all-rows set: labelled first, labels hidden, the same memory (no copy).
    every = loaded.everything
    assert (every.labels == -1).all()
    ids = np.concatenate([data.labelled.video_ids, data.unlabelled.video_ids])
    np.testing.assert_array_equal(every.video_ids, ids)
    for m in MODALITIES:
        assert np.shares_memory(every.features[m], loaded.labelled.features[m])
        assert np.shares_memory(every.features[m], loaded.unlabelled.features[m])
    x[0] = 99.0  # copy on write: this process's pages change, the file does not
    again, _ = load_inputs(folder, "k1")
    np.testing.assert_array_equal(
        again.labelled.features["text"][0], data.labelled.features["text"][0]
    )


def test_written_once_per_key_and_replaced_for_another(tmp_path):
    folder = save_inputs(tmp_path / INPUTS, _data(), key="k1", fingerprint="fp1")
    stamp = (folder / "text.npy").stat().st_mtime_ns
    save_inputs(folder, _data(), key="k1", fingerprint="fp1")
    assert (folder / "text.npy").stat().st_mtime_ns == stamp  # skipped
    other = _data()
    other.labelled.labels[:] = 0
    save_inputs(folder, other, key="k2", fingerprint="fp2")
    assert inputs_key(folder) == "k2"
    assert (load_inputs(folder, "k2")[0].labelled.labels == 0).all()
    assert [p.name for p in tmp_path.iterdir()] == [INPUTS]  # no temporary folder left


def test_missing_half_written_or_foreign_inputs_are_refused(tmp_path):
    folder = tmp_path / INPUTS
    with pytest.raises(TrainingInputsError, match="shared volume"):
        load_inputs(folder, "k1")
    save_inputs(folder, _data(), key="k1", fingerprint="fp1")
    with pytest.raises(TrainingInputsError, match="belong to run k1, not k2"):
        load_inputs(folder, "k2")
    (folder / META).write_text(json.dumps({"format": 1, "key": "k1"})[:-5])  # killed mid-write
    assert inputs_key(folder) is None
    with pytest.raises(TrainingInputsError, match=str(folder)):
        load_inputs(folder, "k1")


def test_a_full_disk_names_the_folder_and_keeps_what_was_there(tmp_path, monkeypatch):
    import errno

    import tasks.training.inputs

    folder = save_inputs(tmp_path / INPUTS, _data(), key="k1", fingerprint="fp1")
    calls, real_save = [], np.save

    def full(path, array):  # the disk fills up at the fourth file
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)

    monkeypatch.setattr(tasks.training.inputs.np, "save", full)
    with pytest.raises(TrainingInputsError, match=r"MiB\) under .*No space left.*free space"):
        save_inputs(folder, _data(), key="k2", fingerprint="fp2")
    monkeypatch.undo()
    assert len(calls) == 4
    assert inputs_key(folder) == "k1"  # the previous inputs are untouched
    assert [p.name for p in tmp_path.iterdir()] == [INPUTS]  # the partial write is gone


def test_pretraining_on_mapped_inputs_is_pretraining_on_the_sets(tmp_path):
    """pretrain_start on the mapping's all-rows view trains exactly what it trains when it
    concatenates the labelled and unlabelled sets itself."""
    import torch

    from models.recipe import pretrain_start
    from tests.models.test_training import small_recipe

    data = _data()
    loaded, _ = load_inputs(save_inputs(tmp_path / INPUTS, data, "k", "fp"), "k")
    recipe = small_recipe(pretrain_epochs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mapped, h1 = pretrain_start(loaded.labelled, loaded.unlabelled, recipe, loaded.everything)
        copied, h2 = pretrain_start(data.labelled, data.unlabelled, recipe)
    finally:
        torch.set_num_threads(threads)
    assert h1 == h2
    for (name, a), b in zip(mapped.state_dict().items(), copied.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="labels hidden"):
        pretrain_start(loaded.labelled, loaded.unlabelled, recipe, loaded.labelled)


def test_a_step_maps_the_inputs_and_never_reads_the_stores(tmp_path):
    """A step (in the flow's process or a torchrun rank) builds its recipe and run key from the
    frozen inputs and its own settings alone: no data root is involved at all."""
    from models.recipe import recipe_from_settings
    from tasks.training.steps import run_key, step_inputs

    settings = load_settings("demo", [])
    data = _data()
    key = run_key("fp1", settings.train, recipe_from_settings(settings.train, data.labelled.dims))
    save_inputs(tmp_path / "run" / INPUTS, data, key=key, fingerprint="fp1")
    loaded, recipe = step_inputs(tmp_path / "run", key, settings.train)
    assert recipe == recipe_from_settings(settings.train, data.labelled.dims)
    _assert_same(data, loaded)
    # Other settings in this process give another key: the step refuses to train.
    other = load_settings("demo", ["train.seed=123"])
    with pytest.raises(TrainingInputsError, match=f"differs from the run's {key}"):
        step_inputs(tmp_path / "run", key, other.train)
    # Launch settings are not part of the key: more processes may resume the run.
    more = load_settings("demo", ["train.nproc_per_node=4"])
    step_inputs(tmp_path / "run", key, more.train)


def test_a_node_without_the_run_folder_says_it_must_be_shared(tmp_path):
    from tasks.training.steps import step_inputs

    settings = load_settings("demo", ["train.nnodes=2", "train.rdzv_endpoint=127.0.0.1:29400"])
    with pytest.raises(TrainingInputsError, match="every machine sees"):
        step_inputs(tmp_path / "run", "k1", settings.train)
