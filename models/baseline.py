"""The MER2024 challenge baseline: per-modality MLP encoders and attention fusion."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from data_contracts.labels import MODALITIES, NUM_CLASSES
from models.mrccl import PAPER_DIMS, config_from_dict, masked_rows, normalize_rows
from models.settings import default


@dataclass
class BaselineConfig:
    """Settings of the attention-fusion baseline; saved beside each checkpoint."""

    dims: dict[str, int] = field(default_factory=lambda: dict(PAPER_DIMS))
    hidden: int = default("hidden")  # the same width as MR-CCL's (models/settings.py)
    dropout: float = default("baseline_dropout")
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if set(self.dims) != set(MODALITIES):
            raise ValueError(f"dims must name exactly {MODALITIES}; got {sorted(self.dims)}")
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"need hidden >= 1 and 0 <= dropout < 1; got {self.hidden}, {self.dropout}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineConfig:
        """Config from a mapping; unknown keys are errors."""
        return config_from_dict(cls, data)


class BaselineNet(nn.Module):
    """MLP encoder per modality; an attention over the three modality vectors fuses them."""

    model_type = "baseline"

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        self.config = cfg
        h, p = cfg.hidden, cfg.dropout
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(cfg.dims[m], h), nn.ReLU(), nn.Dropout(p),
                    nn.Linear(h, h), nn.ReLU(), nn.Dropout(p),
                )
                for m in MODALITIES
            }
        )  # fmt: skip
        self.attention_mlp = nn.Sequential(
            nn.Linear(len(MODALITIES) * h, h), nn.ReLU(), nn.Dropout(p)
        )
        self.attention_score = nn.Linear(h, len(MODALITIES))
        self.head = nn.Sequential(
            nn.Linear(h, h), nn.ReLU(), nn.Dropout(p), nn.Linear(h, cfg.num_classes)
        )

    def forward(
        self, features: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Class logits (B, C) for a batch of B videos."""
        hidden = [
            masked_rows(
                self.encoders[m](normalize_rows(masked_rows(features[m], present[m]))), present[m]
            )
            for m in MODALITIES
        ]  # 3 x (B, hidden), zero where the modality is missing
        scores = self.attention_score(self.attention_mlp(torch.cat(hidden, -1)))  # (B, 3)
        mask = torch.stack([present[m] for m in MODALITIES], -1)  # (B, 3)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # missing -> weight 0
        fused = (torch.stack(hidden, -1) * weights.unsqueeze(1)).sum(-1)  # (B, hidden)
        return self.head(fused)
