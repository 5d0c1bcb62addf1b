"""How far merflow's default features are from the challenge baseline's recipe, per modality.

    .venv/bin/python benchmarks/recipe_cosine.py                       # tiny models, CPU
    .venv/bin/python benchmarks/recipe_cosine.py --default-dtype bf16   # merflow as on a GPU
    .venv/bin/python benchmarks/recipe_cosine.py --paper --models-dir /models --device cuda

For each modality: the cosine between each input's feature under the default (`merflow`) recipe
and under the `mertools` recipe (the baseline's: docs/method.md §2), the same weights and inputs,
loaded through load_extractor as the pipeline does. "before" is the default as it was before the
final-LayerNorm fix (hidden_states[-1] taken raw, as transformers 5 returns it); "after" is the
default today. Cosine ignores the baseline's x4 (sum of 4 layers, not mean), so what remains is
everything else: for audio the last layer's LayerNorm and, past 10 s, the padding the baseline
averages in. Inputs are demo-like: Mandarin speech from espeak-ng over a faint noise floor (tones
when espeak-ng is absent), clips of 2 to 25 s; the tiny tokenizer's sentences and a few more.
Each modality is one function returning its rows; add one to MODALITIES for another.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.extractors import clear_extractor_cache, load_extractor
from models.registry import get_spec, resolve_model_path
from models.tiny import CORPUS, build_tiny_models

RATE = 16_000
# Sentences of models.tiny.CORPUS spoken one after another per clip: clips like the demo
# corpus's (one sentence, under 10 s) and longer ones, cut into 10 s chunks.
SPEECH: tuple[tuple[int, ...], ...] = ((0,), (3,), (5,), (1, 2), (0, 1, 2), (4, 5, 6, 7, 0, 1, 2))
EXTRA_TEXTS = ("考试没通过，我很失望。", "好", "他终于回来了！大家都很高兴。")
Rows = list[tuple[str, float, float]]  # (input, cosine before, cosine after)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def speech_clips(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Demo-like 16 kHz clips: espeak-ng Mandarin over noise, or tones without espeak-ng."""
    from tasks.demo.media import SPEECH_RATE_HZ, speak
    from tasks.media import resample

    rng = np.random.default_rng(seed)
    espeak = shutil.which("espeak-ng")
    clips = []
    for sentences in SPEECH:
        parts = []
        for i in sentences:
            if espeak:
                spoken = resample(speak(espeak, CORPUS[i], 50, 175), SPEECH_RATE_HZ, RATE)
            else:
                t = np.arange(int(2.8 * RATE)) / RATE
                spoken = 0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t) * np.sin(np.pi * t / 2.8)
            parts += [spoken, np.zeros(RATE // 4)]
        x = np.concatenate(parts)
        x = 0.7 * x / np.abs(x).max() + rng.normal(0.0, 0.002, len(x))
        label = f"{len(sentences)} sentence(s), {len(x) / RATE:.1f} s"
        clips.append((label, x.astype(np.float32)))
    return clips


@contextlib.contextmanager
def raw_last_state(module: str) -> Iterator[None]:
    """The default as it was before the fix: hidden_states as transformers 5 returns them."""
    import importlib

    mod = importlib.import_module(module)
    fixed = mod.final_hidden_states
    mod.final_hidden_states = lambda output: tuple(output.hidden_states)
    try:
        yield
    finally:
        mod.final_hidden_states = fixed


def _encoders(models_dir: Path, name: str, device: str, dtype: str | None):
    """The default (in `dtype`, None: its policy) and the mertools encoder of one spec."""
    spec = get_spec(name)
    path = resolve_model_path(spec, models_dir)
    default = load_extractor(spec, path, device, dtype)
    mertools = load_extractor(dataclasses.replace(spec, recipe="mertools"), path, device)
    return default, mertools


def acoustic(models_dir: Path, name: str, device: str, dtype: str | None) -> Rows:
    """HuBERT: default before/after vs mertools, per clip."""
    default, mertools = _encoders(models_dir, name, device, dtype)
    rows = []
    for label, wave in speech_clips():
        reference = mertools.embed([wave])[0]
        with raw_last_state("models.acoustic"):
            before = default.embed([wave])[0]
        after = default.embed([wave])[0]
        rows.append((label, cosine(before, reference), cosine(after, reference)))
    return rows


def text(models_dir: Path, name: str, device: str, dtype: str | None) -> Rows:
    """LLM: default before/after vs mertools, per sentence."""
    default, mertools = _encoders(models_dir, name, device, dtype)
    rows = []
    for sentence in (*CORPUS[:4], *EXTRA_TEXTS):
        reference = mertools.embed([sentence])[0]
        with raw_last_state("models.text"):
            before = default.embed([sentence])[0]
        after = default.embed([sentence])[0]
        rows.append((sentence, cosine(before, reference), cosine(after, reference)))
    return rows


# modality -> (figures, the tiny spec, the paper spec)
MODALITIES: dict[str, tuple[Callable[[Path, str, str, str | None], Rows], str, str]] = {
    "acoustic": (acoustic, "tiny-hubert", "chinese-hubert-large"),
    "text": (text, "tiny-llama", "baichuan2-13b-base"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", type=Path, help="checkpoints; default: tiny, built here")
    parser.add_argument("--paper", action="store_true", help="the paper specs (needs --models-dir)")
    parser.add_argument("--modalities", default=",".join(MODALITIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--default-dtype", help="the default recipe's dtype (bf16: as on a GPU); mertools' is fixed"
    )
    parser.add_argument("--seed", type=int, default=0, help="tiny models' seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        models_dir = args.models_dir
        if models_dir is None:
            models_dir = Path(scratch)
            build_tiny_models(models_dir, seed=args.seed)
        for modality in args.modalities.split(","):
            figures, tiny, paper = MODALITIES[modality]
            name = paper if args.paper else tiny
            rows = figures(models_dir, name, args.device, args.default_dtype)
            print(f"\n{modality} ({name}): cosine(default, mertools)  before   after  (1 - after)")
            for label, before, after in rows:
                print(f"  {label:<40} {before:.6f} {after:.6f} ({1 - after:.1e})")
            b, a = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
            print(f"  {'mean':<40} {b.mean():.6f} {a.mean():.6f} ({1 - a.mean():.1e})")
            print(f"  {'min':<40} {b.min():.6f} {a.min():.6f} ({1 - a.min():.1e})")
            clear_extractor_cache()


if __name__ == "__main__":
    main()
