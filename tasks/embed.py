"""Feature extraction stages: CLIP on face crops, HuBERT on audio, ASR, LLM on transcripts.

Each stage takes a shard of manifest rows, computes only the keys its table lacks, batches
across the shard's videos, pools one vector per video and writes it through the store. A video
whose input is missing (no face, no audio, empty text) gets a failure row and no feature row:
a missing modality, never a zero vector.
"""

from __future__ import annotations

import functools
import json
import logging
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from data_contracts import tables
from data_contracts.failures import failure_row
from data_contracts.store import Store
from models.extractors import load_extractor, planned_extractor_id
from models.registry import ExtractorSpec, get_spec, resolve_model_path
from tasks.errors import BadInputError
from tasks.shard import (
    ShardReport,
    commit,
    current_attempt,
    now_utc,
    retry_if_transient,
    select_pending,
    shard_cache_key,
)

log = logging.getLogger(__name__)

VISUAL_STAGE, ACOUSTIC_STAGE = "visual", "acoustic"
TRANSCRIBE_STAGE, TEXT_STAGE = "transcribe", "text"
OFFICIAL = "official"


class MissingModalityError(BadInputError):
    """The input a modality needs does not exist for this video (no face, no audio, no text)."""


@dataclass(frozen=True)
class ModelChoice:
    """Which extractor to run and where: picklable, so Prefect tasks on other workers get it."""

    spec_name: str
    models_dir: str | None = None
    device: str = "auto"
    dtype: str | None = None  # None: the spec's policy (bf16 on CUDA, fp32 on CPU)
    allow_download: bool = False
    trust_remote_code: bool | None = None  # None: what the spec says
    batch: float | None = None  # crops, audio samples or tokens per forward; None: default

    @property
    def spec(self) -> ExtractorSpec:
        """The registry spec."""
        return get_spec(self.spec_name)

    def model_path(self) -> Path:
        """The checkpoint folder (a clear error naming where it looked when absent)."""
        models_dir = Path(self.models_dir) if self.models_dir else None
        return resolve_model_path(self.spec, models_dir, self.allow_download)

    def extractor_id(self, upstream: str) -> str:
        """The id of this extractor's rows on inputs made by `upstream`, without loading it."""
        return planned_extractor_id(
            self.spec, self.model_path(), self.device, self.dtype, upstream=upstream
        )

    def load(self) -> Any:
        """The loaded extractor (once per process)."""
        return load_extractor(
            self.spec,
            self.model_path(),
            self.device,
            self.dtype,
            trust_remote_code=self.trust_remote_code,
        )


@functools.cache
def _code_version() -> dict[str, Any]:
    """merflow's version and git commit, once per process; None where unknown, never an error."""
    import importlib.metadata
    import subprocess

    try:
        version = importlib.metadata.version("merflow")
    except importlib.metadata.PackageNotFoundError:
        version = None
    root = Path(__file__).resolve().parents[1]
    commit, dirty = None, None

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        # A copy installed inside some other checkout (a venv in a repo) is not that commit.
        top = git("rev-parse", "--show-toplevel")
        if top and Path(top).resolve() == root:
            commit = git("rev-parse", "HEAD") or None
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"merflow_version": version, "git_commit": commit, "git_dirty": dirty}


