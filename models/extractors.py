"""Loading feature extractors once per process, and the helpers their encoders share.

`load_extractor(spec, model_path, device, dtype)` returns one of
`models.visual.VisualEncoder`, `models.acoustic.AcousticEncoder`, `models.asr.AsrModel` or
`models.text.TextEncoder`, built through the spec's loader and kept in a process-level cache
keyed by spec + path + device + dtype, so that a worker loads each model once and reuses it
across shards. The encoder modules are imported lazily: importing this module does not pull
in open_clip, transformers or sherpa-onnx.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from models.encoders import TORCH_DTYPES, Extractor, dtype_name
from models.registry import (
    ExtractorSpec,
    ModelNotFoundError,
    canonical_dtype,
    checkpoint_problems,
    checkpoint_revision,
    extractor_id,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`cuda` when asked for "auto" and a GPU is visible, else `cpu`; explicit devices pass."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but no CUDA device is visible; "
            "use device='cpu' or 'auto'"
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: "auto" is bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    name = canonical_dtype(dtype if dtype is not None else "auto")
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # Where no GPU is visible (planning ids for GPU workers) the policy's bf16 is assumed.
        old_gpu = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
        return torch.float16 if old_gpu else torch.bfloat16
    return TORCH_DTYPES[name]


def effective_dtype(
    spec: ExtractorSpec, dtype: str | torch.dtype | None, device: torch.device
) -> torch.dtype:
    """The dtype the spec will compute in: the request, else the spec's policy.

    ONNX exports (the ASR models) run as exported, so a requested dtype does not apply to them.
    The `mertools` recipe computes in the challenge baseline's precision whatever is asked: CLIP
    and HuBERT in fp32 even on a GPU, the LLM in fp16 on a GPU and fp32 on the CPU.
    """
    if spec.loader == "sherpa-wenet-ctc":
        return resolve_dtype(spec.dtype, device)
    if spec.recipe == "mertools" and spec.loader in ("hf-hubert", "open_clip"):
        return torch.float32
    if spec.recipe == "mertools" and spec.loader == "hf-causal-lm":
        return torch.float16 if device.type == "cuda" else torch.float32
    return resolve_dtype(dtype if dtype is not None else spec.dtype, device)


def planned_extractor_id(
    spec: ExtractorSpec,
    model_path: Path | None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    **settings: Any,
) -> str:
    """The extractor_id an encoder loaded with these arguments will report, without loading it."""
    # No availability check: ids may be planned on a CPU machine for GPU workers.
    auto = device is None or str(device) == "auto"
    planned_device = resolve_device(device) if auto else torch.device(device)
    resolved = effective_dtype(spec, dtype, planned_device)
    revision = checkpoint_revision(spec, model_path) if model_path is not None else "random-init"
    return extractor_id(spec, dtype=dtype_name(resolved), checkpoint=revision, **settings)


def quiet_progress_bars() -> None:
    """Turn huggingface_hub's and transformers' progress bars off when stderr is no terminal.

    In a log file, captured output or a Prefect worker a bar is a run of carriage-return
    fragments ("Loading weights: 0%|...100%|"), not progress. On a terminal they stay, and
    HF_HUB_DISABLE_PROGRESS_BARS, when set, decides (the hub warns on every call otherwise).
    """
    if (sys.stderr is not None and sys.stderr.isatty()) or os.environ.get(
        "HF_HUB_DISABLE_PROGRESS_BARS"
    ):
        return
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    # transformers copies the hub's switch when first imported; once imported it has its own.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


_CACHE: dict[tuple[Any, ...], Extractor] = {}
_CACHE_LOCK = threading.Lock()


def load_extractor(
    spec: ExtractorSpec,
    model_path: Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    trust_remote_code: bool | None = None,
    num_threads: int | None = None,
) -> Extractor:
    """The extractor for `spec` from `model_path`, loaded once per process and then reused.

    `dtype` None uses the spec's policy ("auto": bf16 on CUDA, fp32 on CPU).
    `trust_remote_code` None follows the spec; only True from the spec or this argument lets
    a checkpoint run its own Python code, and the log says so.
    """
    model_path = Path(model_path).resolve()
    problems = checkpoint_problems(spec, model_path)
    if problems:
        raise ModelNotFoundError(
            f"checkpoint for extractor {spec.name} at {model_path} is unusable: "
            f"{'; '.join(problems)}; resolve it with models.registry.resolve_model_path"
        )
    resolved_device = resolve_device(device)
    resolved_dtype = effective_dtype(spec, dtype, resolved_device)
    trust = spec.trust_remote_code if trust_remote_code is None else trust_remote_code
    key = (spec, str(model_path), str(resolved_device), resolved_dtype, trust, num_threads)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        quiet_progress_bars()
        extractor = _build(spec, model_path, resolved_device, resolved_dtype, trust, num_threads)
        _CACHE[key] = extractor
    logger.info(
        "loaded extractor %s from %s on %s/%s in %.1f s",
        spec.name,
        model_path,
        resolved_device,
        dtype_name(resolved_dtype),
        time.perf_counter() - started,
    )
    return extractor


def _build(
    spec: ExtractorSpec,
    model_path: Path,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    num_threads: int | None,
) -> Extractor:
    """Dispatch to the spec's loader (imported here so unused libraries stay unloaded)."""
    if trust_remote_code and spec.loader != "hf-causal-lm":
        logger.info("trust_remote_code has no effect on loader %s (%s)", spec.loader, spec.name)
    if spec.loader == "open_clip":
        from models.visual import load_visual

        return load_visual(spec, model_path, device, dtype)
    if spec.loader == "hf-hubert":
        from models.acoustic import load_acoustic

        return load_acoustic(spec, model_path, device, dtype)
    if spec.loader == "sherpa-wenet-ctc":
        from models.asr import load_asr

        return load_asr(spec, model_path, device, dtype, num_threads=num_threads)
    if spec.loader == "hf-causal-lm":
        from models.text import load_text

        reason = "set by the spec" if spec.trust_remote_code else "set by a setting"
        return load_text(
            spec, model_path, device, dtype, trust_remote_code=trust_remote_code, reason=reason
        )
    raise ValueError(f"extractor {spec.name} has no loader for {spec.loader!r}")


def clear_extractor_cache() -> None:
    """Drop every loaded extractor and return their memory (GPU included)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
