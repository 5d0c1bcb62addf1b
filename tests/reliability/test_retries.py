"""Transient faults are retried and the run completes; deterministic bad inputs are not retried."""

from __future__ import annotations

import errno
from collections import Counter

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed

import tasks.media
from data_contracts import tables
from data_contracts.store import Store, StoreWriteError
from flows.extract import ExtractionSummary, extract_flow
from tasks.engine.errors import BadInputError, TransientError
from tasks.engine.shard import retry_if_transient
from tests.tasks import badmedia

pytestmark = pytest.mark.server


def test_retry_rule_tells_transient_from_deterministic(tmp_path):
    def retried(exc: BaseException) -> bool:
        return retry_if_transient(None, None, Failed(data=exc))

    assert retried(OSError(errno.EIO, "I/O error"))
    assert retried(TransientError("ffmpeg was killed"))
    assert retried(StoreWriteError("disk full", tmp_path, errno.ENOSPC, transient=True))
    assert not retried(StoreWriteError("read-only", tmp_path, errno.EROFS, transient=False))
    assert not retried(BadInputError("no audio stream"))
    assert not retried(ValueError("bad setting"))


def test_transient_fault_is_retried_and_bad_input_is_not(
    prefect_server, corpus, tmp_path, tiny_models, monkeypatch
):
    folder = corpus / "video-labeled"
    # A video with no audio stream: a deterministic bad input of the audio stage.
    badmedia.video_only(folder / "sample_00000000.mp4")
    good = sorted(p.stem for p in folder.glob("*.mp4") if p.stem != "sample_00000000")
    flaky = good[1]  # in the first shard, after the bad video and one good one
    calls = _fail_audio_once(monkeypatch, flaky)
    state = _extract(corpus, tmp_path / "root", tiny_models, folder, "extract.shard_size=5")
    assert state.is_completed(), state
    summary = state.result()
    audio = summary["stages"]["audio"]
    # Counts are the last attempt's: what the first attempt stored, the retry skipped. The
    # summary says a shard was retried, and why its counts look so.
    assert audio["processed"] + audio["skipped"] + audio["failed"] == len(good) + 1, audio
    assert audio["retried_shards"] == 1, audio
    assert all(s["retried_shards"] == 0 for k, s in summary["stages"].items() if k != "audio")
    table = ExtractionSummary(**summary).markdown()
    assert "| retried shards |" in table and "A retried shard counts its last attempt" in table
    listed = {(f["video_id"], f["stage"]) for f in summary["failures"]}
    assert ("sample_00000000", "audio") in listed
    # The fault cost one extra call of the faulty video only: the retry skipped the videos
    # its first attempt had stored and the bad video whose failure it had recorded.
    assert calls[flaky] == 2
    assert all(calls[v] == 1 for v in good if v != flaky), calls
    assert calls["sample_00000000"] == 1

    store = Store(tmp_path / "root")
    assert len(store.read(tables.AUDIO)) == len(good)
    failures = store.read(tables.FAILURES)
    bad = failures[(failures.video_id == "sample_00000000") & (failures.stage == "audio")]
    assert len(bad) == 1 and bad.attempt.iloc[0] == 1 and "no audio stream" in bad.message.iloc[0]

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    audio_runs = sorted(r.run_count for r in runs if r.name.startswith("extract-audio"))
    assert audio_runs == [1, 1, 2], audio_runs  # three shards; one retried once
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]


def test_retries_come_from_the_settings(prefect_server, corpus, tmp_path, tiny_models, monkeypatch):
    """extract.retries=0: the same transient fault is not retried, and its shard fails the run."""
    folder = tmp_path / "two"
    folder.mkdir()
    for src in sorted((corpus / "video-labeled").glob("*.mp4"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    flaky = sorted(p.stem for p in folder.glob("*.mp4"))[0]
    calls = _fail_audio_once(monkeypatch, flaky)
    state = _extract(corpus, tmp_path / "root", tiny_models, folder, "extract.retries=0")
    assert state.is_failed(), state
    assert calls[flaky] == 1  # one attempt, where the default setting would have retried


def _fail_audio_once(monkeypatch, flaky: str) -> Counter:
    """Make the audio stage's first read of video `flaky` raise a transient I/O error; count
    the stage's reads of each video (one per attempt that splits it)."""
    calls: Counter = Counter()
    real = tasks.media.audio_input

    def faulty(video):
        calls[video.stem] += 1
        if video.stem == flaky and calls[video.stem] == 1:
            raise OSError(errno.EIO, "injected I/O fault", str(video))
        return real(video)

    monkeypatch.setattr(tasks.media, "audio_input", faulty)
    return calls


def _extract(corpus, root, tiny_models, folder, *overrides):
    return extract_flow(
        str(corpus),
        profile="demo",
        data_root=str(root),
        overrides=[f"models.models_dir={tiny_models}", "models.build_tiny=false", *overrides],
        video_dirs=[str(folder)],
        return_state=True,
    )