def _face_provenance(faces_id: str) -> dict[str, Any]:
    """The face stage behind a visual row, read from its faces extractor id."""
    from tasks.face_backends import DLIB_MIN_SCORE

    # faces-<backend>-<size>-<rate>-<hash> (tasks.faces.faces_extractor_id); the hash also
    # covers detect_max_side and padding, which the id does not spell out.
    try:
        _, backend, size_s, *rate, digest = faces_id.split("-")
        size = int(size_s)
    except ValueError:  # an id of another shape: record it as it is rather than fail the stage
        return {"faces_extractor_id": faces_id}
    thresholds = {
        "dlib": {"min_hog_score": DLIB_MIN_SCORE, "upsample_small_frames": True},
        # Mirrors OpenCVBackend.align's detectMultiScale3 arguments.
        "opencv": {"scale_factor": 1.1, "min_neighbors": 5, "min_face_side_fraction": 0.125},
        "openface": {"nobadaligned": True},
    }.get(backend)
    return {
        "faces_extractor_id": faces_id,
        "face_backend": backend,
        "face_thresholds": thresholds,
        "crop_size": size,
        "frame_rate": next((float(r[:-3]) for r in rate if r.endswith("fps")), None),
        "max_frames": next((int(r[3:]) for r in rate if r.startswith("max")), None),
        "frame_sampling": "-".join(rate),  # "all": every decoded frame
        "faces_settings_hash": digest,
    }


def _provenance(extractor: Any, upstream: str, extractor_id: str, **extra: Any) -> str:
    """JSON provenance of a feature row: model, the settings behind `extractor_id`, inputs, code."""
    import hashlib

    from models.registry import id_settings

    spec = extractor.spec
    settings = id_settings(
        spec, dtype=extractor.dtype_name, checkpoint=extractor.revision, upstream=upstream
    )
    payload = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    rates: dict[str, Any] = {}
    if spec.kind == "visual" and upstream.startswith("faces-"):
        rates = _face_provenance(upstream)
    elif spec.kind in ("acoustic", "asr"):
        rates = {"sample_rate": spec.sample_rate, "chunk_seconds": spec.chunk_seconds}
    elif spec.kind == "text":
        rates = {"max_tokens": spec.max_tokens}
    return json.dumps(
        {
            "extractor": spec.name,
            "architecture": spec.architecture,
            "hub_repo": spec.hub_repo,
            "revision": spec.revision,
            "checkpoint": extractor.revision,
            "dtype": extractor.dtype_name,
            "device": str(extractor.device),
            "layers": spec.layers,
            "pooling": spec.pooling,
            "upstream": upstream,
            "extractor_id": extractor_id,
            # The same hash as extractor_id's suffix, over the settings recorded beside it.
            "settings_hash": hashlib.sha256(payload.encode()).hexdigest()[:8],
            "id_settings": settings,
            **rates,
            **_code_version(),
            **extra,
        },
        sort_keys=True,
    )


def _groups(df: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    # Bounded groups of videos per model call: a shard of long clips cannot exhaust memory.
    for i in range(0, len(df), max(1, size)):
        yield df.iloc[i : i + size]


def _upstream_rows(store: Store, table: tables.TableRef, extractor_id: str) -> pd.DataFrame:
    rows = store.read(table)
    return rows[rows.extractor_id == extractor_id].set_index(["video_id", "sha256"])


def _feature_row(
    video: Any, extractor_id: str, vector: np.ndarray, n_items: int, prov: str
) -> dict:
    return {
        "video_id": video.video_id,
        "sha256": video.sha256,
        "extractor_id": extractor_id,
        "embedding": vector.astype(np.float32),
        "n_items": int(n_items),
        "provenance": prov,
        "created_at": now_utc(),
    }


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit PCM wav as float32 mono in [-1, 1]."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise BadInputError(f"{path} is not 16-bit PCM; re-run the audio stage")
            raw, channels = w.readframes(w.getnframes()), w.getnchannels()
    except (wave.Error, EOFError) as e:
        raise BadInputError(
            f"audio artifact {path} is unreadable ({e}); re-run the audio stage"
        ) from e
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, channels).mean(axis=1) if channels > 1 else x


