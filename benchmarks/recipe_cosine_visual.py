"""How far merflow's default visual features are from the challenge baseline's recipe (mertools),
as cosine similarities of per-video features, on the tiny CLIP and the demo's face.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/recipe_cosine_visual.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/recipe_cosine_visual.py --videos 8 --frames 12

Each "video" is `--frames` aligned 112 px crops of the demo corpus's face (tasks/demo/media.py:
the astronaut with an expression, tinted and shifted a little per frame). Rows printed:

- CLIP recipe: merflow's default (open_clip preprocessing, fp32 on a CPU) vs mertools (the
  baseline's transformers CLIP processor, fp32) on the same crops: what `models.visual_recipe`
  changes on a CPU. On CUDA merflow's default computes in bf16: the next row, run here on the
  CPU's bf16 kernels (CUDA's round differently), is only an estimate of that.
- OpenFace crops (a model-free part of the baseline's recipe, the same CLIP on both sides):
  failed frames as black crops in the mean (mertools) vs left out (merflow), at a given share of
  failed frames; and the background masked black (mertools) vs not (merflow).

The tiny CLIP has seeded random weights: its figures show the direction and rough size of
each difference, not ViT-L/14's. `--full` adds the bf16 row for a full-size ViT-L/14 with
seeded random weights (~2 GB of memory, seconds per crop on a CPU): the architecture's rounding,
still not the trained weights'. `default sha256` fingerprints merflow's default features:
the same value before and after a change shows the change left the default alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from models.extractors import load_extractor
from models.registry import get_spec
from models.tiny import build_tiny_models
from tasks.demo.media import EXPRESSIONS, FACE_BOX_PX, FACE_CENTER_XY, face_image

SIDE = 112


def demo_crops(video: int, frames: int) -> list[np.ndarray]:
    """One video's aligned crops (RGB uint8): the demo face, its expression and tint per video,
    a little shift and brightness change per frame."""
    rng = np.random.default_rng(video)
    src = face_image(EXPRESSIONS[video % len(EXPRESSIONS)], 0.5 + 0.5 * rng.random())
    gains = 0.8 + 0.4 * rng.random(3)
    crops = []
    for _ in range(frames):
        shift = rng.normal(0.0, 3.0, 2)
        scale = SIDE / (1.4 * FACE_BOX_PX)  # the face with a margin, as an aligner frames it
        m = cv2.getRotationMatrix2D(FACE_CENTER_XY, float(rng.normal(0.0, 2.0)), scale)
        m[:, 2] += SIDE / 2 - np.array(FACE_CENTER_XY) + shift
        crop = cv2.warpAffine(src, m, (SIDE, SIDE), flags=cv2.INTER_LINEAR)
        crops.append(np.clip(crop * gains * (0.9 + 0.2 * rng.random()), 0, 255).astype(np.uint8))
    return crops


def masked(crop: np.ndarray) -> np.ndarray:
    """The crop with the background black outside an ellipse around the face, as OpenFace's
    default mask (the landmarks' hull) leaves it."""
    out = crop.copy()
    yy, xx = np.mgrid[:SIDE, :SIDE]
    outside = ((xx - SIDE / 2) / (0.36 * SIDE)) ** 2 + ((yy - 0.55 * SIDE) / (0.42 * SIDE)) ** 2 > 1
    out[outside] = 0
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def means(encoder, videos: list[list[np.ndarray]]) -> np.ndarray:
    """Each video's feature: the mean of its crops' features, (videos, D)."""
    return np.stack([encoder.embed(v).mean(axis=0) for v in videos])


def report(label: str, a: np.ndarray, b: np.ndarray) -> None:
    """One printed row: min and mean cosine over the videos, and the largest difference."""
    c = cosine(a, b)
    diff = float(np.abs(a - b).max())
    print(f"{label:<64} cos min {c.min():.6f} mean {c.mean():.6f}  max|diff| {diff:.2e}")


def main() -> None:
    """Print the cosine rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--failed", type=float, default=0.25, help="share of failed frames")
    p.add_argument("--models-dir", type=Path, default=None, help="default: a scratch folder")
    p.add_argument("--seed", type=int, default=0, help="the tiny models' seed")
    p.add_argument("--full", action="store_true", help="also a random full-size ViT-L/14")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny models gain nothing from more; the machine is shared

    with tempfile.TemporaryDirectory(prefix="recipe-cosine-") as tmp:
        models_dir = build_tiny_models(args.models_dir or Path(tmp), seed=args.seed)
        folder = models_dir["tiny-clip-vit"]
        spec = get_spec("tiny-clip-vit")
        default = load_extractor(spec, folder, "cpu")
        mertools = load_extractor(dataclasses.replace(spec, recipe="mertools"), folder, "cpu")
        bf16 = load_extractor(spec, folder, "cpu", dtype="bf16")

        videos = [demo_crops(v, args.frames) for v in range(args.videos)]
        ours = means(default, videos)
        print(f"tiny CLIP (seed {args.seed}), {args.videos} videos x {args.frames} demo crops")
        print(f"ids: {default.extractor_id()} (merflow), {mertools.extractor_id()} (mertools)")
        print(f"default sha256: {hashlib.sha256(ours.astype(np.float32).tobytes()).hexdigest()}")
        baseline = means(mertools, videos)
        report("CLIP recipe: merflow default (fp32, CPU) vs mertools", ours, baseline)
        in_bf16 = means(bf16, videos)
        report("CLIP recipe: merflow default in bf16 (CUDA's dtype) vs mertools", in_bf16, baseline)

        n_failed = max(1, round(args.failed * args.frames))
        black = np.zeros((SIDE, SIDE, 3), np.uint8)
        kept = [v[n_failed:] for v in videos]  # merflow: the failed frames dropped
        with_black = [[black] * n_failed + v for v in kept]  # mertools: kept as black crops
        report(
            f"faces: {n_failed}/{args.frames} failed frames kept black vs dropped",
            means(mertools, with_black),
            means(mertools, kept),
        )
        report(
            "faces: background masked (OpenFace default) vs not (-nomask)",
            means(mertools, [[masked(c) for c in v] for v in videos]),
            means(mertools, videos),
        )
    if args.full:
        full_size_bf16(videos[:2], args.seed)


def full_size_bf16(videos: list[list[np.ndarray]], seed: int) -> None:
    """The bf16 row for ViT-L/14 at full size, seeded random weights, on the CPU."""
    from models.tiny import random_encoder

    spec = get_spec("clip-vit-large-patch14")
    torch.manual_seed(seed)
    fp32 = random_encoder(spec, "cpu", torch.float32)
    low = random_encoder(spec, "cpu", torch.bfloat16)
    low.visual.load_state_dict(fp32.visual.state_dict())  # the same weights, rounded to bf16
    label = f"ViT-L/14 (random): bf16 vs fp32, {len(videos)} videos x {len(videos[0])} crops"
    report(label, means(low, videos), means(fp32, videos))


if __name__ == "__main__":
    main()
