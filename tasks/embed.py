"""Feature extraction stages: CLIP on face crops, HuBERT on audio, ASR, LLM on transcripts.

Each is a `tasks.engine.stage.Stage` run by the one engine (`run_stage`): it computes only the keys
its table lacks, batches across the shard's videos in bounded groups, pools one vector per video and
writes it through the store. A video whose input is missing (no face, no audio, empty text) gets
a failure row and no feature row: a missing modality, never a zero vector. Audio reaches the
speech models at their own sample rate, resampled when the audio split used another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from data_contracts import tables
from data_contracts.store import Store
from models.extractors import load_extractor, planned_extractor_id, quiet_progress_bars
from models.registry import (
    ExtractorSpec,
    id_settings,
    pooling_of,
    resolve_model_path,
    spec_as_run,
)
from models.settings import available_cpus
from tasks.corrupt import Corruption
from tasks.dag import ACOUSTIC, AUDIO, TEXT, TRANSCRIBE, UPSTREAM, VISUAL
from tasks.defaults import DEFAULT_SAMPLE_RATE
from tasks.engine.code_version import code_version
from tasks.engine.gpu_slots import current_claim
from tasks.engine.shard import ShardReport, now_utc
from tasks.engine.stage import (
    SIDE_ROWS,
    Compute,
    Item,
    MissingModalityError,
    Result,
    Side,
    Stage,
    Upstream,
    run_stage,
    task_options,
)
from tasks.faces.crop_files import FaceCrops, load_crops
from tasks.faces.settings import FaceSettings
from tasks.media import audio_extractor_id, read_wav

log = logging.getLogger(__name__)

OFFICIAL = "official"
# Videos per model call: a group's inputs are in memory at once.
VIDEOS_PER_GROUP = {VISUAL: 16, ACOUSTIC: 16, TRANSCRIBE: 32, TEXT: 64}


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
    chunk_seconds: float | None = None  # audio models: chunk length; None: the spec's
    recipe: str | None = None  # "merflow" or "mertools" (models.registry.RECIPES); None: spec's
    gpu_slots: int = 1  # shards sharing one GPU of a machine (prefect.gpu_slots)
    threads: int | None = None  # torch intra-op (and ASR) threads; None: compute_threads()
    # Frame-level features beside the utterance ones (visual: one row per face crop; acoustic:
    # HuBERT frames mean-pooled to `frame_rate` windows per second), in the same pass.
    frames: bool = False
    frame_rate: float = 10.0

    @property
    def spec(self) -> ExtractorSpec:
        """The registry spec, with this choice's chunk length and recipe (which then key the id)."""
        return spec_as_run(self.spec_name, self.chunk_seconds, self.recipe)

    def model_path(self) -> Path:
        """The checkpoint folder (a clear error naming where it looked when absent)."""
        models_dir = Path(self.models_dir) if self.models_dir else None
        if self.allow_download:
            quiet_progress_bars()  # a download's bars, as a load's (models.extractors)
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
            num_threads=self.compute_threads if self.spec.loader == "sherpa-wenet-ctc" else None,
        )

    @property
    def wanted_threads(self) -> int:
        """The threads it asks for: `threads`, else half the cores of the worker it runs on
        (the other half crops the next shard's faces and splits its audio), at least 1."""
        return self.threads or max(1, available_cpus() // 2)

    @property
    def compute_threads(self) -> int:
        """The threads it computes with: `threads`, else, while a shard holds a share of the
        machine's cores (tasks/engine/stage.py, tasks/engine/gpu_slots.py cpu_cores), that share,
        else wanted_threads. More threads than free cores make every batched op wait at a barrier
        for a thread the OS has descheduled: 5-10x slower on a busy 2-core machine."""
        claim = current_claim()
        return claim.threads if claim is not None and not self.threads else self.wanted_threads

    def use_threads(self) -> None:
        """Give this thread's torch ops `compute_threads` intra-op threads (torch keeps the
        count per calling thread once it has run an op: each stage sets its own); under a
        claim on the machine's cores, its share is re-read first (a neighbour came or went)."""
        import torch

        claim = current_claim()
        if claim is not None:
            claim.use()
        elif torch.get_num_threads() != self.compute_threads:
            torch.set_num_threads(self.compute_threads)

    def stage_threads(self) -> dict[str, Any]:
        """The Stage fields of its claim on the machine's cores."""
        return {"threads": self.wanted_threads, "fixed_threads": bool(self.threads)}

    @property
    def budget(self) -> int | None:
        """The per-forward batch budget as an int, None for the extractor's default."""
        return int(self.batch) if self.batch else None


def _provenance(extractor: Any, upstream_id: str, extractor_id: str, inputs: dict) -> str:
    """JSON provenance of a feature row: model, the settings behind `extractor_id`, the settings
    of the stage that made its inputs (`inputs`, structured, never parsed from an id), code."""
    spec = extractor.spec
    settings = id_settings(
        spec, dtype=extractor.dtype_name, checkpoint=extractor.revision, upstream=upstream_id
    )
    payload = json.dumps(settings, sort_keys=True, separators=(",", ":"))
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
            "pooling": pooling_of(spec),
            "recipe": spec.recipe,
            "upstream": upstream_id,
            "extractor_id": extractor_id,
            # The same hash as extractor_id's suffix, over the settings recorded beside it.
            "settings_hash": hashlib.sha256(payload.encode()).hexdigest()[:8],
            "id_settings": settings,
            **inputs,
            **code_version(),
        },
        sort_keys=True,
    )


