"""`merflow import-features`: MERTools' .npy folders and Parquet/CSV tables become feature tables
bound to the manifest's videos; unknown videos are left out and listed (or, --without-videos,
stored feature-only and trained on), bad sources write nothing, a re-import changes nothing,
and training can be pointed at the table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.labels import CLASSES
from data_contracts.store import Store
from flows.cli import app
from tasks.engine.errors import BadInputError
from tasks.stores.import_features import NO_VIDEO, import_features
from tests.quality.synthetic import feature_rows, manifest_rows, sha

IDS = [f"sample_{i:03d}" for i in range(8)]


@pytest.fixture
def store(tmp_path) -> Store:
    """A data root whose manifest holds IDS; half of them labelled."""
    s = Store(tmp_path / "root")
    s.upsert(tables.MANIFEST, manifest_rows(IDS, ["labeled"] * 4 + ["unlabeled"] * 4))
    labels = pd.DataFrame({"video_id": IDS[:4], "label": CLASSES[:4], "source": "l.csv"})
    s.upsert(tables.LABELS, labels)
    return s


def _npy_folder(folder, ids, dim=6, frames=3, seed=0) -> dict[str, np.ndarray]:
    """MERTools' layout: <id>.npy of shape (frames, dim), or (dim,) when frames is 0."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for v in ids:
        shape = (frames, dim) if frames else (dim,)
        arrays[v] = rng.normal(size=shape).astype(np.float32)
        np.save(folder / f"{v}.npy", arrays[v])
    return arrays


def _table(store, modality, extractor_id, dim):
    return store.read(tables.features(modality, extractor_id, dim)).set_index("video_id")


def test_npy_folder_is_mean_pooled_bound_to_the_manifest_and_unknown_videos_listed(store, tmp_path):
    arrays = _npy_folder(tmp_path / "npy", [*IDS[:6], "ghost_b", "ghost_a"], frames=3)
    report = import_features(store, "visual", "mertools", tmp_path / "npy")

    assert report.table == "features/visual/imported-mertools"
    assert (report.written, report.already, report.in_source) == (6, 0, 8)
    assert report.not_in_manifest == ["ghost_a", "ghost_b"]
    rows = _table(store, "visual", "imported-mertools", 6)
    assert sorted(rows.index) == IDS[:6]  # no row invented for the ghosts
    for v in IDS[:6]:
        pooled = arrays[v].mean(0, dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(rows.loc[v, "embedding"], pooled)
        assert rows.loc[v, "sha256"] == sha(v) and rows.loc[v, "n_items"] == 3
    prov = json.loads(rows.loc[IDS[0], "provenance"])
    assert prov["format"] == "npy-folder" and prov["pooling"].startswith("mean over frames")
    assert prov["file"] == f"{IDS[0]}.npy" and prov["dim"] == 6 and prov["not_in_manifest"] == 2
    assert prov["source"] == str((tmp_path / "npy").resolve()) and len(prov["source_sha256"]) == 64
    record = json.loads((store.root / prov["record"]).read_text())
    assert record["not_in_manifest"] == {
        "count": 2, "video_ids": ["ghost_a", "ghost_b"], "imported": "left out"
    }  # fmt: skip
    assert not prov["without_videos"] and not prov["feature_only"]
    assert record["rows"] == 6 and record["table"] == report.table


def test_utterance_level_npy_is_taken_as_it_is(store, tmp_path):
    arrays = _npy_folder(tmp_path / "utt", IDS[:3], dim=5, frames=0)
    import_features(store, "acoustic", "utt", tmp_path / "utt")
    rows = _table(store, "acoustic", "imported-utt", 5)
    np.testing.assert_array_equal(
        np.stack(rows.loc[IDS[:3], "embedding"]), np.stack(list(arrays.values()))
    )
    assert set(rows.n_items) == {1}
    assert json.loads(rows.provenance.iloc[0])["pooling"].startswith("none")


def test_parquet_list_column_with_mer_name_column(store, tmp_path):
    x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "feats.parquet"
    pd.DataFrame({"name": IDS[:4], "feature": list(x)}).to_parquet(path)
    report = import_features(store, "text", "llm", path)
    rows = _table(store, "text", "imported-llm", 3)
    np.testing.assert_array_equal(np.stack(rows.loc[IDS[:4], "embedding"]), x)
    assert (
        report.format == "parquet" and json.loads(rows.provenance.iloc[0])["columns"] == "feature"
    )


def test_csv_of_numeric_columns_and_csv_of_list_strings(store, tmp_path):
    x = np.round(np.random.default_rng(1).normal(size=(5, 4)), 4)
    wide = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)]).assign(video_id=IDS[:5])
    wide.to_csv(tmp_path / "wide.csv", index=False)
    listed = pd.DataFrame({"video_id": IDS[:5], "emb": [json.dumps(r.tolist()) for r in x]})
    listed.to_csv(tmp_path / "listed.csv", index=False)
    import_features(store, "acoustic", "wide", tmp_path / "wide.csv")
    import_features(store, "acoustic", "listed", tmp_path / "listed.csv")
    for name in ("wide", "listed"):
        rows = _table(store, "acoustic", f"imported-{name}", 4)
        np.testing.assert_allclose(np.stack(rows.loc[IDS[:5], "embedding"]), x, rtol=1e-6)


