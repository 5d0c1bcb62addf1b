"""In-memory features of a set of videos: the one input convention of the training engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_contracts.labels import MODALITIES, NUM_CLASSES

UNLABELLED = -1


_CHECK_ROWS = 4096  # rows per block of the finiteness check: bounded temporary memory


def _nonfinite_rows(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Bool mask of present rows of `x` holding NaN or inf, checked block by block so that a
    memory-mapped matrix is never copied whole."""
    bad = np.zeros(len(x), dtype=bool)
    for lo in range(0, len(x), _CHECK_ROWS):
        block = slice(lo, lo + _CHECK_ROWS)
        bad[block] = present[block] & ~np.isfinite(x[block]).all(axis=1)
    return bad


@dataclass
class FeatureSet:
    """Utterance-level features of N videos: one float32 matrix and one presence mask per modality.

    `labels` holds class indices (order of `data_contracts.labels.CLASSES`) and -1 for
    unlabelled videos. A missing modality is a False in `present`; its feature row is ignored
    (it may hold zeros or NaN), never read as a real vector.
    """

    video_ids: np.ndarray  # (N,) str
    features: dict[str, np.ndarray]  # modality -> float32 (N, d_m)
    present: dict[str, np.ndarray]  # modality -> bool (N,)
    labels: np.ndarray  # int64 (N,), -1 = unlabelled

    def __post_init__(self) -> None:
        self.video_ids = np.asarray(self.video_ids).astype(str)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.video_ids)
        if set(self.features) != set(MODALITIES) or set(self.present) != set(MODALITIES):
            raise ValueError(
                f"FeatureSet needs features and presence masks for exactly {MODALITIES}; got "
                f"features for {sorted(self.features)} and masks for {sorted(self.present)}"
            )
        self.features = {m: np.asarray(self.features[m], dtype=np.float32) for m in MODALITIES}
        self.present = {m: np.asarray(self.present[m], dtype=bool) for m in MODALITIES}
        for m in MODALITIES:
            x, p = self.features[m], self.present[m]
            if x.ndim != 2 or x.shape[0] != n or p.shape != (n,):
                raise ValueError(
                    f"modality {m!r}: features {x.shape} and mask {p.shape} do not match "
                    f"{n} video ids; expected ({n}, d) and ({n},)"
                )
            bad = _nonfinite_rows(x, p)
            if bad.any():
                ids = self.video_ids[bad][:5].tolist()
                raise ValueError(
                    f"modality {m!r} has non-finite values in {int(bad.sum())} present rows "
                    f"(e.g. {ids}); mark those rows missing in `present` or fix the extractor"
                )
        if self.labels.shape != (n,):
            raise ValueError(f"labels have shape {self.labels.shape}; expected ({n},)")
        wrong = (self.labels < UNLABELLED) | (self.labels >= NUM_CLASSES)
        if wrong.any():
            raise ValueError(
                f"labels must be in -1..{NUM_CLASSES - 1}; found {sorted(set(self.labels[wrong]))}"
            )
        nothing = ~np.stack([self.present[m] for m in MODALITIES]).any(axis=0)
        if nothing.any():
            ids = self.video_ids[nothing][:5].tolist()
            raise ValueError(
                f"{int(nothing.sum())} videos have no modality present (e.g. {ids}); "
                "drop them before training or prediction, they carry no features"
            )

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def dims(self) -> dict[str, int]:
        """Feature dimension per modality."""
        return {m: int(self.features[m].shape[1]) for m in MODALITIES}

    @property
    def labelled(self) -> np.ndarray:
        """Bool mask (N,) of rows that carry a label."""
        return self.labels >= 0

    def subset(self, index: np.ndarray | Sequence[int]) -> FeatureSet:
        """Rows `index` (a bool mask or integer indices, repeats allowed) as a new FeatureSet."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return FeatureSet(
            video_ids=self.video_ids[idx],
            features={m: self.features[m][idx] for m in MODALITIES},
            present={m: self.present[m][idx] for m in MODALITIES},
            labels=self.labels[idx],
        )

    def with_labels(self, labels: np.ndarray) -> FeatureSet:
        """The same rows with other labels (e.g. pseudo labels)."""
        return FeatureSet(self.video_ids, self.features, self.present, labels)

    @staticmethod
    def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
        """Rows of several FeatureSets, in order; dimensions must agree."""
        if not parts:
            raise ValueError("FeatureSet.concat needs at least one FeatureSet")
        dims = parts[0].dims
        for p in parts[1:]:
            if p.dims != dims:
                raise ValueError(f"cannot concatenate FeatureSets with dims {dims} and {p.dims}")
        return FeatureSet(
            video_ids=np.concatenate([p.video_ids for p in parts]),
            features={m: np.concatenate([p.features[m] for p in parts]) for m in MODALITIES},
            present={m: np.concatenate([p.present[m] for p in parts]) for m in MODALITIES},
            labels=np.concatenate([p.labels for p in parts]),
        )


@dataclass
class TensorBatch:
    """Torch views of (part of) a FeatureSet, ready for a model's forward."""

    features: dict[str, torch.Tensor]  # modality -> (B, d_m) float32
    present: dict[str, torch.Tensor]  # modality -> (B,) bool
    labels: torch.Tensor  # (B,) int64
    # (B,) int64, equal values = the same video (oversampled copies); None = all distinct.
    groups: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> TensorBatch:
        """The same batch on `device`."""
        return TensorBatch(
            features={m: v.to(device, non_blocking=True) for m, v in self.features.items()},
            present={m: v.to(device, non_blocking=True) for m, v in self.present.items()},
            labels=self.labels.to(device, non_blocking=True),
            groups=None if self.groups is None else self.groups.to(device, non_blocking=True),
        )


def video_groups(video_ids: np.ndarray) -> np.ndarray:
    """int64 (N,): one integer per distinct video id, the same for every copy of a video."""
    ids = np.asarray(video_ids)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(ids, return_inverse=True)[1].reshape(-1).astype(np.int64)


def to_tensors(data: FeatureSet, device: str | torch.device = "cpu") -> TensorBatch:
    """Whole FeatureSet as tensors; on CPU the arrays are shared, not copied. `groups` numbers
    the distinct video ids, so oversampled copies of a video share one value."""
    return TensorBatch(
        features={m: torch.from_numpy(data.features[m]).to(device) for m in MODALITIES},
        present={m: torch.from_numpy(data.present[m]).to(device) for m in MODALITIES},
        labels=torch.from_numpy(data.labels).to(device),
        groups=torch.from_numpy(video_groups(data.video_ids)).to(device),
    )


def take(batch: TensorBatch, index: torch.Tensor) -> TensorBatch:
    """Rows `index` of a TensorBatch."""
    return TensorBatch(
        features={m: v.index_select(0, index) for m, v in batch.features.items()},
        present={m: v.index_select(0, index) for m, v in batch.present.items()},
        labels=batch.labels.index_select(0, index),
        groups=None if batch.groups is None else batch.groups.index_select(0, index),
    )


def as_index_tensor(index: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Integer row indices as a long tensor on `device`."""
    return torch.as_tensor(np.asarray(index, dtype=np.int64), device=device)


def check_mapping_keys(name: str, given: Mapping[str, object], valid: Sequence[str]) -> None:
    """Raise if `given` has keys outside `valid`, listing the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; valid keys are {', '.join(valid)}")