def _feature_row(video: Any, extractor_id: str, vector: np.ndarray, n_items: int, prov: str):
    return {
        "video_id": video.video_id,
        "sha256": video.sha256,
        "extractor_id": extractor_id,
        "embedding": np.asarray(vector, dtype=np.float32),
        "n_items": int(n_items),
        "provenance": prov,
        "created_at": now_utc(),
    }


def _frame_rows(video: Any, side_id: str, frames: FrameRows) -> list[dict]:
    vectors, start_s, n_items = frames
    now = now_utc()
    return [
        {
            "video_id": video.video_id,
            "sha256": video.sha256,
            "extractor_id": side_id,
            "frame": i,
            "start_s": None if not np.isfinite(t) else float(t),
            "embedding": np.asarray(v, dtype=np.float32),
            "n_items": int(n),
            "created_at": now,
        }
        for i, (v, t, n) in enumerate(zip(vectors, start_s, n_items, strict=True))
    ]


# One video's frame-level features: vectors (w, D), start seconds (w,), model frames each (w,).
FrameRows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _artifact(store: Store, row: Any, video: Any, kind: str) -> Path:
    """The local file of an upstream artifact; a vanished one is a missing input."""
    try:
        return store.local_file(row.path)
    except FileNotFoundError as e:
        raise MissingModalityError(
            f"the {kind} artifact {row.path} of video {video.video_id} is gone; delete its "
            f"{kind} row and re-run that stage"
        ) from e


def _features(
    name: str,
    model: ModelChoice,
    upstream: Upstream,
    inputs: dict,
    load: Callable[[Store, Any, Any], Any],
    embed: Callable[[Any, list[Item]], list],
    side_id: Callable[[str], str] | None = None,
) -> Stage:
    """A feature stage: `embed(encoder, items)` gives one (vector, n_items) or error per item,
    or (vector, n_items, FrameRows) when the stage also writes frame-level features: then
    `side_id(extractor_id)` names the frame table's extractor id."""
    ext_id = model.extractor_id(upstream.extractor_id)
    modality = name  # feature tables are named by modality; the stages share those names
    side = None
    if side_id is not None:
        frame_id = side_id(ext_id)
        side = Side(tables.frame_features(modality, frame_id, model.spec.output_dim), frame_id)

    def start(store: Store) -> Compute:
        encoder = model.load()
        prov = _provenance(encoder, upstream.extractor_id, ext_id, inputs)

        def compute(items: list[Item]) -> list[Result]:
            out: list[Result] = []
            model.use_threads()
            for (video, _), r in zip(items, embed(encoder, items), strict=True):
                if isinstance(r, Exception):
                    out.append(r)
                    continue
                row = _feature_row(video, ext_id, r[0], r[1], prov)
                if side is not None:
                    row[SIDE_ROWS] = _frame_rows(video, side.extractor_id, r[2])
                out.append(row)
            return out

        return compute

    table = tables.features(modality, ext_id, model.spec.output_dim)
    batch = VIDEOS_PER_GROUP[name]
    return Stage(
        name,
        table,
        ext_id,
        start,
        upstream,
        load,
        batch,
        model.device,
        model.gpu_slots,
        side,
        **model.stage_threads(),
    )


