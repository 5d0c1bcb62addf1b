"""FFmpeg discovery, PyAV probing and the audio split, on good, bad and odd generated media."""

from __future__ import annotations

import errno
import os
import stat
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.store import Store
from flows.task_cli import task_app
from tasks import media
from tasks.engine.errors import BadInputError, TransientError
from tasks.engine.shard import retry_if_transient, shard_cache_key
from tasks.media import (
    FFmpegNotFoundError,
    MissingInputError,
    NoAudioStreamError,
    TruncatedMediaError,
    UnreadableMediaError,
    audio_extractor_id,
    extract_audio,
    extract_audio_many,
    extract_audio_shard,
    find_ffmpeg,
    probe,
    speech_ratio,
)
from tasks.raw_video_tasks import extract_audio_task
from tests.tasks import badmedia


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One of each kind of good, bad and odd file, generated once for the module."""
    d = tmp_path_factory.mktemp("media")
    good = badmedia.testsrc_clip(d / "good.mp4", seconds=1.0, freq=440)
    fast = badmedia.testsrc_clip(d / "faststart.mp4", seconds=2.0, faststart=True)
    out = {
        "good": good,
        "silent": badmedia.silent_clip(d / "silent.mp4"),
        "audio_only": badmedia.audio_only(d / "audio_only.mp4"),
        "video_only": badmedia.video_only(d / "video_only.mp4"),
        "one_frame": badmedia.one_frame(d / "one_frame.mp4"),
        "zero_byte": badmedia.zero_byte(d / "zero_byte.mp4"),
        "text": badmedia.text_as_mp4(d / "text.mp4"),
        # moov at the end: the cut-off file does not even open
        "truncated_head": badmedia.truncated(good, d / "truncated_head.mp4", 0.5),
        # moov first: the cut-off file opens and its audio stops early
        "truncated_tail": badmedia.truncated(fast, d / "truncated_tail.mp4", 0.6),
        "odd_name": badmedia.testsrc_clip(d / "clip 01 ü 视频:take.mp4", freq=660),
        "long": badmedia.testsrc_clip(d / "long.mp4", seconds=30.0, size="64x48", rate=5),
    }
    out["symlink"] = badmedia.symlink(good, d / "link to good.mp4")
    out["broken_link"] = badmedia.symlink(d / "gone.mp4", d / "broken_link.mp4")
    return out


def read_wav(path: Path) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        return w.getparams(), np.frombuffer(w.readframes(w.getnframes()), "<i2")


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64)))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


# -- ffmpeg discovery ----------------------------------------------------------------------------
def fake_binary(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_find_ffmpeg_prefers_configured_then_path_then_bundled(tmp_path, monkeypatch):
    import imageio_ffmpeg

    monkeypatch.delenv(media.FFMPEG_ENV, raising=False)
    on_path = fake_binary(tmp_path / "bin", "ffmpeg", "exit 0")
    configured = fake_binary(tmp_path / "custom", "my-ffmpeg", "exit 0")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_ffmpeg(configured) == str(configured)
    assert find_ffmpeg() == str(on_path)
    monkeypatch.setenv(media.FFMPEG_ENV, str(configured))
    assert find_ffmpeg() == str(configured)
    monkeypatch.delenv(media.FFMPEG_ENV)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_ffmpeg() == imageio_ffmpeg.get_ffmpeg_exe()


def test_a_configured_ffmpeg_that_is_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FFmpegNotFoundError, match=r"no-such-ffmpeg.*unset it"):
        find_ffmpeg(tmp_path / "no-such-ffmpeg")


# -- probing -------------------------------------------------------------------------------------
def test_probe_reads_streams_without_ffprobe(clips):
    info = probe(clips["good"])
    assert info.has_video and info.has_audio
    assert (info.width, info.height, info.n_frames) == (160, 120, 25)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(1.0, abs=0.05)
    assert info.audio_sample_rate == 48000 and info.audio_channels == 2
    assert probe(clips["audio_only"]).has_video is False
    assert probe(clips["video_only"]).has_audio is False


@pytest.mark.parametrize(
    ("name", "error", "says"),
    [
        ("zero_byte", UnreadableMediaError, "empty"),
        ("text", UnreadableMediaError, "not a video"),
        ("truncated_head", UnreadableMediaError, "corrupt"),
        ("broken_link", MissingInputError, "symlink whose target is missing"),
    ],
)
def test_probe_turns_bad_files_into_bad_input_errors(clips, name, error, says):
    with pytest.raises(error, match=says) as e:
        probe(clips[name])
    assert clips[name].name in str(e.value)
    assert isinstance(e.value, BadInputError)


def test_probe_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(MissingInputError, match=r"nothing\.mp4 is missing"):
        probe(tmp_path / "nothing.mp4")


# -- audio split ---------------------------------------------------------------------------------
def test_audio_extractor_id_is_readable():
    assert audio_extractor_id() == "ffmpeg-16k-mono-s16"
    assert audio_extractor_id(22050) == "ffmpeg-22050hz-mono-s16"
    with pytest.raises(ValueError, match="positive"):
        audio_extractor_id(0)


def test_extract_audio_writes_16k_mono_s16_wav_with_the_tone(clips, tmp_path):
    result = extract_audio(clips["good"], tmp_path / "good.wav")
    params, x = read_wav(result.path)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 16000)
    assert result.n_samples == params.nframes == 16000 and result.duration == pytest.approx(1.0)
    assert dominant_hz(x, 16000) == pytest.approx(440, abs=2)
    assert result.speech_ratio == 0.0  # a steady tone is not voice
    assert [p.name for p in tmp_path.iterdir()] == ["good.wav"]  # no temporary left behind


def test_extract_audio_is_deterministic(clips, tmp_path):
    a = extract_audio(clips["good"], tmp_path / "a.wav").path.read_bytes()
    b = extract_audio(clips["good"], tmp_path / "b.wav").path.read_bytes()
    assert a == b


def test_ffmpeg_threads_reach_the_decoder_and_change_no_bytes(clips, tmp_path, monkeypatch):
    from tasks import media

    seen = []
    run = media.run_ffmpeg
    monkeypatch.setattr(
        media, "run_ffmpeg", lambda cmd, *a, **kw: seen.append(cmd) or run(cmd, *a, **kw)
    )
    one = extract_audio(clips["good"], tmp_path / "one.wav", threads=1)
    auto = extract_audio(clips["good"], tmp_path / "auto.wav")
    assert seen[0][seen[0].index("-threads") + 1] == "1"
    assert seen[0].index("-threads") < seen[0].index("-i")  # the input's (decoder's) option
    assert "-threads" not in seen[1]  # 0: ffmpeg's own choice
    assert one.path.read_bytes() == auto.path.read_bytes()


def test_silent_audio_is_a_wav_with_zero_speech_ratio(clips, tmp_path):
    result = extract_audio(clips["silent"], tmp_path / "s.wav")
    assert result.n_samples == 16000 and result.speech_ratio == 0.0


@pytest.mark.parametrize("name", ["audio_only", "one_frame", "odd_name", "symlink", "long"])
def test_odd_but_valid_inputs_give_audio(clips, tmp_path, name):
    result = extract_audio(clips[name], tmp_path / "out dir ü" / "x.wav")
    assert result.path.is_file() and result.n_samples > 0
    assert result.duration == pytest.approx(probe(clips[name]).audio_duration, abs=0.03)
    if name == "odd_name":
        assert dominant_hz(read_wav(result.path)[1], 16000) == pytest.approx(660, abs=2)


@pytest.mark.parametrize(
    ("name", "error", "says"),
    [
        ("video_only", NoAudioStreamError, "has no audio stream"),
        ("truncated_tail", TruncatedMediaError, "truncated"),
        ("zero_byte", UnreadableMediaError, "empty"),
        ("text", UnreadableMediaError, "not a video"),
        ("broken_link", MissingInputError, "missing"),
    ],
)
def test_bad_inputs_write_no_wav_and_keep_an_old_one(clips, tmp_path, name, error, says):
    out = tmp_path / "x.wav"
    out.write_bytes(b"previous version")
    with pytest.raises(error, match=says):
        extract_audio(clips[name], out)
    assert out.read_bytes() == b"previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]


def test_a_killed_ffmpeg_is_transient(clips, tmp_path):
    killer = fake_binary(tmp_path / "bin", "ffmpeg", "kill -KILL $$")
    with pytest.raises(TransientError, match="killed by SIGKILL"):
        extract_audio(clips["good"], tmp_path / "x.wav", ffmpeg_bin=str(killer))
    assert not (tmp_path / "x.wav").exists()


def test_an_ffmpeg_that_refuses_is_a_bad_input(clips, tmp_path):
    refuser = fake_binary(tmp_path / "bin", "ffmpeg", "echo 'Invalid data found' >&2; exit 1")
    with pytest.raises(UnreadableMediaError, match=r"exit 1.*Invalid data found"):
        extract_audio(clips["good"], tmp_path / "x.wav", ffmpeg_bin=str(refuser))


def test_a_group_split_in_one_ffmpeg_gives_the_bytes_of_one_at_a_time(clips, tmp_path):
    names = ["good", "odd_name", "silent", "audio_only", "video_only", "one_frame", "long"]
    jobs = [(clips[n], tmp_path / "group" / f"{n}.wav") for n in names]
    got = dict(zip(names, extract_audio_many(jobs), strict=True))
    assert isinstance(got.pop("video_only"), NoAudioStreamError)
    for name, result in got.items():
        alone = extract_audio(clips[name], tmp_path / "alone" / f"{name}.wav")
        assert result.path.read_bytes() == alone.path.read_bytes(), name
        assert (result.n_samples, result.speech_ratio) == (alone.n_samples, alone.speech_ratio)
    # Nothing but the finished wavs is left beside them.
    assert sorted(p.name for p in (tmp_path / "group").iterdir()) == sorted(f"{n}.wav" for n in got)


def test_a_group_ffmpeg_refuses_is_split_one_by_one_and_fails_the_bad_video_only(clips, tmp_path):
    # ffmpeg refuses any command that reads the "broken" copy, as it does a corrupt file.
    real = find_ffmpeg()
    picky = fake_binary(
        tmp_path / "bin",
        "ffmpeg",
        f'case "$*" in *broken*) echo "Invalid data found" >&2; exit 1;; esac; exec "{real}" "$@"',
    )
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clips["good"].read_bytes())
    jobs = [(clips["good"], tmp_path / "a.wav"), (broken, tmp_path / "b.wav")]
    jobs.append((clips["odd_name"], tmp_path / "c.wav"))
    a, b, c = extract_audio_many(jobs, ffmpeg_bin=str(picky))
    assert isinstance(b, UnreadableMediaError) and "broken.mp4" in str(b)
    assert a.n_samples > 0 and c.n_samples > 0
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["a.wav", "c.wav"]


def test_a_killed_group_ffmpeg_is_transient_and_leaves_nothing(clips, tmp_path):
    killer = fake_binary(tmp_path / "bin", "ffmpeg", "kill -KILL $$")
    jobs = [(clips[n], tmp_path / "out" / f"{n}.wav") for n in ("good", "odd_name")]
    with pytest.raises(TransientError, match="killed by SIGKILL"):
        extract_audio_many(jobs, ffmpeg_bin=str(killer))
    assert list((tmp_path / "out").iterdir()) == []


def write_wav(path: Path, x: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_speech_ratio_counts_loud_frames(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 200 * t)
    hiss = 0.0005 * rng.standard_normal(16000 * 3)  # -66 dBFS background
    x = np.concatenate([tone, hiss[:16000], tone, hiss[16000:]])
    ratio = speech_ratio(write_wav(tmp_path / "x.wav", x), chunk_frames=7)  # odd chunking
    assert ratio == pytest.approx(0.4, abs=0.02)
    # The same tone over a steady hum 10 dB below it: the hum is not voice.
    hum = 0.1 * np.sin(2 * np.pi * 50 * np.arange(16000 * 5) / 16000)
    hummed = speech_ratio(write_wav(tmp_path / "h.wav", x + hum))
    assert hummed == pytest.approx(0.4, abs=0.02)
    assert speech_ratio(write_wav(tmp_path / "z.wav", np.zeros(100))) is None  # < one frame


# -- shards --------------------------------------------------------------------------------------
def manifest(clips: dict[str, Path], names: list[str]) -> pd.DataFrame:
    rows = []
    for i, name in enumerate(names):
        path = clips[name]
        rows.append(
            {
                "video_id": f"sample_{i:08d}_{name}",
                "path": str(path),
                "sha256": f"{i:064x}",
                "size": path.lstat().st_size,
            }
        )
    return pd.DataFrame(rows)


SHARD = ["good", "video_only", "zero_byte", "odd_name", "text", "symlink", "truncated_tail"]


def test_shard_records_bad_videos_as_failures_and_keeps_going(clips, tmp_path):
    store = Store(tmp_path / "data")
    report = extract_audio_shard(manifest(clips, SHARD), store)
    assert (report.processed, report.failed, report.skipped) == (3, 4, 0)
    assert report.reasons == {
        "NoAudioStreamError": 1,
        "UnreadableMediaError": 2,
        "TruncatedMediaError": 1,
    }
    audio = store.read(tables.AUDIO)
    assert sorted(audio.video_id.str.split("_").str[2]) == ["good", "odd", "symlink"]
    assert set(audio.extractor_id) == {"ffmpeg-16k-mono-s16"}
    for row in audio.itertuples():
        assert (store.root / row.path).is_file() and not row.path.startswith("/")
        assert row.n_samples == 16000 and row.sample_rate == 16000
    failures = store.read(tables.FAILURES).set_index("video_id")
    assert set(failures.stage) == {"audio"}
    assert (
        "video_only.mp4 has no audio stream" in failures.loc["sample_00000001_video_only"].message
    )


def test_a_rerun_computes_nothing_that_is_done(clips, tmp_path):
    store = Store(tmp_path / "data")
    videos = manifest(clips, SHARD)
    extract_audio_shard(videos, store)
    parts = sorted(p.name for p in store.stores.rglob("*.parquet"))
    again = extract_audio_shard(videos, store)
    assert (again.processed, again.failed, again.skipped) == (0, 0, 7)
    assert sorted(p.name for p in store.stores.rglob("*.parquet")) == parts
    retried = extract_audio_shard(videos, store, retry_failed=True)
    assert (retried.processed, retried.failed, retried.skipped) == (0, 4, 3)


def test_a_failure_that_heals_leaves_the_failures_table(clips, tmp_path):
    store = Store(tmp_path / "data")
    videos = manifest(clips, ["good"])
    moved = tmp_path / "moved.mp4"
    clips["good"].rename(moved)
    try:
        assert extract_audio_shard(videos, store).reasons == {"MissingInputError": 1}
    finally:
        moved.rename(clips["good"])
    assert extract_audio_shard(videos, store, retry_failed=True).processed == 1
    assert store.read(tables.FAILURES).empty


def test_a_transient_error_is_raised_after_saving_the_done_rows(clips, tmp_path, monkeypatch):
    real = media.audio_input

    def flaky(video):
        if "clip 01" in Path(video).name:
            raise OSError(errno.EIO, "Input/output error", str(video))
        return real(video)

    monkeypatch.setattr(media, "audio_input", flaky)
    store = Store(tmp_path / "data")
    with pytest.raises(OSError, match="Input/output error"):
        extract_audio_shard(manifest(clips, SHARD), store)
    # The I/O fault fails its own video only: every other video's row or failure row is kept,
    # those split in the same ffmpeg process as the faulty one included.
    done = set(store.read(tables.AUDIO).video_id)
    assert done == {"sample_00000000_good", "sample_00000005_symlink"}
    assert len(store.read(tables.FAILURES)) == 4


def test_demo_corpus_speech_is_split_and_detected(small_corpus, tmp_path):
    paths = sorted(small_corpus.rglob("*.mp4"))
    videos = pd.DataFrame(
        {
            "video_id": [p.stem for p in paths],
            "path": [str(p) for p in paths],
            "sha256": [f"{i:064x}" for i in range(len(paths))],
        }
    )
    store = Store(tmp_path / "data")
    assert extract_audio_shard(videos, store).processed == len(paths)
    audio = store.read(tables.AUDIO)
    assert (audio.duration > 1.0).all()
    # Speech over a steady class tone, with pauses: the tone is not counted, the words are.
    assert audio.speech_ratio.between(0.1, 0.9).all()


def test_prefect_retries_only_transient_errors():
    def state(exc):
        return SimpleNamespace(data=exc)

    assert retry_if_transient(None, None, state(OSError(errno.EIO, "eio")))
    assert retry_if_transient(None, None, state(TransientError("killed")))
    assert not retry_if_transient(None, None, state(FFmpegNotFoundError("none")))
    assert not retry_if_transient(None, None, state(ValueError("bad setting")))
    assert not retry_if_transient(None, None, state(NoAudioStreamError("x")))


def test_shard_cache_key_ignores_paths_and_order(clips):
    videos = manifest(clips, ["good", "silent", "text"])
    key = shard_cache_key(videos, "ffmpeg-16k-mono-s16", "audio", "/data/a")
    moved = videos.assign(path="/elsewhere/" + videos.video_id).iloc[::-1]
    assert shard_cache_key(moved, "ffmpeg-16k-mono-s16", "audio", "/data/a") == key
    changed = videos.assign(sha256=videos.sha256.str.replace("0", "f", n=1))
    assert shard_cache_key(changed, "ffmpeg-16k-mono-s16", "audio", "/data/a") != key
    assert shard_cache_key(videos, "ffmpeg-22050hz-mono-s16", "audio", "/data/a") != key
    # Another data root's store does not hold these rows: its work is not this cache entry.
    assert shard_cache_key(videos, "ffmpeg-16k-mono-s16", "audio", "/data/b") != key


def test_the_prefect_task_wraps_the_plain_function(clips, tmp_path):
    report = extract_audio_task.fn(manifest(clips, ["good", "text"]), str(tmp_path / "data"))
    assert (report.processed, report.failed) == (1, 1)
    assert extract_audio_task.retries == 2 and extract_audio_task.name == "extract-audio"


# -- local command -------------------------------------------------------------------------------
def test_cli_extract_audio_prints_what_it_did(clips, tmp_path):
    result = CliRunner().invoke(
        task_app, ["extract-audio", str(clips["odd_name"]), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    wav = tmp_path / f"{clips['odd_name'].stem}.wav"
    assert wav.is_file() and str(wav) in result.output
    assert "16000 samples at 16000 Hz" in result.output and "speech ratio 0.00" in result.output


def test_cli_extract_audio_reports_a_bad_input(clips, tmp_path):
    result = CliRunner().invoke(
        task_app, ["extract-audio", str(clips["video_only"]), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "has no audio stream" in result.output
    assert os.listdir(tmp_path) == []
