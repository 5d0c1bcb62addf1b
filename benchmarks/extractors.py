"""Forward throughput of the feature extractors: images/s, audio seconds/s, tokens/s.

    .venv/bin/python benchmarks/extractors.py                     # tiny models, CPU
    .venv/bin/python benchmarks/extractors.py --paper --device cuda --dtype bf16
    .venv/bin/python benchmarks/extractors.py --paper --models-dir /models --kinds visual,text

Default: the tiny-* checkpoints (built seeded into a temporary folder), loaded through
load_extractor like the pipeline does. With --paper: the real architectures, from their
checkpoints when --models-dir or the Hugging Face cache holds them, else with random weights
of the same shape (said so in the output; speed does not depend on the weights). The WeNet
model has no random stand-in: without its checkpoint it is skipped. Figures are end to end
(preprocessing, batching, forward, pooling), after one warm-up call.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from flows.config import load_settings
from models.extractors import (
    clear_extractor_cache,
    effective_dtype,
    load_extractor,
    resolve_device,
    resolve_dtype,
)
from models.registry import ModelNotFoundError, resolve_model_path, spec_as_run, specs_of
from models.tiny import CORPUS, build_tiny_models, random_encoder

KINDS = ("visual", "acoustic", "asr", "text")


def workload(kind: str, args: argparse.Namespace) -> tuple[list[Any], float, str]:
    """Inputs for one kind, the amount of work they hold, and its unit."""
    rng = np.random.default_rng(0)
    if kind == "visual":
        crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(args.crops)]
        return crops, float(len(crops)), "images/s"
    if kind in ("acoustic", "asr"):
        n = int(args.audio_seconds * 16_000)
        t = np.arange(n) / 16_000
        clips = [
            (0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t) + 0.05 * rng.standard_normal(n)).astype(
                np.float32
            )
            for i in range(args.clips)
        ]
        return clips, args.clips * args.audio_seconds, "audio s/s"
    sentence = "".join(CORPUS)
    texts = [sentence[i % len(CORPUS) :] * args.text_repeat for i in range(args.texts)]
    return texts, 0.0, "tokens/s"  # tokens are counted by the encoder's tokenizer


def runner(kind: str, encoder: Any, models: Any) -> Callable[[list[Any]], Any]:
    """The encoder call for this kind, with the batch budget the profile gives the pipeline's
    stage (flows/plan.py model_choices)."""
    if kind == "asr":
        return encoder.transcribe
    if kind == "visual":
        return functools.partial(encoder.embed, batch_size=models.visual_batch)
    if kind == "acoustic":
        budget = int(models.audio_batch_seconds * encoder.spec.sample_rate)
        return functools.partial(encoder.embed, max_batch_samples=budget)
    return functools.partial(encoder.embed, max_batch_tokens=models.text_batch_tokens)


def count_tokens(encoder: Any, texts: list[str]) -> int:
    """Tokens the text encoder runs (special ones included, truncation applied)."""
    total = 0
    for i, text in enumerate(texts):
        item = encoder.tokenize(i, text)
        total += len(item[0]) if item is not None else 0
    return total


def get_encoder(
    kind: str, spec: Any, models_dir: Path | None, device: torch.device, dtype: torch.dtype
) -> tuple[Any | None, str]:
    """The loaded encoder and where its weights came from; None when it cannot be built."""
    try:
        path = resolve_model_path(spec, models_dir, allow_download=False)
    except ModelNotFoundError:
        path = None
    if path is not None:
        threads = torch.get_num_threads()
        return load_extractor(spec, path, device, dtype, num_threads=threads), str(path)
    if kind == "asr":
        return None, "skipped: no checkpoint (an ONNX export has no random stand-in)"
    if kind == "text" and device.type == "cpu" and not spec.tiny:
        return None, "skipped: 13B parameters in fp32 need ~53 GB; run with --device cuda"
    # The dtype load_extractor would compute in: the recipe's where it fixes one (mertools).
    encoder = random_encoder(spec, device, effective_dtype(spec, dtype, device))
    return encoder, "random weights (no checkpoint found)"


def measure(kind: str, encoder: Any, inputs: list[Any], repeats: int, models: Any) -> float:
    """Best wall-clock seconds of `repeats` calls, after one warm-up call on a slice."""
    call = runner(kind, encoder, models)
    call(inputs[: max(1, len(inputs) // 4)])
    best = float("inf")
    for _ in range(repeats):
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call(inputs)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def model_only_rate(encoder: Any, crops: list[Any], batch: int, repeats: int) -> float:
    """Images/s of the visual encoder's model alone, on its own preprocessed batches (the
    copy to the device included), the best of `repeats` passes after one warm-up batch."""
    tensors = [encoder.preprocess(Image.fromarray(c)) for c in crops]
    batches = [torch.stack(tensors[i : i + batch]) for i in range(0, len(tensors), batch)]
    with torch.inference_mode():
        encoder.visual(batches[0].to(encoder.device, encoder.dtype))
        best = float("inf")
        for _ in range(repeats):
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches:
                encoder.visual(b.to(encoder.device, encoder.dtype)).float().cpu()
            best = min(best, time.perf_counter() - start)
    return len(crops) / best


def main() -> None:
    """Parse arguments, run each extractor, print one line of figures per extractor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="real architectures, not tiny")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument(
        "--recipe",
        default="profile",
        choices=("profile", "merflow", "mertools"),
        help="profile: each extractor's recipe from the profile (the paper's: mertools, whose "
        "precision is fixed: CLIP and HuBERT fp32, the LLM fp16 on a GPU); or one for all",
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ",".join(KINDS))
    parser.add_argument("--crops", type=int, default=64)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=12.0)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--text-repeat", type=int, default=2, help="corpus copies per text")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = load_settings("paper" if args.paper else "demo", env={}).models
    # Each spec as the profile's stage runs it (tasks/embed.py ModelChoice.spec): its recipe
    # and audio chunk length; --recipe merflow/mertools puts one recipe on every extractor.
    recipes = {k: getattr(models, f"{k}_recipe", None) for k in KINDS if k != "asr"}
    if args.recipe != "profile":
        recipes = dict.fromkeys(recipes, args.recipe)
    chunks = {"acoustic": models.audio_chunk_seconds}
    specs = {
        kind: spec_as_run(spec.name, chunks.get(kind), recipes.get(kind))
        for kind, spec in specs_of(models).items()
    }
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; valid kinds are {', '.join(KINDS)}")

    with tempfile.TemporaryDirectory(prefix="merflow-bench-") as scratch:
        models_dir = args.models_dir
        if not args.paper and models_dir is None:
            models_dir = Path(scratch)
            build_tiny_models(models_dir, seed=0)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"device {device} ({name}), dtype {dtype}, torch threads {torch.get_num_threads()}")
        for kind in kinds:
            spec = specs[kind]
            encoder, source = get_encoder(kind, spec, models_dir, device, dtype)
            if encoder is None:
                print(f"{kind:8s} {spec.name:24s} {source}")
                continue
            inputs, amount, unit = workload(kind, args)
            if kind == "text":
                amount = float(count_tokens(encoder, inputs))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = measure(kind, encoder, inputs, args.repeats, models)
            memory = ""
            if device.type == "cuda":
                memory = f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            print(
                f"{kind:8s} {spec.name:24s} {amount / seconds:10.4g} {unit:9s} "
                f"({amount:.0f} in {seconds:.2f} s, {encoder.dtype_name}, recipe "
                f"{spec.recipe}{memory}; {source})"
            )
            if kind == "visual":  # how much of it is the model: the same crops, preprocessed
                rate = model_only_rate(encoder, inputs, models.visual_batch, args.repeats)
                print(f"{'':8s} {'(the image tower alone)':24s} {rate:10.4g} images/s")
            del encoder
            clear_extractor_cache()  # one model in memory at a time


if __name__ == "__main__":
    main()