def _feature_stage(
    videos: pd.DataFrame,
    store: Store,
    model: ModelChoice,
    modality: str,
    stage: str,
    upstream: str,
    retry_failed: bool,
) -> tuple[ShardReport, str, tables.TableRef, pd.DataFrame]:
    """The report, extractor id, feature table and still-pending videos of a feature stage."""
    report = ShardReport(stage, retried=int(current_attempt() > 1))
    ext_id = model.extractor_id(upstream)
    table = tables.features(modality, ext_id, model.spec.output_dim)
    todo, report.skipped = select_pending(videos, store, table, stage, ext_id, retry_failed)
    return report, ext_id, table, todo


def _missing(video: Any, stage: str, ext_id: str, message: str) -> dict:
    """A failure row for a video whose modality is missing."""
    return failure_row(video.video_id, video.sha256, stage, MissingModalityError(message), ext_id)


# -- visual ------------------------------------------------------------------------------------
def embed_visual_shard(
    videos: pd.DataFrame,
    store: Store,
    model: ModelChoice,
    faces_extractor_id: str,
    videos_per_batch: int = 16,
    retry_failed: bool = False,
) -> ShardReport:
    """CLIP features of every face crop, mean-pooled per video."""
    from tasks.faces import load_crops

    report, ext_id, table, todo = _feature_stage(
        videos, store, model, "visual", VISUAL_STAGE, faces_extractor_id, retry_failed
    )
    if todo.empty:
        return report
    faces = _upstream_rows(store, tables.FACES, faces_extractor_id)
    encoder = model.load()
    prov = _provenance(encoder, faces_extractor_id, ext_id)
    rows: list[dict] = []
    failures: list[dict] = []
    try:
        for group in _groups(todo, videos_per_batch):
            crops, owners = [], []
            for video in group.itertuples(index=False):
                key = (video.video_id, video.sha256)
                try:
                    if key not in faces.index:
                        raise MissingModalityError(
                            f"video {video.video_id} has no face crops under {faces_extractor_id} "
                            f"(see its 'faces' failure); its visual features are marked missing"
                        )
                    c = load_crops(store.local_file(faces.loc[key, "path"])).crops
                    if len(c) == 0:
                        raise MissingModalityError(f"video {video.video_id} has zero face crops")
                except (MissingModalityError, OSError, ValueError) as e:
                    failures.append(failure_row(*key, VISUAL_STAGE, e, ext_id))
                    continue
                crops.extend(c)
                owners.append((video, len(c)))
            if not crops:
                continue
            feats = encoder.embed(crops, batch_size=int(model.batch) if model.batch else None)
            start = 0
            for video, n in owners:
                rows.append(_feature_row(video, ext_id, feats[start : start + n].mean(0), n, prov))
                start += n
                report.processed += 1
    finally:
        commit(store, table, rows, failures, report)
    return report


# -- acoustic ----------------------------------------------------------------------------------
def embed_acoustic_shard(
    videos: pd.DataFrame,
    store: Store,
    model: ModelChoice,
    audio_extractor_id: str,
    videos_per_batch: int = 16,
    retry_failed: bool = False,
) -> ShardReport:
    """HuBERT features: mean of the last 4 layers, mean over time (padding excluded)."""
    report, ext_id, table, todo = _feature_stage(
        videos, store, model, "acoustic", ACOUSTIC_STAGE, audio_extractor_id, retry_failed
    )
    if todo.empty:
        return report
    audio = _upstream_rows(store, tables.AUDIO, audio_extractor_id)
    encoder = model.load()
    prov = _provenance(encoder, audio_extractor_id, ext_id)
    rows: list[dict] = []
    failures: list[dict] = []
    try:
        for group in _groups(todo, videos_per_batch):
            waves, owners = [], []
            for video, wav in _load_audio(group, store, audio, ACOUSTIC_STAGE, ext_id, failures):
                waves.append(wav)
                owners.append(video)
            if not waves:
                continue
            budget = int(model.batch) if model.batch else None
            feats = encoder.embed(waves, max_batch_samples=budget)
            for video, wav, vec in zip(owners, waves, feats, strict=True):
                chunks = len(encoder.chunk_bounds(len(wav)))
                rows.append(_feature_row(video, ext_id, vec, chunks, prov))
                report.processed += 1
    finally:
        commit(store, table, rows, failures, report)
    return report