# -- visual --------------------------------------------------------------------------------------
def visual_stage(model: ModelChoice, faces: FaceSettings) -> Stage:
    """CLIP features of every face crop, mean-pooled per video (and stored per crop, with
    `model.frames`: the video's mean is the mean of its stored crop features)."""

    def load(store: Store, video: Any, row: Any) -> FaceCrops:
        try:
            crops = load_crops(_artifact(store, row, video, "faces"))
        except (ValueError, KeyError, EOFError) as e:  # a damaged .npz
            raise MissingModalityError(f"face crops of video {video.video_id}: {e}") from e
        if len(crops.crops) == 0:
            raise MissingModalityError(f"video {video.video_id} has zero face crops")
        return crops

    def embed(encoder: Any, items: list[Item]) -> list:
        feats = encoder.embed([c for _, fc in items for c in fc.crops], batch_size=model.budget)
        ends = np.cumsum([len(fc.crops) for _, fc in items])
        out = []
        for (video, fc), end in zip(items, ends, strict=True):
            mine = feats[end - len(fc.crops) : end]
            if not model.frames:
                out.append((mine.mean(0), len(mine)))
                continue
            fps = float(getattr(video, "fps", None) or np.nan)
            start_s = fc.frame_idx / fps if fps > 0 else np.full(len(mine), np.nan)
            out.append((mine.mean(0), len(mine), (mine, start_s, np.ones(len(mine), np.int32))))
        return out

    up = Upstream(UPSTREAM[VISUAL], tables.FACES, faces.extractor_id)
    side = (lambda ext_id: ext_id) if model.frames else None  # one row per crop: the same id
    return _features(VISUAL, model, up, faces.provenance(), load, embed, side)


# -- audio models --------------------------------------------------------------------------------
def _audio_input(spec: ExtractorSpec, audio_sample_rate: int, corruption: Corruption | None):
    """The upstream of a speech model and the loader giving its wav at the model's rate
    (`corruption`: the noisy split of robustness scoring, tasks/corrupt.py)."""

    def load(store: Store, video: Any, row: Any) -> np.ndarray:
        return read_wav(_artifact(store, row, video, "audio"), spec.sample_rate)

    up = Upstream(AUDIO, tables.AUDIO, audio_extractor_id(audio_sample_rate, corruption))
    inputs = {
        "sample_rate": spec.sample_rate,
        "audio_sample_rate": audio_sample_rate,  # of the split; resampled to sample_rate
        "chunk_seconds": spec.chunk_seconds,
    }
    return up, load, inputs


def acoustic_stage(
    model: ModelChoice,
    audio_sample_rate: int = DEFAULT_SAMPLE_RATE,
    audio_corruption: Corruption | None = None,
) -> Stage:
    """HuBERT features: mean of the last 4 layers, mean over time (padding excluded)."""
    up, load, inputs = _audio_input(model.spec, audio_sample_rate, audio_corruption)

    def embed(encoder: Any, items: list[Item]) -> list:
        out: list = [None] * len(items)
        ok = [i for i, (_, w) in enumerate(items) if len(w) >= encoder.min_samples]
        for i in set(range(len(items))) - set(ok):
            ms = 1000 * len(items[i][1]) / encoder.spec.sample_rate
            out[i] = MissingModalityError(
                f"the audio of video {items[i][0].video_id} lasts {ms:.0f} ms, too short for "
                f"one {encoder.spec.name} frame; its acoustic features are marked missing"
            )
        waves = [items[i][1] for i in ok]
        if not waves:
            return out
        if not model.frames:
            feats = encoder.embed(waves, max_batch_samples=model.budget)
            for i, w, vec in zip(ok, waves, feats, strict=True):
                out[i] = (vec, len(encoder.chunk_bounds(len(w))))
            return out
        feats, windows = encoder.embed_frames(waves, model.frame_rate, model.budget)
        for i, w, vec, win in zip(ok, waves, feats, windows, strict=True):
            frames = (win.vectors, win.start_s, win.n_frames)
            out[i] = (vec, len(encoder.chunk_bounds(len(w))), frames)
        return out

    # Windows of another rate are other rows: the rate names the frame table.
    side = (lambda ext_id: f"{ext_id}-{model.frame_rate:g}hz") if model.frames else None
    return _features(ACOUSTIC, model, up, inputs, load, embed, side)


def transcripts_extractor_id(asr_extractor_id: str, prefer_official: bool) -> str:
    """Transcripts are keyed by the ASR id, marked when official transcripts take precedence."""
    return f"{asr_extractor_id}+{OFFICIAL}" if prefer_official else asr_extractor_id


