"""What every encoder shares (models/visual.py, acoustic.py, asr.py, text.py): the `Extractor`
record of spec, device, dtype and checkpoint, batching by padded length, and the pooling of
hidden states. Loading and caching encoders is models/extractors.py, which imports the encoder
modules; they import this one, so the imports run one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.registry import ExtractorSpec, checkpoint_revision, extractor_id

# Compute dtypes by their short names.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name ('fp32', 'bf16', 'fp16') of a torch dtype."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported compute dtype {dtype}; use fp32, bf16 or fp16")


class Extractor:
    """What every loaded extractor knows about itself: spec, device, dtype, checkpoint."""

    def __init__(
        self,
        spec: ExtractorSpec,
        device: torch.device,
        dtype: torch.dtype,
        model_path: Path | None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.model_path = model_path
        # In-memory models (benchmarks, shape tests) have no checkpoint on disk.
        self.revision = (
            checkpoint_revision(spec, model_path) if model_path is not None else "random-init"
        )

    @property
    def dtype_name(self) -> str:
        """Short name of the compute dtype ('fp32', 'bf16', 'fp16')."""
        return dtype_name(self.dtype)

    def extractor_id(self, **settings: Any) -> str:
        """The id keying this extractor's rows: spec, checkpoint, dtype and caller settings."""
        return extractor_id(self.spec, dtype=self.dtype_name, checkpoint=self.revision, **settings)

    def __repr__(self) -> str:
        where = self.model_path if self.model_path is not None else "in-memory"
        return f"{type(self).__name__}({self.spec.name}, {where}, {self.device}, {self.dtype_name})"


def pack_batches(
    lengths: Sequence[int], max_padded: int, max_items: int | None = None
) -> list[list[int]]:
    """Group item indices, longest first, so each batch's padded size stays under `max_padded`.

    The padded size of a batch is (items x longest item); an item longer than the budget gets
    a batch of its own rather than being refused.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted longest first, so the batch's first item sets its padded length.
        longest = lengths[current[0]] if current else lengths[index]
        too_many = max_items is not None and len(current) >= max_items
        if current and (too_many or (len(current) + 1) * longest > max_padded):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def final_hidden_states(output: Any) -> tuple[torch.Tensor, ...]:
    """A model output's hidden states with the model's final output as the last entry.

    transformers 4.x returned `last_hidden_state` (after the encoder's final LayerNorm, where it
    has one) as `hidden_states[-1]`; transformers 5 returns the last layer's raw output there for
    a stable-layer-norm HuBERT (`do_stable_layer_norm`, as chinese-hubert-large), while its LLMs
    still tie the two. The challenge baseline averaged the normalised state, so it is put back;
    where the two are equal (post-norm models, LLMs) this changes nothing.
    """
    states = tuple(output.hidden_states)
    last = getattr(output, "last_hidden_state", None)
    if last is None or last is states[-1]:
        return states
    return (*states[:-1], last)


def _last_layers(hidden_states: Sequence[torch.Tensor], layers: int) -> list[torch.Tensor]:
    """The last `layers` hidden states; a model with fewer layers gives all it has.

    `hidden_states` holds the embedding output plus one entry per layer, so a 2-layer tiny model
    has 3 states (the baseline's fixed indices -4..-1 would fail on it).
    """
    return list(hidden_states[-min(layers, len(hidden_states)) :])


def mean_of_last_layers(hidden_states: Sequence[torch.Tensor], layers: int) -> torch.Tensor:
    """Mean of the last `layers` hidden states in float32, (B, T, D)."""
    return torch.stack([h.float() for h in _last_layers(hidden_states, layers)]).mean(dim=0)


def sum_of_last_layers(hidden_states: Sequence[torch.Tensor], layers: int) -> torch.Tensor:
    """Sum of the last `layers` hidden states, (B, T, D), in float32.

    The challenge baseline's reduction (4x the mean). It sums in the model's own dtype, as the
    baseline did (an fp16 LLM's states are summed in fp16), and only then widens.
    """
    return torch.stack(_last_layers(hidden_states, layers)).sum(dim=0).float()


def masked_sum(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over time of the states where mask is true, and the count: (B, D), (B,)."""
    weights = mask.to(states.dtype).unsqueeze(-1)  # (B, T, 1)
    return (states * weights).sum(dim=1), mask.sum(dim=1)