_NAMING = ("imported_at", "record", "extractor_id")


def _stored(store, name, dim) -> pd.DataFrame:
    """A table's rows without the columns that name the moment or the source file."""
    rows = _table(store, "text", name, dim).sort_index()
    rows["provenance"] = [
        json.dumps({k: v for k, v in json.loads(p).items() if k not in _NAMING})
        for p in rows.provenance
    ]
    return rows.drop(columns=["created_at", "extractor_id"])


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_table_streamed_in_small_chunks_and_parts_stores_what_a_whole_read_does(
    store, tmp_path, monkeypatch, kind
):
    """Row groups of 3, chunks of 2 rows read at a time, parts of 3 rows written: the stored
    rows equal an import read and written in one piece; a changed vector in a late chunk is
    still refused, and a re-import still writes nothing."""
    x = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
    path = tmp_path / f"feats.{kind}"
    df = pd.DataFrame({"video_id": IDS, "emb": list(x)})
    if kind == "parquet":
        df.to_parquet(path, row_group_size=3)
    else:
        df.assign(emb=[json.dumps(r.tolist()) for r in x]).to_csv(path, index=False)
    whole = import_features(store, "text", "whole", path)

    monkeypatch.setattr("tasks.stores.import_features.READ_ROWS", 2)
    monkeypatch.setattr(store, "target_part_bytes", 4 * 4 * 5)  # half: 2 rows; parts of 3
    streamed = import_features(store, "text", "streamed", path)
    assert whole.written == streamed.written == 8
    table_dir = store.table_dir(tables.features("text", "imported-streamed", 5))
    parts = list(table_dir.rglob("*.parquet"))
    assert len(parts) == 3  # 3 + 3 + 2 rows
    pd.testing.assert_frame_equal(
        _stored(store, "imported-whole", 5), _stored(store, "imported-streamed", 5)
    )
    assert import_features(store, "text", "streamed", path).written == 0
    changed = df.copy()
    changed.loc[7, "emb"] = np.ones(5, np.float32)
    if kind == "parquet":
        changed.to_parquet(path, row_group_size=3)
    else:
        changed.assign(emb=[json.dumps(np.asarray(r).tolist()) for r in changed.emb]).to_csv(
            path, index=False
        )
    with pytest.raises(ValueError, match=rf"other vectors .* \({IDS[7]}\)"):
        import_features(store, "text", "streamed", path)


def _files(store) -> dict[str, int]:
    base = store.root
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}


def test_reimport_is_a_no_op_and_a_grown_manifest_adds_only_its_videos(store, tmp_path):
    _npy_folder(tmp_path / "npy", [*IDS, "later_1"])
    import_features(store, "visual", "m", tmp_path / "npy")
    before = _files(store)
    again = import_features(store, "visual", "m", tmp_path / "npy")
    assert (again.written, again.already) == (0, 8) and _files(store) == before

    store.upsert(tables.MANIFEST, manifest_rows(["later_1"], ["unlabeled"]))  # scanned later
    grown = import_features(store, "visual", "m", tmp_path / "npy")
    assert (grown.written, grown.already, grown.not_in_manifest) == (1, 8, [])
    assert len(_table(store, "visual", "imported-m", 6)) == 9


