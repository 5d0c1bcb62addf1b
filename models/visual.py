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
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SplitTransform:
    """open_clip's eval transform taken apart: its PIL stages (resize, centre crop, RGB), whose
    output is `side` x `side` whatever the input, and ToTensor + Normalize as one lookup table
    per channel (3, 256) float32: value v of channel c becomes ((v / 255) - mean[c]) / std[c],
    computed by torchvision's own float operations, so the lookup gives the transform's values
    to the bit in one pass (the two tensor stages take three)."""

    pil_stages: Callable[[Image.Image], Image.Image]
    side: int
    table: np.ndarray

    def into(self, image: Image.Image, out: np.ndarray) -> None:
        """`image` preprocessed into `out`, (3, side, side): float32, the transform's values;
        uint8, the pixels after the PIL stages, channels first (looked up later, on_device)."""
        pixels = np.asarray(self.pil_stages(image))  # (side, side, 3) uint8
        if out.dtype == np.uint8:
            np.copyto(out, pixels.transpose(2, 0, 1))
            return
        for c in range(3):  # indices are uint8 and the table has 256 rows: 'clip' clips nothing
            np.take(self.table[c], pixels[..., c], out=out[c], mode="clip")

    @staticmethod
    def on_device(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The lookup on a (B, 3, side, side) uint8 batch where it lies (a GPU): the same float32
        values as on the CPU, from a quarter of the bytes copied. `table`: `self.table` there."""
        offsets = torch.arange(3, device=pixels.device).view(1, 3, 1, 1) * 256
        return table.reshape(-1)[pixels.long() + offsets]


def split_transform(preprocess: Callable[[Image.Image], torch.Tensor]) -> SplitTransform | None:
    """A torchvision Compose of PIL stages with a fixed output size, then ToTensor and Normalize
    (open_clip's eval transform), taken apart; None for any other transform."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    stages = list(getattr(preprocess, "transforms", []))
    if len(stages) < 2 or type(stages[-1]) is not T.Normalize:
        return None
    to_tensor, normalize = stages[-2], stages[-1]
    if not isinstance(to_tensor, T.ToTensor):
        return None
    if any(isinstance(t, (T.ToTensor, T.PILToTensor, T.Normalize)) for t in stages[:-2]):
        return None
    if bool((torch.as_tensor(normalize.std) == 0).any()):
        return None
    pil_stages = T.Compose(stages[:-2])
    shapes = {np.asarray(pil_stages(Image.new("RGB", size))).shape for size in ((8, 8), (5, 9))}
    first = shapes.pop() if len(shapes) == 1 else ()
    if len(first) != 3 or first[0] != first[1] or first[2] != 3:
        return None  # no fixed square RGB output: the transform runs whole
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    table = normalize(F.to_tensor(values))[:, 0, :]  # (3, 256): an image of those pixels
    return SplitTransform(pil_stages, int(first[0]), np.ascontiguousarray(table.numpy()))


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
        # open_clip's transform: its PIL stages, then one table lookup for the tensor stages.
        self._split = split_transform(preprocess)
        # On a GPU, batches are prepared ahead on CPU threads while the model runs (a CPU
        # forward uses those threads itself).
        self.prefetch = self.device.type != "cpu"
        self.batch_size = batch_size
        self.output_dim = int(getattr(visual, "output_dim", spec.output_dim or 0))
        if spec.output_dim is not None and self.output_dim != spec.output_dim:
            raise CheckpointMismatchError(
                f"extractor {spec.name} expects {spec.output_dim}-d image features but the "
                f"checkpoint at {model_path} gives {self.output_dim}-d; check the folder"
            )

    def _image(self, index: int, crop: np.ndarray) -> Image.Image:
        """One crop as a PIL image, or an error naming the crop."""
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
        return Image.fromarray(np.ascontiguousarray(crop))

    def _prepare(self, index: int, crop: np.ndarray, out: torch.Tensor | None) -> torch.Tensor:
        """One crop through the model's own preprocessing: written into `out`, its row of the
        batch, where the transform splits (split_transform), else a new (3, S, S) tensor."""
        image = self._image(index, crop)
        if out is None or self._split is None:
            return self.preprocess(image)
        self._split.into(image, out.numpy())
        return out

    @torch.inference_mode()
    def embed(self, crops: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Image features of each crop, (n, output_dim) float32; the caller pools per video.

        The crops are preprocessed on torch's intra-op thread count of CPU threads (PIL and
        numpy release the GIL; the values are those of the transform run crop by crop). On a
        GPU (`prefetch`) the next two batches are preprocessed while the model runs one, and
        open_clip's transform ends on the GPU: uint8 pixels are copied and looked up there. On
        one core the transform takes ~1 ms a 112 px crop, the baseline's processor ~2 ms, and
        an H200 runs ViT-L/14 in bf16 at ~1,800 crops/s, the tower alone (docs/sizing.md)."""
        size = batch_size or self.batch_size
        rows: list[np.ndarray] = [np.zeros((0, self.output_dim), dtype=np.float32)]
        starts = range(0, len(crops), size)
        if len(starts) == 0:
            return rows[0]
        workers = max(1, torch.get_num_threads())
        ahead = 2 if self.prefetch else 0  # batches prepared while the model runs one
        # The split transform writes each batch in place, into one of ahead + 1 blocks (a
        # fresh 38 MB tensor per batch of 64 costs page faults): uint8 pixels with prefetch,
        # looked up on the device; else the float32 values.
        blocks: list[torch.Tensor] = []
        table: torch.Tensor | None = None
        if self._split is not None:
            side, n = self._split.side, min(size, len(crops))
            dtype = torch.uint8 if self.prefetch else torch.float32
            blocks = [torch.empty((n, 3, side, side), dtype=dtype) for _ in range(ahead + 1)]
            if self.prefetch:
                table = torch.from_numpy(self._split.table).to(self.device)

        def rows_of(k: int) -> list[torch.Tensor | None]:
            part = len(crops[starts[k] : starts[k] + size])
            return list(blocks[k % len(blocks)][:part]) if blocks else [None] * part

        def batch(k: int, ready: list[torch.Tensor]) -> torch.Tensor:
            return blocks[k % len(blocks)][: len(ready)] if blocks else torch.stack(ready)

        with ThreadPoolExecutor(workers, thread_name_prefix="clip-preprocess") as pool:

            def submit(k: int) -> list[Future[torch.Tensor]]:
                part, outs = crops[starts[k] : starts[k] + size], rows_of(k)
                first = starts[k]
                return [
                    pool.submit(self._prepare, first + i, c, outs[i]) for i, c in enumerate(part)
                ]

            pending = deque(submit(k) for k in range(min(ahead + 1, len(starts))))
            try:
                for k in range(len(starts)):
                    ready = [f.result() for f in pending[0]]
                    pending.popleft()
                    rows.append(self._forward(batch(k, ready), table))
                    if k + ahead + 1 < len(starts):  # into the block the model is done with
                        pending.append(submit(k + ahead + 1))
            except BaseException:
                for futures in pending:
                    for f in futures:
                        f.cancel()
                raise
        return np.concatenate(rows, axis=0)

    def _forward(self, batch: torch.Tensor, table: torch.Tensor | None) -> np.ndarray:
        """One batch of preprocessed crops through the image tower, (B, output_dim) float32;
        uint8 pixels are looked up in `table` on the device first. The copy to a GPU (from
        pageable memory) and a CPU forward are done with `batch`'s memory when this returns."""
        x = batch.to(self.device)
        if table is not None:
            x = SplitTransform.on_device(x, table)
        features = self.visual(x.to(self.dtype))  # (B, output_dim)
        return features.float().cpu().numpy()


def mertools_preprocess(
    model_path: Path | None, image_size: int
) -> Callable[[Image.Image], torch.Tensor]:
    """The baseline's preprocessing: transformers' CLIP image processor from the folder's
    preprocessor_config.json, else (or with no folder) from OpenAI's values at the model's
    input size."""
    # transformers 4.x's CLIPImageProcessor (the baseline's) resized with PIL; in 5.x that
    # class resizes with torchvision (0.015 max abs pixel difference) and the PIL one is this.
    from transformers import CLIPImageProcessorPil

    config = model_path / "preprocessor_config.json" if model_path is not None else None
    if config is not None and config.is_file():
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
