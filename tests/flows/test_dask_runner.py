"""The extraction flow on a 2-process Dask LocalCluster, with its data root on object storage
(moto's S3 server on loopback), writes the same stores as a thread-runner run on a local disk:
the two ways of scaling extraction out, together."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from flows.config import load_settings
from flows.extract import extract_flow
from flows.runners import with_runner
from tests.data_contracts.objectstore import moto_s3, new_bucket

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture
def s3(tmp_path):
    with moto_s3(tmp_path / "s3-scratch") as endpoint:
        yield endpoint


def test_dask_extraction_to_s3_equals_local_row_for_row(
    prefect_server, small_corpus, tmp_path, tiny_models, s3
):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    common = [f"models.models_dir={tiny_models}", "models.build_tiny=false", "extract.shard_size=6"]
    runs = {}
    # Dask's worker processes find the object store where every process does: the AWS_* env.
    roots = {"threads": str(tmp_path / "threads"), "dask": f"s3://{new_bucket(s3)}/merflow"}
    for runner in ("threads", "dask"):
        overrides = [*common, f"extract.task_runner={runner}", "extract.dask_workers=2"]
        settings = load_settings("demo", overrides)
        root = roots[runner]
        runs[runner] = with_runner(extract_flow, settings)(
            str(corpus), profile="demo", data_root=str(root), overrides=overrides
        )
    local, dask = runs["threads"], runs["dask"]
    assert local["feature_tables"] == dask["feature_tables"]
    for name in ("audio", "faces", "transcripts", "manifest", *local["feature_tables"].values()):
        a = pd.read_parquet(f"{roots['threads']}/stores/{name}").sort_values("video_id")
        b = pd.read_parquet(f"{roots['dask']}/stores/{name}").sort_values("video_id")
        assert list(a.video_id) == list(b.video_id) and len(a) == 18, name
        if "embedding" in a:
            np.testing.assert_allclose(np.stack(a.embedding), np.stack(b.embedding), atol=1e-5)
        for col in ("sha256", "n_samples", "n_faces", "text"):
            if col in a:
                assert list(a[col]) == list(b[col]), (name, col)