def _load_audio(
    group: pd.DataFrame,
    store: Store,
    audio: pd.DataFrame,
    stage: str,
    ext_id: str,
    failures: list[dict],
) -> Iterator[tuple[Any, np.ndarray]]:
    for video in group.itertuples(index=False):
        key = (video.video_id, video.sha256)
        try:
            if key not in audio.index:
                raise MissingModalityError(
                    f"video {video.video_id} has no audio artifact (see its 'audio' failure); "
                    f"its {stage} output is marked missing"
                )
            yield video, read_wav(store.local_file(audio.loc[key, "path"]))
        except (BadInputError, OSError) as e:
            failures.append(failure_row(*key, stage, e, ext_id))


# -- transcripts -------------------------------------------------------------------------------
def transcripts_extractor_id(asr_extractor_id: str, prefer_official: bool) -> str:
    """Transcripts are keyed by the ASR id, marked when official transcripts take precedence."""
    return f"{asr_extractor_id}+{OFFICIAL}" if prefer_official else asr_extractor_id


def transcribe_shard(
    videos: pd.DataFrame,
    store: Store,
    model: ModelChoice,
    audio_extractor_id: str,
    official: dict[str, str] | None = None,
    videos_per_batch: int = 32,
    retry_failed: bool = False,
) -> ShardReport:
    """A transcript per video: the official one where the corpus ships it, else WeNet ASR."""
    report = ShardReport(TRANSCRIBE_STAGE, retried=int(current_attempt() > 1))
    prefer = official is not None
    official = official or {}
    asr_id = model.extractor_id(audio_extractor_id)
    ext_id = transcripts_extractor_id(asr_id, prefer)
    todo, report.skipped = select_pending(
        videos, store, tables.TRANSCRIPTS, TRANSCRIBE_STAGE, ext_id, retry_failed
    )
    rows: list[dict] = []
    failures: list[dict] = []

    def row(video: Any, text: str, source: str, confidence: float | None) -> dict:
        return {
            "video_id": video.video_id,
            "sha256": video.sha256,
            "extractor_id": ext_id,
            "text": text,
            "source": source,
            "confidence": confidence,
            "n_chars": len(text),
            "created_at": now_utc(),
        }

    try:
        need_asr = todo[~todo.video_id.isin(official)]
        for video in todo[todo.video_id.isin(official)].itertuples(index=False):
            rows.append(row(video, official[video.video_id], OFFICIAL, None))
            report.processed += 1
        if not need_asr.empty:
            audio = _upstream_rows(store, tables.AUDIO, audio_extractor_id)
            asr = model.load()
            for group in _groups(need_asr, videos_per_batch):
                loaded = list(_load_audio(group, store, audio, TRANSCRIBE_STAGE, ext_id, failures))
                if not loaded:
                    continue
                results = asr.transcribe([w for _, w in loaded])
                for (video, _), t in zip(loaded, results, strict=True):
                    rows.append(row(video, t.text.strip(), "asr", t.confidence))
                    report.processed += 1
    finally:
        commit(store, tables.TRANSCRIPTS, rows, failures, report)
    return report


