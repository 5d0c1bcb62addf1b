"""CLIP image features for aligned face crops (open_clip; preprocessing travels with the model).

Two recipes (`ExtractorSpec.recipe`, docs/method.md §2): merflow's, open_clip's own
preprocessing in the device's fast dtype; and "mertools", the challenge baseline's (MERTools'
extract_vision_huggingface.py): transformers' CLIP image processor as transformers 4.x ran it
(PIL bicubic resize of the shortest edge, centre crop, rescale, OpenAI's mean and std), always
in fp32. Both run open_clip's image tower, the same weights as Hugging Face's
openai/clip-vit-large-patch14, whose `get_image_features` is the projected CLS embedding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.encoders import Extractor, dtype_name
from models.registry import CheckpointMismatchError, ExtractorInputError, ExtractorSpec

logger = logging.getLogger(__name__)

# open_clip's precision names: weights in low precision with fp32 LayerNorms, as it casts them.
_PRECISION = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}

MERTOOLS = "mertools"
# openai/clip-vit-large-patch14's preprocessor_config.json, less the sizes (the model's input
# size is used): what the baseline's processor does when a folder ships no such file.
OPENAI_CLIP_PROCESSOR: dict[str, object] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


class RecipeDtypeError(ValueError):
    """A recipe asked to compute in a dtype it does not allow (mertools: fp32 only)."""


class VisualEncoder(Extractor):
    """Embeds face crops (uint8 HxWx3 RGB arrays) with a CLIP image tower, one row per crop;
    `preprocess` is the recipe's (a PIL image in, a (3, S, S) float tensor out)."""

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


def mertools_preprocess(model_path: Path, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The baseline's preprocessing: transformers' CLIP image processor from the folder's
    preprocessor_config.json, else from OpenAI's values at the model's input size."""
    # transformers 4.x's CLIPImageProcessor (the baseline's) resized with PIL; in 5.x that
    # class resizes with torchvision (0.015 max abs pixel difference) and the PIL one is this.
    from transformers import CLIPImageProcessorPil

    config = model_path / "preprocessor_config.json"
    if config.is_file():
        processor = CLIPImageProcessorPil.from_pretrained(str(model_path), local_files_only=True)
    else:
        side = {"shortest_edge": image_size}
        crop = {"height": image_size, "width": image_size}
        processor = CLIPImageProcessorPil(size=side, crop_size=crop, **OPENAI_CLIP_PROCESSOR)
    crop_size = (processor.crop_size.height, processor.crop_size.width)
    if crop_size != (image_size, image_size):
        raise CheckpointMismatchError(
            f"{config} crops images to {crop_size[0]}x{crop_size[1]} but the model at "
            f"{model_path} takes {image_size}px; fix crop_size there or remove the file"
        )

    def preprocess(image: Image.Image) -> torch.Tensor:
        pixels = processor(images=image, return_tensors="np")["pixel_values"][0]
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))  # (3, S, S)

    return preprocess


def _quick_gelu(spec: ExtractorSpec, model_path: Path) -> bool:
    """Whether to force QuickGELU: the spec's architecture says so (open_clip's `-quickgelu`
    names); a folder whose config omits it would otherwise build a GELU tower silently."""
    wanted = spec.architecture.endswith("-quickgelu")
    config = model_path / "open_clip_config.json"
    if wanted and config.is_file():
        model_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {})
        if model_cfg.get("quick_gelu") is not True:
            logger.warning(
                "%s has no quick_gelu: true but extractor %s is %s (weights trained with "
                "QuickGELU); building it with QuickGELU",
                config,
                spec.name,
                spec.architecture,
            )
    return wanted


def load_visual(
    spec: ExtractorSpec, model_path: Path, device: torch.device, dtype: torch.dtype
) -> VisualEncoder:
    """A VisualEncoder from an open_clip folder, or from a weights file of a built-in model."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if spec.recipe == MERTOOLS and dtype != torch.float32:
        raise RecipeDtypeError(
            f"extractor {spec.name} with recipe mertools computes in fp32 as the challenge "
            f"baseline did, but {dtype_name(dtype)} was asked for; set models.dtype=float32 "
            "(models.extractors.effective_dtype does), or use models.visual_recipe=merflow"
        )
    precision = _PRECISION[dtype_name(dtype)]
    quick_gelu = _quick_gelu(spec, model_path)
    if (model_path / "open_clip_config.json").is_file():
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{model_path}",
            precision=precision,
            device=device,
            force_quick_gelu=quick_gelu,
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
            force_quick_gelu=quick_gelu,
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
    if spec.recipe == MERTOOLS:
        preprocess = mertools_preprocess(model_path, image_size)
    return VisualEncoder(
        spec, visual, preprocess, device=device, dtype=dtype, model_path=model_path
    )
