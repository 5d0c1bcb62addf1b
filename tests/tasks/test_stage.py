"""The one stage engine: pending selection, failure rows with the attempt, healing, the audio
sample rate reaching the speech models, and settings that reach the stages and their tasks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from data_contracts import tables
from data_contracts.store import Store
from flows.config import load_settings
from flows.plan import plan_extraction
from models.acoustic import AcousticEncoder
from tasks.dag import STAGES
from tasks.engine.stage import run_stage


def _plan(tiny_models, root, *overrides):
    settings = load_settings(
        "demo", [f"models.models_dir={tiny_models}", "models.build_tiny=false", *overrides]
    )
    return plan_extraction(settings, root, None)


@pytest.fixture
def videos(small_corpus, tmp_path) -> pd.DataFrame:
    """Two manifest rows of the session's demo corpus, on private copies of the files."""
    rows = []
    for i, src in enumerate(sorted((small_corpus / "video-labeled").glob("*.mp4"))[:2]):
        dst = tmp_path / "videos" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
        rows.append({"video_id": src.stem, "sha256": f"{i:064x}", "path": str(dst)})
    return pd.DataFrame(rows)


def test_a_feature_stage_heals_its_failure_once_its_input_appears(videos, tiny_models, tmp_path):
    plan = _plan(tiny_models, tmp_path / "root")
    store = Store(tmp_path / "root")
    acoustic = plan.stage("acoustic")
    # No audio yet: a missing modality, recorded with the Prefect attempt that saw it.
    first = run_stage(acoustic, videos, store, attempt=3)
    assert (first.processed, first.failed, first.retried) == (0, 2, 1)
    failures = store.read(tables.FAILURES)
    assert set(failures.stage) == {"acoustic"} and (failures.attempt == 3).all()
    assert set(failures.error_type) == {"MissingModalityError"}
    assert failures.message.str.contains("has no audio output").all()

    assert run_stage(plan.stage("audio"), videos, store).processed == 2
    # Deterministic failures of the same bytes and settings are skipped on a plain rerun...
    again = run_stage(acoustic, videos, store)
    assert (again.processed, again.skipped) == (0, 2)
    # ...and retried on request: the videos now succeed and their failure rows are gone.
    healed = run_stage(acoustic, videos, store, retry_failed=True)
    assert (healed.processed, healed.failed) == (2, 0)
    assert store.read(tables.FAILURES).empty
    assert len(store.read(acoustic.table)) == 2


def test_failure_rows_of_every_kind_of_stage_carry_the_attempt(videos, tiny_models, tmp_path):
    plan = _plan(tiny_models, tmp_path / "root")
    store = Store(tmp_path / "root")
    gone = videos.assign(path=str(tmp_path / "missing.mp4"))
    for name in STAGES:
        run_stage(plan.stage(name, {}), gone, store, attempt=2)
    failures = store.read(tables.FAILURES)
    assert set(failures.stage) == set(STAGES)
    assert (failures.attempt == 2).all(), failures[["stage", "attempt"]]
    raw = failures[failures.stage.isin(["audio", "faces"])]
    assert set(raw.error_type) == {"MissingInputError"}


def test_only_the_shards_upstream_rows_are_read(videos, tiny_models, tmp_path, monkeypatch):
    plan = _plan(tiny_models, tmp_path / "root")
    store = Store(tmp_path / "root")
    run_stage(plan.stage("audio"), videos, store)
    reads = []
    real = Store.read

    def spy(self, table, columns=None, where=None):
        reads.append((table.name, where))
        return real(self, table, columns, where)

    monkeypatch.setattr(Store, "read", spy)
    run_stage(plan.stage("acoustic"), videos.iloc[:1], store)
    audio_reads = [w for name, w in reads if name == tables.AUDIO.name]
    assert audio_reads == [{"video_id": [videos.video_id[0]], "extractor_id": [plan.audio_id]}]


def test_audio_at_8k_reaches_hubert_as_many_seconds_as_at_16k(
    videos, tiny_models, tmp_path, monkeypatch
):
    seen: list[int] = []
    real = AcousticEncoder.embed

    def spy(self, waveforms, *args, **kwargs):
        seen.extend(len(w) for w in waveforms)
        return real(self, waveforms, *args, **kwargs)

    monkeypatch.setattr(AcousticEncoder, "embed", spy)
    lengths, tables_ = {}, {}
    for rate in (8000, 16000):
        root = tmp_path / f"root-{rate}"
        plan = _plan(tiny_models, root, f"audio.sample_rate={rate}")
        store = Store(root)
        run_stage(plan.stage("audio"), videos, store)
        assert set(store.read(tables.AUDIO).sample_rate) == {rate}
        seen.clear()
        assert run_stage(plan.stage("acoustic"), videos, store).processed == 2
        lengths[rate] = list(seen)
        tables_[rate] = store.read(plan.stage("acoustic").table)
    # The model gets its own 16 kHz from either split: the same seconds (within 10 ms).
    assert np.allclose(lengths[8000], lengths[16000], atol=160), lengths
    prov = json.loads(tables_[8000].provenance.iloc[0])
    assert prov["sample_rate"] == 16000 and prov["audio_sample_rate"] == 8000
    assert set(tables_[8000].extractor_id).isdisjoint(tables_[16000].extractor_id)


