"""CLIP image features for aligned face crops (open_clip; preprocessing travels with the model)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.extractors import Extractor, dtype_name
from models.registry import CheckpointMismatchError, ExtractorInputError, ExtractorSpec

logger = logging.getLogger(__name__)

# open_clip's precision names: weights in low precision with fp32 LayerNorms, as it casts them.
_PRECISION = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


class VisualEncoder(Extractor):
    """Embeds face crops (uint8 HxWx3 RGB arrays) with a CLIP image tower, one row per crop."""

    def __init__(
        self,
        spec: ExtractorSpec,
        visual: nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_path: Path | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(spec, device, dtype, model_path)
        self.visual = visual.eval()
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.output_dim = int(getattr(visual, "output_dim", spec.output_dim or 0))
        if spec.output_dim is not None and self.output_dim != spec.output_dim:
            raise CheckpointMismatchError(
                f"extractor {spec.name} expects {spec.output_dim}-d image features but the "
                f"checkpoint at {model_path} gives {self.output_dim}-d; check the folder"
            )

    def _tensor(self, index: int, crop: np.ndarray) -> torch.Tensor:
        """One crop through the model's own preprocessing, or an error naming the crop."""
        if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8:
            kind = crop.dtype if isinstance(crop, np.ndarray) else type(crop).__name__
            raise ExtractorInputError(
                f"face crop {index} is {kind}, expected a uint8 HxWx3 RGB array; convert it "
                "with np.asarray(img, dtype=np.uint8)"
            )
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] < 1 or crop.shape[1] < 1:
            raise ExtractorInputError(
                f"face crop {index} has shape {crop.shape}, expected HxWx3 (RGB, H and W >= 1)"
            )
        return self.preprocess(Image.fromarray(np.ascontiguousarray(crop)))

    @torch.inference_mode()
    def embed(self, crops: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Image features of each crop, (n, output_dim) float32; the caller pools per video."""
        size = batch_size or self.batch_size
        rows: list[np.ndarray] = [np.zeros((0, self.output_dim), dtype=np.float32)]
        for start in range(0, len(crops), size):
            batch = torch.stack(
                [self._tensor(start + i, c) for i, c in enumerate(crops[start : start + size])]
            )  # (B, 3, S, S)
            features = self.visual(batch.to(self.device, self.dtype))  # (B, output_dim)
            rows.append(features.float().cpu().numpy())
        return np.concatenate(rows, axis=0)


def load_visual(
    spec: ExtractorSpec, model_path: Path, device: torch.device, dtype: torch.dtype
) -> VisualEncoder:
    """A VisualEncoder from an open_clip folder, or from a weights file of a built-in model."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    precision = _PRECISION[dtype_name(dtype)]
    if (model_path / "open_clip_config.json").is_file():
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{model_path}", precision=precision, device=device
        )
    else:
        weights = next(f for f in spec.weight_files if (model_path / f).is_file())
        # A bare weights file carries no preprocessing; the pretrained tag's is the one the
        # weights were trained with (OpenAI's mean/std, bicubic resize of the shortest side).
        tag_cfg = get_pretrained_cfg(spec.architecture, spec.pretrained_tag or "") or {}
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.architecture,
            pretrained=str(model_path / weights),
            precision=precision,
            device=device,
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
        )
    # Only the image tower is used; dropping the text tower frees a third of ViT-L/14.
    visual = model.visual
    del model
    image_size = visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    if spec.image_size is not None and image_size != spec.image_size:
        raise CheckpointMismatchError(
            f"extractor {spec.name} expects {spec.image_size}px input but the checkpoint at "
            f"{model_path} is built for {image_size}px; check the folder"
        )
    return VisualEncoder(
        spec, visual, preprocess, device=device, dtype=dtype, model_path=model_path
    )
