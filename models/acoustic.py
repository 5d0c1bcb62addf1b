"""HuBERT utterance features: last-layer mean over time, in chunks, padding excluded.

The challenge baseline runs HuBERT in 10 s chunks and averages the zero padding of the last
chunk into the feature. Here (the `merflow` recipe) every chunk carries an attention mask, frames
computed from padding are dropped, and a clip's feature is the mean over all its valid frames, so
a clip embedded alone equals the same clip embedded in a batch with longer ones.

The `mertools` recipe is the baseline's own: the whole clip normalised, cut into fixed chunks, the
last zero-padded, no attention mask, the sum of the last 4 states, the mean over every frame (the
padding's included), fp32. Both take the final LayerNorm's output as the last state, as the
baseline's transformers 4.x returned it (models.extractors.final_hidden_states).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.encoders import (
    Extractor,
    final_hidden_states,
    masked_sum,
    mean_of_last_layers,
    pack_batches,
    sum_of_last_layers,
)
from models.registry import CheckpointMismatchError, ExtractorInputError, ExtractorSpec

logger = logging.getLogger(__name__)


def conv_output_length(n_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames the HuBERT conv feature encoder makes from `n_samples` (0 when too short)."""
    length = n_samples
    for kernel, stride in zip(kernels, strides, strict=True):
        if length < kernel:
            return 0
        length = (length - kernel) // stride + 1
    return length


def receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples the conv feature encoder needs for one frame (400 for HuBERT's stack)."""
    field, hop = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        field += (kernel - 1) * hop
        hop *= stride
    return field


class AcousticEncoder(Extractor):
    """Embeds 16 kHz mono float waveforms into one vector each (mean of last layers, time)."""

    def __init__(
        self,
        spec: ExtractorSpec,
        model: nn.Module,
        feature_extractor: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_path: Path | None = None,
        max_batch_samples: int = 16_000 * 80,
    ) -> None:
        super().__init__(spec, device, dtype, model_path)
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.max_batch_samples = max_batch_samples
        config = model.config
        self.output_dim = int(config.hidden_size)
        if spec.output_dim is not None and self.output_dim != spec.output_dim:
            raise CheckpointMismatchError(
                f"extractor {spec.name} expects {spec.output_dim}-d features but the checkpoint "
                f"at {model_path} has hidden size {self.output_dim}; check the folder"
            )
        rate = int(getattr(feature_extractor, "sampling_rate", spec.sample_rate))
        if rate != spec.sample_rate:
            raise CheckpointMismatchError(
                f"extractor {spec.name} runs at {spec.sample_rate} Hz but the checkpoint's "
                f"preprocessor_config.json says {rate} Hz; check the folder"
            )
        self._kernels = tuple(config.conv_kernel)
        self._strides = tuple(config.conv_stride)
        self.min_samples = receptive_field(self._kernels, self._strides)
        self._fixed_chunks = spec.recipe == "mertools"
        if self._fixed_chunks and dtype != torch.float32:
            raise ValueError(
                f"extractor {spec.name} with the mertools recipe runs in fp32, as the challenge "
                f"baseline did, not {dtype}; load it through models.extractors.load_extractor"
            )
        if self._fixed_chunks:
            self.chunk_samples = round(spec.chunk_seconds * spec.sample_rate)
        else:
            # At least two frames' worth, so that equal chunks of a split clip each make a frame.
            self.chunk_samples = max(
                2 * self.min_samples + 2, round(spec.chunk_seconds * spec.sample_rate)
            )
        # With group norm the first conv normalises over time, so zero padding would leak
        # into every frame: such models get one chunk per forward pass.
        self._one_chunk_per_batch = getattr(config, "feat_extract_norm", "layer") != "layer"

    def chunk_bounds(self, n_samples: int) -> list[tuple[int, int]]:
        """(start, end) of the chunks, each at most chunk_seconds long, covering a clip.

        merflow: equal chunks rather than fixed ones with a remainder: no tail too short to make
        a frame, and less padding when chunks are batched. mertools: the baseline's fixed chunks,
        the last one the remainder (zero-padded to a full chunk when the clip is cut at all).
        """
        if self._fixed_chunks:
            step = self.chunk_samples
            return [(s, min(s + step, n_samples)) for s in range(0, max(n_samples, 1), step)]
        count = max(1, math.ceil(n_samples / self.chunk_samples))
        edges = [round(i * n_samples / count) for i in range(count + 1)]
        return list(itertools.pairwise(edges))

    def _prepare(self, index: int, waveform: np.ndarray) -> np.ndarray:
        """Validated, normalised float32 samples of one clip, or an error naming the clip."""
        wave = np.asarray(waveform)
        if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
            raise ExtractorInputError(
                f"waveform {index} has shape {wave.shape} and dtype {wave.dtype}; expected 1-D "
                f"float mono samples at {self.spec.sample_rate} Hz"
            )
        if wave.shape[0] < self.min_samples:
            raise ExtractorInputError(
                f"waveform {index} has {wave.shape[0]} samples, fewer than the "
                f"{self.min_samples} ({self.min_samples / self.spec.sample_rate * 1000:.0f} ms) "
                f"{self.spec.name} needs for one frame; mark its acoustic features missing"
            )
        if not np.isfinite(wave).all():
            raise ExtractorInputError(f"waveform {index} holds NaN or infinite samples")
        # The checkpoint's own preprocessing (zero mean, unit variance when do_normalize),
        # applied to the whole clip before chunking so that all chunks share one scale.
        values = self.feature_extractor(
            wave.astype(np.float32), sampling_rate=self.spec.sample_rate, return_tensors="np"
        ).input_values[0]
        return np.asarray(values, dtype=np.float32)

    @property
    def frame_rate(self) -> float:
        """Model frames per second (50 for HuBERT at 16 kHz: one frame per 320 samples)."""
        return self.spec.sample_rate / math.prod(self._strides)

    def embed(
        self, waveforms: Sequence[np.ndarray], max_batch_samples: int | None = None
    ) -> np.ndarray:
        """One feature per clip, (n, output_dim) float32; long clips run in chunks."""
        return self._encode(waveforms, max_batch_samples, None)[0]

    def embed_frames(
        self,
        waveforms: Sequence[np.ndarray],
        rate: float,
        max_batch_samples: int | None = None,
    ) -> tuple[np.ndarray, list[FrameWindows]]:
        """The utterance features (as `embed`) and, per clip, its frames mean-pooled into
        windows of round(frame_rate / rate) consecutive frames. The utterance feature is the
        frame-count-weighted mean of its windows: both come from the same frames."""
        if rate <= 0:
            raise ValueError(f"frame rate must be positive, got {rate}")
        pool = max(1, round(self.frame_rate / rate))
        utterances, frames = self._encode(waveforms, max_batch_samples, pool)
        return utterances, frames

    @torch.inference_mode()
    def _encode(
        self, waveforms: Sequence[np.ndarray], max_batch_samples: int | None, pool: int | None
    ) -> tuple[np.ndarray, list[FrameWindows]]:
        clips = [self._prepare(i, w) for i, w in enumerate(waveforms)]
        if self._fixed_chunks:
            return self._encode_fixed(clips, max_batch_samples, pool)
        chunks = [
            (clip, start, end)
            for clip, samples in enumerate(clips)
            for start, end in self.chunk_bounds(samples.shape[0])
        ]
        sums = np.zeros((len(clips), self.output_dim), dtype=np.float64)
        counts = np.zeros(len(clips), dtype=np.int64)
        # With frames kept: per chunk (in clip order), its valid frames and their start times.
        kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        hop = math.prod(self._strides)
        budget = max_batch_samples or self.max_batch_samples
        limit = 1 if self._one_chunk_per_batch else None
        for batch in pack_batches([end - start for _, start, end in chunks], budget, limit):
            members = [chunks[i] for i in batch]
            longest = max(end - start for _, start, end in members)
            values = torch.zeros(len(members), longest)  # (B, L), zero padded on the right
            mask = torch.zeros(len(members), longest, dtype=torch.long)
            for row, (clip, start, end) in enumerate(members):
                values[row, : end - start] = torch.from_numpy(clips[clip][start:end])
                mask[row, : end - start] = 1
            out = self.model(
                values.to(self.device, self.dtype),
                attention_mask=mask.to(self.device),
                output_hidden_states=True,
            )
            states = mean_of_last_layers(final_hidden_states(out), self.spec.layers)  # (B, T, D)
            frames = torch.tensor(
                [
                    conv_output_length(end - start, self._kernels, self._strides)
                    for _, start, end in members
                ]
            )
            frame_mask = torch.arange(states.shape[1]).unsqueeze(0) < frames.unsqueeze(1)
            total, count = masked_sum(states, frame_mask.to(states.device))
            total_np = total.double().cpu().numpy()
            for row, (clip, start, _) in enumerate(members):
                sums[clip] += total_np[row]
                counts[clip] += int(count[row])
                if pool is not None:
                    n = int(frames[row])
                    valid = states[row, :n].double().cpu().numpy()
                    times = (start + hop * np.arange(n)) / self.spec.sample_rate
                    kept[batch[row]] = (valid, times)
        if len(clips) == 0:
            return np.zeros((0, self.output_dim), dtype=np.float32), []
        utterances = (sums / counts[:, None]).astype(np.float32)
        if pool is None:
            return utterances, []
        per_clip: list[list[int]] = [[] for _ in clips]
        for index, (clip, _, _) in enumerate(chunks):
            per_clip[clip].append(index)
        windows = [
            _pool_windows(
                np.concatenate([kept[i][0] for i in idx]),
                np.concatenate([kept[i][1] for i in idx]),
                pool,
            )
            for idx in per_clip
        ]
        return utterances, windows

    def _encode_fixed(
        self, clips: list[np.ndarray], max_batch_samples: int | None, pool: int | None
    ) -> tuple[np.ndarray, list[FrameWindows]]:
        """The mertools recipe: per clip, fixed chunks, no mask, every frame averaged."""
        size, hop, rate = self.chunk_samples, math.prod(self._strides), self.spec.sample_rate
        budget = max_batch_samples or self.max_batch_samples
        utterances = np.zeros((len(clips), self.output_dim), dtype=np.float32)
        windows: list[FrameWindows] = []
        for index, values in enumerate(clips):
            if len(values) <= size:
                rows = torch.from_numpy(values)[None]  # (1, n): a short clip runs unpadded
            else:
                padded = np.zeros(math.ceil(len(values) / size) * size, dtype=np.float32)
                padded[: len(values)] = values
                rows = torch.from_numpy(padded).view(-1, size)  # (B, size), last zero-padded
            # Equal-length rows without a mask do not interact, so the baseline's one batch per
            # clip may run in smaller groups to bound memory; the frames are the same.
            per_pass = max(1, budget // rows.shape[1])
            parts = []
            for group in torch.split(rows, per_pass):
                out = self.model(group.to(self.device, self.dtype), output_hidden_states=True)
                parts.append(sum_of_last_layers(final_hidden_states(out), self.spec.layers))
            states = torch.cat(parts)  # (B, T, D)
            frames = states.reshape(-1, states.shape[-1]).double().cpu().numpy()  # (B*T, D)
            utterances[index] = frames.mean(axis=0)
            if pool is not None:
                # Padding frames keep their place in time, past the clip's end, as in the
                # baseline's frame-level output.
                starts = size * np.arange(states.shape[0])[:, None] + hop * np.arange(
                    states.shape[1]
                )
                windows.append(_pool_windows(frames, starts.ravel() / rate, pool))
        return utterances, windows


@dataclass(frozen=True)
class FrameWindows:
    """One clip's frame-level features: window means, their start times and frame counts."""

    vectors: np.ndarray  # (w, D) float32
    start_s: np.ndarray  # (w,) float32, seconds into the clip
    n_frames: np.ndarray  # (w,) int32: model frames in each window (the last may hold fewer)


def _pool_windows(frames: np.ndarray, times: np.ndarray, pool: int) -> FrameWindows:
    """Means of consecutive groups of `pool` frames (float64 in, float32 out)."""
    starts = np.arange(0, len(frames), pool)
    sums = np.add.reduceat(frames, starts, axis=0)
    n = np.diff(np.append(starts, len(frames)))
    return FrameWindows(
        (sums / n[:, None]).astype(np.float32),
        times[starts].astype(np.float32),
        n.astype(np.int32),
    )


def load_acoustic(
    spec: ExtractorSpec, model_path: Path, device: torch.device, dtype: torch.dtype
) -> AcousticEncoder:
    """An AcousticEncoder from a transformers save_pretrained HuBERT folder."""
    from transformers import AutoFeatureExtractor, HubertModel

    feature_extractor = AutoFeatureExtractor.from_pretrained(model_path, local_files_only=True)
    model = HubertModel.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    return AcousticEncoder(
        spec,
        model.to(device),
        feature_extractor,
        device=device,
        dtype=dtype,
        model_path=model_path,
    )