def test_audio_chunk_seconds_reaches_hubert(tiny_models, tmp_path):
    base = _plan(tiny_models, tmp_path)
    short = _plan(tiny_models, tmp_path, "models.audio_chunk_seconds=0.5")
    assert base.models["acoustic"].spec.chunk_seconds == 10.0
    encoder = short.models["acoustic"].load()
    assert encoder.chunk_samples == 8000 and len(encoder.chunk_bounds(3 * 16000)) == 6
    # Another chunk length is another acoustic table; the other modalities keep theirs.
    before, after = base.feature_tables(), short.feature_tables()
    assert before["acoustic"] != after["acoustic"]
    assert before["visual"] == after["visual"] and before["text"] == after["text"]


def test_stage_tasks_take_their_retries_from_the_settings():
    from flows.extract import stage_tasks

    for retries in (0, 5):
        tasks = stage_tasks(load_settings("demo", [f"extract.retries={retries}"]))
        assert set(tasks) == set(STAGES)
        assert {t.retries for t in tasks.values()} == {retries}
    # Every stage keeps the retry rule; GPU bounds are slots per device (tasks/engine/gpu_slots.py).
    tasks = stage_tasks(load_settings("demo", []))
    assert tasks["audio"].retry_condition_fn is tasks["text"].retry_condition_fn


def test_model_stages_compute_on_the_configured_torch_threads(videos, tiny_models, tmp_path):
    import threading

    import torch

    from models.visual import VisualEncoder

    plan = _plan(tiny_models, tmp_path / "root", "extract.model_threads=1")
    store = Store(tmp_path / "root")
    run_stage(plan.stage("faces"), videos, store)
    seen = []
    embed = VisualEncoder.embed

    def spy(self, *a, **kw):
        seen.append(torch.get_num_threads())
        return embed(self, *a, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(VisualEncoder, "embed", spy)
            # In another thread, as a Prefect task runs: the stage sets its own count there.
            t = threading.Thread(target=run_stage, args=(plan.stage("visual"), videos, store))
            t.start()
            t.join()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_a_cpu_model_stage_computes_with_its_share_of_the_machines_cores(
    videos, tiny_models, tmp_path, monkeypatch
):
    import torch

    import tasks.embed as embed_mod
    from models.visual import VisualEncoder
    from tasks.engine.gpu_slots import cpu_cores, current_claim, machine_cores

    monkeypatch.setenv("MERFLOW_CPU_DIR", str(tmp_path / "cpus"))
    monkeypatch.setattr(
        "tasks.engine.gpu_slots.busy_elsewhere", lambda in_budget: 0
    )  # a quiet machine
    cores = machine_cores()
    monkeypatch.setattr(embed_mod, "available_cpus", lambda: 2 * len(cores))  # wants them all
    plan = _plan(tiny_models, tmp_path / "root")
    store = Store(tmp_path / "root")
    run_stage(plan.stage("faces"), videos, store)
    seen: list[tuple[str | None, int]] = []
    embed = VisualEncoder.embed

    def spy(self, *a, **kw):
        claim = current_claim()
        seen.append((claim.what if claim else None, torch.get_num_threads()))
        return embed(self, *a, **kw)

    monkeypatch.setattr(VisualEncoder, "embed", spy)
    before = torch.get_num_threads()
    try:
        with cpu_cores(len(cores), what="neighbour"):  # a training holding every core
            beside = run_stage(plan.stage("visual"), videos, store)
        assert seen and set(seen) == {("extract visual", 1)}
        assert beside.threads == 1 and beside.line(1, 1).endswith(" on 1 thread")
        seen.clear()
        shutil.rmtree(store.stores / "features" / "visual")
        assert run_stage(plan.stage("visual"), videos, store).threads == len(cores)
        assert seen and set(seen) == {("extract visual", len(cores))}
    finally:
        torch.set_num_threads(before)


def test_model_threads_default_to_half_the_cores_of_the_worker_computing(tiny_models, monkeypatch):
    import tasks.embed as embed_mod

    plan = _plan(tiny_models, "/tmp/unused")
    visual = plan.models["visual"]
    assert visual.threads is None  # resolved on the worker, not on the flow's machine
    monkeypatch.setattr(embed_mod, "available_cpus", lambda: 16)
    assert visual.compute_threads == 8
    monkeypatch.setattr(embed_mod, "available_cpus", lambda: 1)
    assert visual.compute_threads == 1
    set_ = _plan(tiny_models, "/tmp/unused", "extract.model_threads=3").models["asr"]
    assert set_.compute_threads == 3


def test_raw_video_stages_run_in_shard_order_per_lane():
    from flows.extract import cpu_lanes

    assert cpu_lanes(load_settings("demo", []), 5) == 1
    dask = load_settings("demo", ["extract.task_runner=dask", "extract.dask_workers=3"])
    assert cpu_lanes(dask, 5) == 3
    remote = load_settings("demo", ["extract.task_runner=dask", "extract.dask_address=tcp://x:1"])
    assert cpu_lanes(remote, 5) == 5