def test_a_source_that_changes_an_imported_vector_is_refused(store, tmp_path):
    _npy_folder(tmp_path / "npy", IDS)
    import_features(store, "visual", "m", tmp_path / "npy")
    before = _files(store)
    np.save(tmp_path / "npy" / f"{IDS[2]}.npy", np.ones((3, 6), np.float32))
    with pytest.raises(ValueError, match=rf"other vectors .* \({IDS[2]}\).*another NAME"):
        import_features(store, "visual", "m", tmp_path / "npy")
    _npy_folder(tmp_path / "wider", IDS, dim=7)
    with pytest.raises(ValueError, match=r"holds 6-d vectors.*gives 7-d"):
        import_features(store, "visual", "m", tmp_path / "wider")
    assert _files(store) == before
    # Under another name it is another table.
    assert import_features(store, "visual", "m2", tmp_path / "npy").written == 8


def _bad_sources(tmp_path):
    """name -> (modality, source, error class, pattern)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no arrays")
    _npy_folder(tmp_path / "dims", IDS[:3], dim=6)
    np.save(tmp_path / "dims" / f"{IDS[3]}.npy", np.ones((2, 4), np.float32))
    _npy_folder(tmp_path / "nan", IDS[:3])
    nan = np.ones((2, 6), np.float32)
    nan[1, 2] = np.nan
    np.save(tmp_path / "nan" / f"{IDS[4]}.npy", nan)
    _npy_folder(tmp_path / "kinds", IDS[:2], frames=0)
    _npy_folder(tmp_path / "kinds", IDS[2:4], frames=2)
    pd.DataFrame({"id": IDS[:2], "a": [1.0, 2.0]}).to_csv(tmp_path / "noid.csv", index=False)
    pd.DataFrame({"video_id": [IDS[0]] * 2, "a": [1.0, 2.0]}).to_csv(
        tmp_path / "dup.csv", index=False
    )
    pd.DataFrame({"video_id": IDS[:2], "a": [1.0, 2.0], "label": ["x", "y"]}).to_csv(
        tmp_path / "text.csv", index=False
    )
    _npy_folder(tmp_path / "ghosts", ["ghost_1", "ghost_2"])
    (tmp_path / "feats.txt").write_text("x")
    return {
        "empty folder": ("visual", "empty", ValueError, "holds no .npy file"),
        "mixed dims": ("visual", "dims", BadInputError, r"disagree on the dimension D.*D=4"),
        "NaN": ("visual", "nan", BadInputError, rf"{IDS[4]}.npy: holds NaN"),
        "mixed kinds": ("visual", "kinds", BadInputError, r"disagree on the kind"),
        "no id column": ("text", "noid.csv", BadInputError, "no video_id \\(or name\\) column"),
        "duplicate ids": ("text", "dup.csv", BadInputError, "more than once"),
        "text column": ("text", "text.csv", BadInputError, "label are not numeric"),
        "unknown modality": ("audio", "dims", ValueError, "unknown modality 'audio'"),
        "missing source": ("visual", "nowhere", FileNotFoundError, "does not exist"),
        "other file kind": ("visual", "feats.txt", ValueError, "neither a folder"),
        "no video scanned": ("visual", "ghosts", BadInputError, "merflow scan.*--without-videos"),
    }


def test_bad_sources_name_the_problem_and_write_nothing(store, tmp_path):
    before = _files(store)
    for case, (modality, name, error, pattern) in _bad_sources(tmp_path).items():
        with pytest.raises(error, match=pattern) as caught:
            import_features(store, modality, "bad", tmp_path / name)
        assert isinstance(caught.value, error), case
        assert _files(store) == before, case
    with pytest.raises(ValueError, match="import name"):
        import_features(store, "visual", "../x", tmp_path / "dims")


def test_command_prints_the_table_and_exits_by_the_one_rule(store, tmp_path):
    _npy_folder(tmp_path / "npy", [*IDS[:4], "ghost_1"])
    root = ["--data-root", str(store.root)]
    ok = CliRunner().invoke(app, ["import-features", "visual", "m", str(tmp_path / "npy"), *root])
    assert ok.exit_code == 0, ok.output
    assert "features/visual/imported-m: 4 rows written" in ok.output
    assert "left out: 1 (ghost_1)" in ok.output and "{visual: imported-m}" in ok.output
    assert "--without-videos" in ok.output  # the other way in, for features without videos
    flag = ["import-features", "visual", "m", str(tmp_path / "npy"), "--without-videos", *root]
    ok = CliRunner().invoke(app, flag)
    assert ok.exit_code == 0, ok.output
    assert "1 rows written, 4 already imported" in ok.output
    assert f"imported without videos (feature-only, sha256 {NO_VIDEO}): 1 (ghost_1)" in ok.output
    usage = CliRunner().invoke(app, ["import-features", "audio", "m", str(tmp_path / "npy"), *root])
    assert usage.exit_code == 2 and "unknown modality" in usage.output
    _bad_sources(tmp_path)
    bad = CliRunner().invoke(app, ["import-features", "visual", "n", str(tmp_path / "nan"), *root])
    assert bad.exit_code == 1 and "holds NaN" in bad.output
    no_root = CliRunner().invoke(app, ["import-features", "visual", "m", str(tmp_path / "npy")])
    assert no_root.exit_code == 2 and "--data-root" in no_root.output
    # Training from the stores alone needs to know which stores, and an existing label file.
    train = CliRunner().invoke(app, ["train", "train.n_splits=2"])
    assert train.exit_code == 2 and "or --data-root" in train.output
    labels = ["--labels", str(tmp_path / "none.csv"), *root]
    train = CliRunner().invoke(app, ["train", *labels])
    assert train.exit_code == 2 and "none.csv does not exist" in train.output


# -- training on imported tables -----------------------------------------------------------
def _all_modalities(store, tmp_path, visual_seed=0) -> list[str]:
    """Imported tables of every modality; the overrides that train on them."""
    for m, seed in (("visual", visual_seed), ("acoustic", 1), ("text", 2)):
        _npy_folder(tmp_path / f"{m}-{seed}", IDS, seed=seed)
        import_features(store, m, f"{m}-{seed}", tmp_path / f"{m}-{seed}")
    tables_ = f"visual: imported-visual-{visual_seed}, acoustic: imported-acoustic-1"
    return [f"train.feature_tables={{{tables_}, text: features/text/imported-text-2}}"]


def test_training_reads_the_named_tables_builds_no_model_and_keys_the_choice(store, tmp_path):
    from flows.train import training_context

    first = training_context(str(store.root), "demo", _all_modalities(store, tmp_path))
    assert first["data"].extractor_ids == {
        "visual": "imported-visual-0",
        "acoustic": "imported-acoustic-1",
        "text": "imported-text-2",
    }
    assert len(first["data"].labelled) == 4 and len(first["data"].unlabelled) == 4
    assert not (store.root / "models").exists()  # demo profile: build_tiny, yet nothing built
    same = training_context(str(store.root), "demo", _all_modalities(store, tmp_path))
    other = training_context(str(store.root), "demo", _all_modalities(store, tmp_path, 5))
    assert same["key"] == first["key"] and other["key"] != first["key"]


def test_a_table_the_stores_lack_or_a_plan_without_models_is_a_clear_error(store, tmp_path):
    from flows.train import training_context

    _npy_folder(tmp_path / "v", IDS)
    import_features(store, "visual", "v", tmp_path / "v")
    with pytest.raises(LookupError, match=r"'imported-x'.*the stores hold imported-v"):
        training_context(str(store.root), "demo", ["train.feature_tables={visual: imported-x}"])
    # Acoustic and text are left to the extraction plan, whose models are not here.
    with pytest.raises(LookupError, match=r"train\.feature_tables=.*visual: imported-v"):
        training_context(str(store.root), "demo", ["models.build_tiny=false"])
    assert not (store.root / "models").exists()


def test_without_a_corpus_an_unnamed_modality_takes_the_stored_plan_table(
    store, tmp_path, tiny_models
):
    """The plan of a data root read without its corpus: its tables as extraction named them
    (official transcripts when the stores hold their text features), no model built."""
    from flows.config import load_settings
    from flows.plan import plan_extraction, training_tables

    overrides = [f"models.models_dir={tiny_models}"]  # the demo's build_tiny stays on
    settings = load_settings("demo", overrides)
    planned = {
        official: plan_extraction(settings, store.root, None, official, build=False)
        for official in (True, False)
    }
    official, asr = (planned[o].feature_tables() for o in (True, False))
    assert official["text"] != asr["text"] and official["acoustic"] == asr["acoustic"]
    rng = np.random.default_rng(0)
    for ref in (official["acoustic"], official["text"]):
        x = rng.normal(size=(len(IDS), dict(ref.contract.vector_dims)["embedding"]))
        store.upsert(ref, feature_rows(IDS, x, ref.name.rsplit("/", 1)[-1]))
    _npy_folder(tmp_path / "v", IDS)
    import_features(store, "visual", "v", tmp_path / "v")

    named = load_settings("demo", [*overrides, "train.feature_tables={visual: imported-v}"])
    chosen = training_tables(named, store, None)
    assert chosen["text"] == official["text"] and chosen["acoustic"] == official["acoustic"]
    assert chosen["visual"].name == "features/visual/imported-v"
    assert not (store.root / "models").exists()
    # The plan's visual table is not in the stores: left to the plan, it is a clear error.
    with pytest.raises(LookupError, match=r"lack the extraction plan's visual: .*imported-v"):
        training_tables(settings, store, None)


# -- features without videos ---------------------------------------------------------------
def test_without_videos_unknown_ids_become_feature_only_rows_and_known_ones_keep_their_bytes(
    store, tmp_path
):
    arrays = _npy_folder(tmp_path / "npy", [*IDS[:2], "ghost_b", "ghost_a"], frames=0)
    report = import_features(store, "acoustic", "m", tmp_path / "npy", without_videos=True)
    assert (report.written, report.not_in_manifest) == (4, ["ghost_a", "ghost_b"])
    rows = _table(store, "acoustic", "imported-m", 6)
    assert rows.sha256.to_dict() == {
        IDS[0]: sha(IDS[0]), IDS[1]: sha(IDS[1]), "ghost_a": NO_VIDEO, "ghost_b": NO_VIDEO
    }  # fmt: skip
    np.testing.assert_array_equal(rows.loc["ghost_a", "embedding"], arrays["ghost_a"])
    prov = {v: json.loads(p) for v, p in rows.provenance.items()}
    assert prov["ghost_a"]["feature_only"] and not prov[IDS[0]]["feature_only"]
    assert prov["ghost_a"]["without_videos"] and prov["ghost_a"]["not_in_manifest"] == 2
    record = json.loads((store.root / prov["ghost_a"]["record"]).read_text())
    assert record["not_in_manifest"] == {
        "count": 2, "video_ids": ["ghost_a", "ghost_b"], "imported": "feature-only"
    }  # fmt: skip
    # An id names its vectors for good, feature-only ones too: again is a no-op, a change refused.
    before = _files(store)
    again = import_features(store, "acoustic", "m", tmp_path / "npy", without_videos=True)
    assert (again.written, again.already) == (0, 4) and _files(store) == before
    np.save(tmp_path / "npy" / "ghost_b.npy", np.ones(6, np.float32))
    with pytest.raises(ValueError, match=r"other vectors .* \(ghost_b\)"):
        import_features(store, "acoustic", "m", tmp_path / "npy", without_videos=True)
    assert _files(store) == before


def test_without_videos_an_empty_data_root_takes_every_id(tmp_path):
    empty = Store(tmp_path / "bare")
    _npy_folder(tmp_path / "npy", ["a", "b"])
    with pytest.raises(BadInputError, match="--without-videos"):
        import_features(empty, "visual", "m", tmp_path / "npy")
    report = import_features(empty, "visual", "m", tmp_path / "npy", without_videos=True)
    assert report.written == 2 and "no-video" in "\n".join(report.lines())
    assert set(_table(empty, "visual", "imported-m", 6).sha256) == {NO_VIDEO}


def test_training_videos_are_the_manifests_plus_feature_only_ids_each_once(store, tmp_path):
    from data_contracts.labels import CLASS_INDEX
    from flows.train import training_context

    _all_modalities(store, tmp_path)  # text-2: IDS at their scanned bytes
    extra = {"visual": ["ghost_1", "ghost_2", "late_1"], "acoustic": ["ghost_2", "late_1"]}
    for m, ids in extra.items():
        _npy_folder(tmp_path / f"{m}-only", ids, seed=9)
        import_features(store, m, f"{m}-only", tmp_path / f"{m}-only", without_videos=True)
    labels = pd.DataFrame({"video_id": ["ghost_1"], "label": "sad", "source": "l.csv"})
    store.upsert(tables.LABELS, labels)
    store.upsert(tables.MANIFEST, manifest_rows(["late_1"], ["unlabeled"]))  # scanned since
    chosen = "visual: imported-visual-only, acoustic: imported-acoustic-only, text: imported-text-2"
    overrides = [f"train.feature_tables={{{chosen}}}"]

    data = training_context(str(store.root), "demo", overrides)["data"]
    lab, unl = data.labelled, data.unlabelled
    assert sorted(lab.video_ids) == sorted([*IDS[:4], "ghost_1"])
    assert lab.labels[list(lab.video_ids).index("ghost_1")] == CLASS_INDEX["sad"]
    ghost = list(unl.video_ids).index("ghost_2")
    assert unl.present["visual"][ghost] and not unl.present["text"][ghost]
    # late_1 is the manifest's video now: its bytes have no row yet, its feature-only rows are
    # not used, and it is counted once (dropped: no modality).
    assert data.dropped == ["late_1"] and "late_1" not in unl.video_ids
    # Imported again, its vectors are bound to its bytes; still one row of it.
    import_features(store, "visual", "visual-only", tmp_path / "visual-only")
    data = training_context(str(store.root), "demo", overrides)["data"]
    ids = list(data.unlabelled.video_ids)
    assert data.dropped == [] and ids.count("late_1") == 1
    assert data.unlabelled.present["visual"][ids.index("late_1")]
    assert not data.unlabelled.present["acoustic"][ids.index("late_1")]
    assert sorted(ids) == sorted([*IDS[4:], "ghost_2", "late_1"])


def test_nothing_to_train_on_names_both_ways_in(tmp_path):
    from tasks.training.data import load_training_data

    bare = Store(tmp_path / "bare")
    refs = {m: tables.features(m, "imported-x", 4) for m in ("visual", "acoustic", "text")}
    with pytest.raises(BadInputError, match=r"merflow extract.*--without-videos"):
        load_training_data(bare, refs)


def test_column_stats_are_numpys_mean_and_std_bit_for_bit():
    """The z-score's block-by-block statistics (no copy of the matrix) equal numpy's on the
    same rows in the same order, to the bit: a run's inputs do not change with the rewrite."""
    from tasks.training.data import _BLOCK, column_stats

    rng = np.random.default_rng(0)
    for n, d in [(1, 4), (2, 3), (_BLOCK - 1, 8), (_BLOCK + 5, 16), (3 * _BLOCK + 1, 5)]:
        scale, shift = rng.uniform(1e-3, 100, d), rng.uniform(-50, 50, d)
        x = (rng.standard_normal((n, d)) * scale + shift).astype(np.float32)
        present = rng.random(n) > 0.3
        present[0] = True
        stored = rng.permutation(n)  # where each row sits in the matrix the stats read
        matrix = np.empty_like(x)
        matrix[stored] = x
        for rows in (np.arange(n), np.flatnonzero(present)):
            mean, std = column_stats(matrix, stored[rows])
            assert np.array_equal(mean, x[rows].mean(0))
            want = x[rows].std(0) if len(rows) > 1 else np.ones(d, np.float32)
            assert np.array_equal(std, want) and mean.dtype == std.dtype == np.float32