# -- text --------------------------------------------------------------------------------------
def embed_text_shard(
    videos: pd.DataFrame,
    store: Store,
    model: ModelChoice,
    transcripts_extractor_id: str,
    videos_per_batch: int = 64,
    retry_failed: bool = False,
) -> ShardReport:
    """LLM features: mean of the last 4 layers over the transcript's tokens (no special tokens)."""
    report, ext_id, table, todo = _feature_stage(
        videos, store, model, "text", TEXT_STAGE, transcripts_extractor_id, retry_failed
    )
    if todo.empty:
        return report
    transcripts = _upstream_rows(store, tables.TRANSCRIPTS, transcripts_extractor_id)
    encoder = model.load()
    prov = _provenance(encoder, transcripts_extractor_id, ext_id)
    rows: list[dict] = []
    failures: list[dict] = []
    try:
        for group in _groups(todo, videos_per_batch):
            owners, texts = [], []
            for video in group.itertuples(index=False):
                key = (video.video_id, video.sha256)
                if key not in transcripts.index:
                    why = "has no transcript (see its 'transcribe' failure)"
                    failures.append(
                        _missing(video, TEXT_STAGE, ext_id, f"video {video.video_id} {why}; "
                                 "its text features are marked missing")
                    )  # fmt: skip
                    continue
                owners.append(video)
                texts.append(str(transcripts.loc[key, "text"]))
            if not texts:
                continue
            budget = int(model.batch) if model.batch else None
            vectors = encoder.embed(texts, max_batch_tokens=budget)
            for video, text, vec in zip(owners, texts, vectors, strict=True):
                if vec is None:
                    failures.append(
                        _missing(video, TEXT_STAGE, ext_id, f"video {video.video_id} has an "
                                 "empty transcript; its text features are marked missing")
                    )  # fmt: skip
                    continue
                _, keep = encoder.tokenize(0, text)
                rows.append(_feature_row(video, ext_id, vec, sum(keep), prov))
                report.processed += 1
    finally:
        commit(store, table, rows, failures, report)
    return report


# -- Prefect tasks -----------------------------------------------------------------------------
# Model stages hold a "gpu" tag: a tag concurrency limit of 1 per device keeps two shards from
# fighting over one GPU. Their cache keys are the shard's content plus the extractor id.
def _cache_key(stage: str, upstream_param: str):
    def key(context: Any, parameters: dict[str, Any]) -> str:
        model: ModelChoice = parameters["model"]
        return shard_cache_key(
            parameters["videos"],
            model.extractor_id(parameters[upstream_param]),
            stage,
            parameters["data_root"],
        )

    return key


_GPU = {
    "tags": ["gpu"],
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_if_transient,
}


@task(name="embed-visual", cache_key_fn=_cache_key(VISUAL_STAGE, "faces_extractor_id"), **_GPU)
def embed_visual_task(
    videos: pd.DataFrame, data_root: str, model: ModelChoice, faces_extractor_id: str
) -> ShardReport:
    """Prefect task: CLIP features of one shard."""
    return embed_visual_shard(videos, Store(data_root), model, faces_extractor_id)


@task(name="embed-acoustic", cache_key_fn=_cache_key(ACOUSTIC_STAGE, "audio_extractor_id"), **_GPU)
def embed_acoustic_task(
    videos: pd.DataFrame, data_root: str, model: ModelChoice, audio_extractor_id: str
) -> ShardReport:
    """Prefect task: HuBERT features of one shard."""
    return embed_acoustic_shard(videos, Store(data_root), model, audio_extractor_id)


@task(name="transcribe", cache_key_fn=_cache_key(TRANSCRIBE_STAGE, "audio_extractor_id"), **_GPU)
def transcribe_task(
    videos: pd.DataFrame,
    data_root: str,
    model: ModelChoice,
    audio_extractor_id: str,
    official: dict[str, str] | None = None,
) -> ShardReport:
    """Prefect task: transcripts of one shard (official where shipped, else ASR)."""
    return transcribe_shard(videos, Store(data_root), model, audio_extractor_id, official)


@task(name="embed-text", cache_key_fn=_cache_key(TEXT_STAGE, "transcripts_extractor_id"), **_GPU)
def embed_text_task(
    videos: pd.DataFrame, data_root: str, model: ModelChoice, transcripts_extractor_id: str
) -> ShardReport:
    """Prefect task: LLM text features of one shard."""
    return embed_text_shard(videos, Store(data_root), model, transcripts_extractor_id)
