"""The extraction flow with its stores and artifacts on object storage (`--data-root s3://...`,
moto's S3 server on loopback) writes the same tables, row for row, as a run on a local disk;
what must stay local (models, the Prefect home, caches) does; URL data roots are settings and
allowed roots like folders, without opening a hole."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.location import DataRootError, default_local_dir, normalize_root
from data_contracts.store import Store
from flows.cli import app
from flows.config import SettingsError, load_settings
from flows.extract import extract_flow
from flows.safety import UnsafeParameterError, check_all_under_roots, check_under_roots
from tasks.engine.shard import shard_cache_key
from tasks.faces.crop_files import load_crops
from tests.data_contracts.objectstore import moto_s3, new_bucket

# Columns that differ between two runs by design (when a row was written).
_WHEN = {"created_at", "scanned_at"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("s3-scratch")) as endpoint:
        yield endpoint


def _table(root: str | Path, name: str) -> pd.DataFrame:
    df = pd.read_parquet(f"{root}/stores/{name}")  # plain pandas: s3fs for the URL
    return df.sort_values([c for c in ("video_id", "stage") if c in df]).reset_index(drop=True)


@pytest.mark.server
@pytest.mark.slow
def test_extraction_on_s3_equals_a_local_run_row_for_row(
    prefect_server, small_corpus, tmp_path, tiny_models, s3
):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    overrides = [
        f"models.models_dir={tiny_models}",
        "models.build_tiny=false",
        "extract.shard_size=6",
    ]
    local_root = tmp_path / "local"
    local = extract_flow(str(corpus), "demo", str(local_root), overrides)

    url = f"s3://{new_bucket(s3)}/merflow"
    out = CliRunner().invoke(app, ["extract", str(corpus), "--data-root", url, *overrides])
    assert out.exit_code == 0, out.output
    assert f"data root `{url}`" in out.output
    # A rerun does no work: the stores on S3 already hold every row (the CLI run kept its
    # Prefect results in the URL's local work folder, so here the store is the cache).
    remote = extract_flow(str(corpus), "demo", url, overrides)
    for stage, s in remote["stages"].items():
        assert s["processed"] == 0 and s["skipped"] == 18, (stage, s)
    assert remote["feature_tables"] == local["feature_tables"]
    assert remote["check"] == local["check"]

    names = ["manifest", "labels", "audio", "faces", "transcripts"]
    for name in [*names, *local["feature_tables"].values()]:
        a, b = _table(local_root, name), _table(url, name)
        assert len(a) == len(b) and list(a.video_id) == list(b.video_id), name
        assert name == "labels" or len(a) == 18, name
        for col in a.columns.difference(_WHEN):
            if col == "embedding":
                np.testing.assert_allclose(np.stack(a[col]), np.stack(b[col]), atol=1e-5)
            else:
                assert a[col].equals(b[col]), (name, col)
    assert len(Store(url).read(tables.FAILURES)) == len(Store(local_root).read(tables.FAILURES))

    # Artifacts are on the object store at the paths the rows name, with the same content.
    fs, base = fsspec.core.url_to_fs(url)
    audio, faces = _table(url, "audio"), _table(url, "faces")
    for rel in audio.path:
        assert fs.cat_file(f"{base}/{rel}") == (local_root / rel).read_bytes(), rel
    with fs.open(f"{base}/{faces.path[0]}", "rb") as f:
        crops = np.load(f)["crops"]
    np.testing.assert_array_equal(crops, load_crops(local_root / faces.path[0]).crops)
    store = Store(url)
    assert store.is_remote and "train:" in store.read_text("runs/extract-settings.yaml")
    assert store.read_text("reports/check.md").startswith("#")
    # What stays local: the Prefect home and the artifact cache in the URL's work folder; no
    # model under it (models.models_dir points at the tiny checkpoints).
    work = default_local_dir(url)
    assert (work / "prefect").is_dir() and (work / audio.path[0]).is_file()
    assert not (work / "models").exists()

    # `merflow check` reads the stores on S3 like a local data root.
    checks = [CliRunner().invoke(app, ["check", str(r), "--no-write"]) for r in (local_root, url)]
    assert checks[0].exit_code == checks[1].exit_code and checks[1].exit_code in (0, 1)
    assert f"data root `{url}`" in checks[1].output, checks[1].output
    vid = audio.video_id[0]
    shown = CliRunner().invoke(app, ["inspect", vid, "--data-root", url])
    assert shown.exit_code == 0 and f"{audio.path[0]} (present)" in shown.output, shown.output

    # Training reads the stores on S3, writes predictions back there and keeps its run folder
    # (checkpoints, report) in the URL's local work folder.
    quick = ["train.n_splits=2", "train.max_epochs=3", "train.final_epochs=3"]
    trained = CliRunner().invoke(
        app,
        ["train", str(corpus), "--data-root", url, *overrides, *quick, "train.pretrain_epochs=1"],
    )
    assert trained.exit_code == 0, trained.output
    preds = store.read(tables.PREDICTIONS)
    assert set(preds.split) == {"cv", "unlabeled"} and len(preds) == 18
    runs = list((work / "runs").glob("train-*/report/report.json"))
    assert len(runs) == 1, runs
    assert "n_splits: 2" in store.read_text("runs/latest-train-settings.yaml")  # what `check` reads

    # The other commands take URL data roots too (a Path option would mangle the '//').
    pools = [str(corpus / "video-labeled"), str(corpus / "video-unlabeled")]
    scanned = CliRunner().invoke(app, ["scan", *pools, "--data-root", url])
    assert scanned.exit_code == 0 and "0 new" in scanned.output, scanned.output
    status = CliRunner().invoke(app, ["server", "status", "--data-root", url])
    assert status.exit_code in (0, 1) and not Path("s3:").exists(), status.output


# -- settings and allowed roots (no server) -------------------------------------------------------
def test_local_root_keeps_local_things_local_for_url_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("MERFLOW_CACHE_DIR", str(tmp_path / "cache"))
    s = load_settings("demo", ["data_root=s3://Bucket-1/a/b/"])
    root = s.resolved_data_root()
    assert root == "s3://Bucket-1/a/b"
    work = s.local_root(root)
    assert work == default_local_dir(root) and work.parent == tmp_path / "cache"
    assert s.models_dir(root) == work / "models"
    assert load_settings("demo", [f"work_dir={tmp_path / 'w'}"]).local_root(root) == tmp_path / "w"
    # A local data root is its own local root, exactly as before.
    local = load_settings("demo", [f"data_root={tmp_path / 'r'}"])
    assert local.resolved_data_root() == tmp_path / "r"
    assert local.local_root(tmp_path / "r") == tmp_path / "r"
    assert local.models_dir(tmp_path / "r") == tmp_path / "r" / "models"
    with pytest.raises(SettingsError, match=r"'\.\.'"):
        load_settings("demo", ["data_root=s3://b/x/../y"]).resolved_data_root()


def test_url_roots_normalise_and_refuse_ambiguous_urls(tmp_path):
    assert normalize_root("S3://bucket/p/") == "s3://bucket/p"
    assert normalize_root(f"file://{tmp_path}") == tmp_path
    for bad in (
        "s3://b/a/../c",
        "s3://b//c",
        "s3://b/c?versionId=1",
        "simplecache::s3://b/c",
        "s3://",
    ):
        with pytest.raises(DataRootError):
            normalize_root(bad)


def test_allowed_roots_accept_urls_without_opening_a_hole(tmp_path, monkeypatch):
    monkeypatch.setenv("MERFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MERFLOW_ALLOWED_ROOTS", f"s3://team/merflow:{tmp_path / 'data'}")
    roots = load_settings("demo").allowed_roots
    assert roots == ["s3://team/merflow", str(tmp_path / "data")]
    assert check_under_roots("s3://team/merflow/run1/", roots, "data_root") == (
        "s3://team/merflow/run1"
    )
    assert check_under_roots(tmp_path / "data" / "x", roots, "data_root") == tmp_path / "data" / "x"
    # The URL root's own local work folder is allowed; a folder of the run's choosing is not.
    check_all_under_roots([("models_dir", default_local_dir("s3://team/merflow") / "m")], roots)
    for bad in (
        "s3://team/merflow-other",
        "s3://team/merflow/../secrets",
        "s3://other/merflow",
        "gs://team/merflow",
        "simplecache::s3://team/merflow",
        str(tmp_path / "elsewhere"),
    ):
        with pytest.raises(UnsafeParameterError):
            check_under_roots(bad, roots, "data_root")
    # Local roots only: a URL is outside them.
    with pytest.raises(UnsafeParameterError, match="outside the allowed roots"):
        check_under_roots("s3://team/merflow", [str(tmp_path)], "data_root")


def test_shard_cache_keys_name_the_url_and_keep_local_keys(tmp_path):
    videos = pd.DataFrame({"video_id": ["a", "b"], "sha256": ["1" * 64, "2" * 64]})
    url = shard_cache_key(videos, "x", "audio", "s3://b/p")
    assert url == shard_cache_key(videos, "x", "audio", "s3://b/p/")
    assert url != shard_cache_key(videos, "x", "audio", "s3://b/q")
    local = shard_cache_key(videos, "x", "audio", str(tmp_path))
    assert local == shard_cache_key(videos, "x", "audio", str(tmp_path / "." / ""))
    assert tables.MANIFEST.name == "manifest"  # the layout under a URL root is the local one