def transcribe_stage(
    model: ModelChoice,
    audio_sample_rate: int = DEFAULT_SAMPLE_RATE,
    official: dict[str, str] | None = None,
    audio_corruption: Corruption | None = None,
) -> Stage:
    """A transcript per video: the official one where the corpus ships it, else WeNet ASR.

    `official` None: ASR for every video; a dict (maybe empty): official transcripts take
    precedence, which marks the extractor id.
    """
    up, wav, _ = _audio_input(model.spec, audio_sample_rate, audio_corruption)
    texts = official or {}
    ext_id = transcripts_extractor_id(model.extractor_id(up.extractor_id), official is not None)
    up = dataclasses.replace(up, optional_for=frozenset(texts))

    def load(store: Store, video: Any, row: Any) -> str | np.ndarray:
        return texts[video.video_id] if video.video_id in texts else wav(store, video, row)

    def start(store: Store) -> Compute:
        asr = None  # loaded only when some video has no official transcript

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

        def compute(items: list[Item]) -> list[Result]:
            nonlocal asr
            need = [(v, x) for v, x in items if not isinstance(x, str)]
            heard = {}
            if need:
                model.use_threads()
                asr = asr or model.load()
                results = asr.transcribe([x for _, x in need])
                heard = {v.video_id: t for (v, _), t in zip(need, results, strict=True)}
            return [
                row(v, x, OFFICIAL, None)
                if isinstance(x, str)
                else row(v, heard[v.video_id].text.strip(), "asr", heard[v.video_id].confidence)
                for v, x in items
            ]

        return compute

    batch = VIDEOS_PER_GROUP[TRANSCRIBE]
    threads = model.stage_threads()
    return Stage(TRANSCRIBE, tables.TRANSCRIPTS, ext_id, start, up, load, batch, **threads)


# -- text ----------------------------------------------------------------------------------------
def text_stage(model: ModelChoice, transcripts_extractor_id: str) -> Stage:
    """LLM features: mean of the last 4 layers over the transcript's tokens (no special tokens)."""

    def load(store: Store, video: Any, row: Any) -> str:
        return str(row.text)

    def embed(encoder: Any, items: list[Item]) -> list:
        vectors = encoder.embed([t for _, t in items], max_batch_tokens=model.budget)
        return [
            (vec, sum(encoder.tokenize(0, t)[1]))
            if vec is not None
            else MissingModalityError(
                f"video {v.video_id} has an empty transcript; its text features are marked missing"
            )
            for (v, t), vec in zip(items, vectors, strict=True)
        ]

    up = Upstream(UPSTREAM[TEXT], tables.TRANSCRIPTS, transcripts_extractor_id)
    inputs = {"max_tokens": model.spec.max_tokens}
    return _features(TEXT, model, up, inputs, load, embed)


# -- Prefect tasks -------------------------------------------------------------------------------
@task(name="embed-visual", **task_options(visual_stage, gpu=True))
def embed_visual_task(
    videos: pd.DataFrame, data_root: str, model: ModelChoice, faces: FaceSettings
) -> ShardReport:
    """Prefect task: CLIP features of one shard."""
    return run_stage(visual_stage(model, faces), videos, Store(data_root))


@task(name="embed-acoustic", **task_options(acoustic_stage, gpu=True))
def embed_acoustic_task(
    videos: pd.DataFrame,
    data_root: str,
    model: ModelChoice,
    audio_sample_rate: int = DEFAULT_SAMPLE_RATE,
    audio_corruption: Corruption | None = None,
) -> ShardReport:
    """Prefect task: HuBERT features of one shard."""
    stage = acoustic_stage(model, audio_sample_rate, audio_corruption)
    return run_stage(stage, videos, Store(data_root))


@task(name="transcribe", **task_options(transcribe_stage, gpu=True))
def transcribe_task(
    videos: pd.DataFrame,
    data_root: str,
    model: ModelChoice,
    audio_sample_rate: int = DEFAULT_SAMPLE_RATE,
    official: dict[str, str] | None = None,
    audio_corruption: Corruption | None = None,
) -> ShardReport:
    """Prefect task: transcripts of one shard (official where shipped, else ASR)."""
    stage = transcribe_stage(model, audio_sample_rate, official, audio_corruption)
    return run_stage(stage, videos, Store(data_root))


@task(name="embed-text", **task_options(text_stage, gpu=True))
def embed_text_task(
    videos: pd.DataFrame, data_root: str, model: ModelChoice, transcripts_extractor_id: str
) -> ShardReport:
    """Prefect task: LLM text features of one shard."""
    return run_stage(text_stage(model, transcripts_extractor_id), videos, Store(data_root))
