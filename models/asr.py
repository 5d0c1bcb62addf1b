"""Chinese speech recognition with WeNet CTC models exported for sherpa-onnx."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.encoders import Extractor
from models.registry import CheckpointMismatchError, ExtractorInputError, ExtractorSpec

logger = logging.getLogger(__name__)

# sherpa-onnx reads these from the ONNX metadata and ends the process when one is missing,
# so they are checked before the recogniser is built.
REQUIRED_METADATA: tuple[str, ...] = ("vocab_size", "subsampling_factor")

# Shorter audio cannot fill WeNet's conv subsampling (about 7 fbank frames); it is given an
# empty transcript, which the text extractor turns into a missing modality.
MIN_SECONDS = 0.1

# One second of quiet seeded noise: the load-time warm-up decode's input.
WARM_UP_WAVE = (np.random.default_rng(0).standard_normal(16_000) * 0.01).astype(np.float32)


@dataclass(frozen=True)
class Transcript:
    """A recognised text and its confidence (mean token probability), None when unknown."""

    text: str
    confidence: float | None


class AsrModel(Extractor):
    """Transcribes 16 kHz mono float waveforms with a sherpa-onnx offline recogniser."""

    def __init__(
        self,
        spec: ExtractorSpec,
        recognizer: Any,
        *,
        model_path: Path | None,
        device: torch.device,
        num_threads: int,
        batch_size: int = 16,
    ) -> None:
        # ONNX Runtime runs the exported fp32 graph; dtype is part of the spec, not a choice.
        super().__init__(spec, device, torch.float32, model_path)
        self.recognizer = recognizer
        self.num_threads = num_threads
        self.batch_size = batch_size
        self.min_samples = math.ceil(MIN_SECONDS * spec.sample_rate)

    def _prepare(self, index: int, waveform: np.ndarray) -> np.ndarray:
        """Validated float32 samples of one clip, or an error naming the clip."""
        wave = np.asarray(waveform)
        if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
            raise ExtractorInputError(
                f"waveform {index} has shape {wave.shape} and dtype {wave.dtype}; expected 1-D "
                f"float mono samples in [-1, 1] at {self.spec.sample_rate} Hz"
            )
        if not np.isfinite(wave).all():
            raise ExtractorInputError(f"waveform {index} holds NaN or infinite samples")
        return np.ascontiguousarray(wave, dtype=np.float32)

    def transcribe(
        self, waveforms: Sequence[np.ndarray], batch_size: int | None = None
    ) -> list[Transcript]:
        """One transcript per waveform, in order; audio under 0.1 s gives an empty text."""
        clips = [self._prepare(i, w) for i, w in enumerate(waveforms)]
        results: list[Transcript] = [Transcript("", None)] * len(clips)
        todo = [i for i, clip in enumerate(clips) if clip.shape[0] >= self.min_samples]
        size = batch_size or self.batch_size
        for start in range(0, len(todo), size):
            indices = todo[start : start + size]
            streams = []
            for i in indices:
                stream = self.recognizer.create_stream()
                stream.accept_waveform(self.spec.sample_rate, clips[i])
                streams.append(stream)
            self.recognizer.decode_streams(streams)
            for i, stream in zip(indices, streams, strict=True):
                results[i] = _transcript(stream.result)
        return results


def _transcript(result: Any) -> Transcript:
    """Text and confidence of one sherpa-onnx result; CTC models report no token log-probs."""
    log_probs = list(getattr(result, "ys_log_probs", []) or [])
    confidence = float(np.exp(np.mean(log_probs))) if log_probs else None
    return Transcript(text=result.text.strip(), confidence=confidence)


def read_onnx_metadata(model_file: Path) -> dict[str, str]:
    """The metadata key/value pairs of an ONNX model, without loading its weights."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def load_asr(
    spec: ExtractorSpec,
    model_path: Path,
    device: torch.device,
    dtype: torch.dtype,
    num_threads: int | None = None,
) -> AsrModel:
    """An AsrModel from a folder with the spec's ONNX file and tokens.txt."""
    import sherpa_onnx

    assert spec.model_file is not None
    model_file = model_path / spec.model_file
    metadata = read_onnx_metadata(model_file)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise CheckpointMismatchError(
            f"{model_file} lacks the ONNX metadata {', '.join(missing)} that sherpa-onnx needs "
            "for a WeNet CTC model; export it with sherpa-onnx's scripts/wenet/export-onnx.py"
        )
    threads = num_threads or max(1, min(4, os.cpu_count() or 1))
    # The PyPI sherpa-onnx wheel is CPU-only; with a CUDA build the provider follows the device.
    provider = "cuda" if device.type == "cuda" else "cpu"
    recognizer = sherpa_onnx.OfflineRecognizer.from_wenet_ctc(
        model=str(model_file),
        tokens=str(model_path / "tokens.txt"),
        num_threads=threads,
        sample_rate=spec.sample_rate,
        provider=provider,
    )
    model = AsrModel(spec, recognizer, model_path=model_path, device=device, num_threads=threads)
    # ONNX Runtime's first run in a process can pick other kernels than later runs, so the first
    # clip's transcript could differ from the same clip decoded later (measured: 38 vs 40
    # characters with the tiny model). One throwaway decode makes every real clip a later run.
    model.transcribe([WARM_UP_WAVE])
    return model
