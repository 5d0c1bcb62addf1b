"""Named feature-extractor specs, their output-keying ids, and where their checkpoints live.

A spec is a frozen description of one extractor: which loader builds it, the architecture, the
output dimension, the pooling and preprocessing, dtype policy and revision. The `paper` specs
name the real checkpoints of MER2024-SEMI; each has a `tiny-*` twin with the same architecture
(2 layers, width 32, seeded random weights, built by `models.tiny.build_tiny_models`) so that
tests and the demo profile run the same code path without downloading anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("visual", "acoustic", "asr", "text")
LOADERS: tuple[str, ...] = ("open_clip", "hf-hubert", "sherpa-wenet-ctc", "hf-causal-lm")
DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
# How a feature is computed from the model: merflow's own recipe, or the challenge baseline's
# (MERTools' extraction scripts: layers, reduction, chunking, preprocessing, precision), which
# docs/method.md §2 compares line by line.
RECIPES: tuple[str, ...] = ("merflow", "mertools")
DEFAULT_RECIPE = "merflow"

# Written by models.tiny into every tiny checkpoint folder; its seed is part of the checkpoint
# revision, so tiny models built with another seed get another extractor_id.
TINY_MARKER = "merflow_tiny.json"

# Settings that change how fast features are computed but not their values; extractor_id
# ignores them so that moving a run to another batch size or worker count keeps the cache.
NON_OUTPUT_SETTINGS: frozenset[str] = frozenset(
    {
        "device",
        "batch_size",
        "max_batch_samples",
        "max_batch_tokens",
        "num_threads",
        "models_dir",
        "allow_download",
        "trust_remote_code",
    }
)

# Spec fields that describe a spec without changing what it computes.
_ID_EXEMPT_FIELDS: frozenset[str] = frozenset(
    {"name", "description", "required_files", "weight_files", "hub_files", "trust_remote_code"}
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")

# Bumped when a loader's code changes the features it computes for the same spec and settings,
# so that stored rows of the old code are not mistaken for new ones; a loader absent here keeps
# the ids it always had. hf-hubert 2: HuBERT's last averaged state is the one after the final
# LayerNorm, as transformers 4.x returned it and the baseline averaged it (transformers 5 returns
# the raw last layer as hidden_states[-1] for stable-layer-norm models).
FEATURE_VERSIONS: dict[str, int] = {"hf-hubert": 2}


class UnknownExtractorError(ValueError):
    """A spec name that the registry does not know."""


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint that is neither in the models folder nor in the Hugging Face cache."""


class ModelDownloadError(RuntimeError):
    """A download that was allowed but failed (network, permissions, missing revision)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose shape disagrees with its spec (wrong output dim or image size)."""


class RemoteCodeRefusedError(ValueError):
    """A checkpoint that ships its own Python code while trust_remote_code is off."""


class ExtractorInputError(ValueError):
    """An input an extractor cannot embed (wrong dtype or shape, too short, not finite)."""


@dataclass(frozen=True)
class ExtractorSpec:
    """One named feature extractor: loader, architecture, output, pooling, preprocessing."""

    name: str
    kind: str  # one of KINDS
    loader: str  # one of LOADERS
    architecture: str  # open_clip model name, or the transformers/ONNX architecture
    output_dim: int | None  # None for ASR, whose output is text
    pooling: str  # how per-frame/per-token states become one vector, in words
    description: str
    hub_repo: str | None = None  # Hugging Face repo id of the real checkpoint
    revision: str = "main"
    hub_files: tuple[str, ...] = ()  # allow_patterns for the cache lookup and the download
    required_files: tuple[str, ...] = ()  # all must exist in a checkpoint folder
    weight_files: tuple[str, ...] = ()  # at least one must exist
    pretrained_tag: str | None = None  # open_clip's name for the weights ("openai")
    layers: int = 4  # the last `layers` hidden states are averaged (fewer if the model has fewer)
    image_size: int | None = None
    sample_rate: int = 16_000
    chunk_seconds: float = 10.0
    max_tokens: int = 512
    model_file: str | None = None  # ASR: which ONNX file of the folder to run
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    trust_remote_code: bool = False
    tiny: bool = False
    recipe: str = DEFAULT_RECIPE  # one of RECIPES; keys the id only when not the default

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"extractor name {self.name!r} is not filesystem-safe; use lowercase letters, "
                "digits, '.' and '-'"
            )
        if self.kind not in KINDS:
            raise ValueError(f"extractor {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.loader not in LOADERS:
            raise ValueError(
                f"extractor {self.name}: loader {self.loader!r} is not one of {LOADERS}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(
                f"extractor {self.name}: recipe {self.recipe!r} is not one of {RECIPES}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"extractor {self.name}: dtype {self.dtype!r} is not one of {DTYPES}")
        if self.layers < 1:
            raise ValueError(f"extractor {self.name}: layers must be >= 1, got {self.layers}")
        if self.chunk_seconds <= 0:
            raise ValueError(
                f"extractor {self.name}: chunk_seconds must be > 0, got {self.chunk_seconds}"
            )


_CLIP_FILES = ("open_clip_config.json",)
_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_LAST4_TIME = "mean of the last 4 hidden states, then mean over valid (unpadded) frames"
_LAST4_TOKENS = "mean of the last 4 hidden states, then mean over the text's non-special tokens"

_ALL_SPECS: tuple[ExtractorSpec, ...] = (
    ExtractorSpec(
        name="clip-vit-large-patch14",
        kind="visual",
        loader="open_clip",
        # OpenAI's CLIP weights were trained with QuickGELU; open_clip names that variant so.
        architecture="ViT-L-14-quickgelu",
        output_dim=768,
        pooling="projected CLIP image embedding per face crop (not L2-normalised)",
        description="CLIP ViT-L/14 with OpenAI weights (openai/clip-vit-large-patch14)",
        hub_repo="timm/vit_large_patch14_clip_224.openai",
        hub_files=("open_clip_config.json", "open_clip_model.safetensors"),
        required_files=(),
        weight_files=_CLIP_WEIGHTS,
        pretrained_tag="openai",
        image_size=224,
    ),
    ExtractorSpec(
        name="chinese-hubert-large",
        kind="acoustic",
        loader="hf-hubert",
        architecture="HubertModel",
        output_dim=1024,
        pooling=_LAST4_TIME,
        description="Chinese-HuBERT-Large (TencentGameMate), 24 layers, 16 kHz",
        hub_repo="TencentGameMate/chinese-hubert-large",
        # The repo also holds a 1.2 GB fairseq checkpoint that merflow never needs.
        hub_files=("config.json", "preprocessor_config.json", "pytorch_model.bin"),
        required_files=("config.json", "preprocessor_config.json"),
        weight_files=_HF_WEIGHTS,
    ),
    ExtractorSpec(
        name="wenet-wenetspeech",
        kind="asr",
        loader="sherpa-wenet-ctc",
        architecture="wenet-conformer-ctc",
        output_dim=None,
        pooling="CTC greedy search",
        description="WeNet WenetSpeech Chinese CTC model, exported for sherpa-onnx",
        hub_repo="csukuangfj/sherpa-onnx-zh-wenet-wenetspeech",
        hub_files=("model.onnx", "tokens.txt"),
        required_files=("model.onnx", "tokens.txt"),
        model_file="model.onnx",
        dtype="fp32",
    ),
    ExtractorSpec(
        name="baichuan2-13b-base",
        kind="text",
        loader="hf-causal-lm",
        architecture="BaichuanForCausalLM",
        output_dim=5120,
        pooling=_LAST4_TOKENS,
        description="Baichuan2-13B-Base; ships its own modeling code (trust_remote_code)",
        hub_repo="baichuan-inc/Baichuan2-13B-Base",
        hub_files=("*.json", "*.py", "tokenizer.model", "*.bin", "*.safetensors"),
        required_files=("config.json", "tokenizer_config.json"),
        weight_files=_HF_WEIGHTS,
        trust_remote_code=True,
    ),
    ExtractorSpec(
        name="tiny-clip-vit",
        kind="visual",
        loader="open_clip",
        architecture="tiny-ViT-quickgelu",
        output_dim=32,
        pooling="projected CLIP image embedding per face crop (not L2-normalised)",
        description="ViT CLIP, 2 layers, width 32, 64x64 input, seeded random weights",
        weight_files=_CLIP_WEIGHTS,
        required_files=_CLIP_FILES,
        image_size=64,
        tiny=True,
    ),
    ExtractorSpec(
        name="tiny-hubert",
        kind="acoustic",
        loader="hf-hubert",
        architecture="HubertModel",
        output_dim=32,
        pooling=_LAST4_TIME,
        description="HuBERT with chinese-hubert-large's layout, 2 layers, width 32, random",
        required_files=("config.json", "preprocessor_config.json"),
        weight_files=_HF_WEIGHTS,
        tiny=True,
    ),
    ExtractorSpec(
        name="tiny-wenet-ctc",
        kind="asr",
        loader="sherpa-wenet-ctc",
        architecture="tiny-transformer-ctc",
        output_dim=None,
        pooling="CTC greedy search",
        description="Transformer CTC, 2 layers, width 32, exported to ONNX like WeNet, random",
        required_files=("model.onnx", "tokens.txt"),
        model_file="model.onnx",
        dtype="fp32",
        tiny=True,
    ),
    ExtractorSpec(
        name="tiny-llama",
        kind="text",
        loader="hf-causal-lm",
        architecture="LlamaModel",
        output_dim=32,
        pooling=_LAST4_TOKENS,
        description="Llama-style causal LM, 2 layers, width 32, byte-level BPE, random",
        required_files=("config.json", "tokenizer.json"),
        weight_files=_HF_WEIGHTS,
        tiny=True,
    ),
)

SPECS: dict[str, ExtractorSpec] = {spec.name: spec for spec in _ALL_SPECS}

# How the mertools recipe pools, per loader (docs/method.md §2); merflow's is each spec's own.
_MERTOOLS_POOLING = {
    "open_clip": "projected CLIP image embedding per crop after transformers' CLIP preprocessing, "
    "fp32; mean over every crop given (the challenge baseline's)",
    "hf-hubert": "sum of the last 4 hidden states over fixed 10 s chunks, the last zero-padded, "
    "no mask; mean over every frame, padding included; fp32 (the challenge baseline's)",
    "hf-causal-lm": "sum of the last 4 hidden states of one text a forward, then mean over the "
    "tokens the baseline's probe keeps (the challenge baseline's)",
}


def pooling_of(spec: ExtractorSpec) -> str:
    """How `spec`'s recipe turns hidden states into one vector, in words (for provenance)."""
    if spec.recipe == "mertools" and spec.loader in _MERTOOLS_POOLING:
        return _MERTOOLS_POOLING[spec.loader]
    return spec.pooling


def list_specs() -> list[str]:
    """Names of all registered extractor specs, sorted."""
    return sorted(SPECS)


def get_spec(name: str) -> ExtractorSpec:
    """The spec called `name`; an unknown name lists the valid ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise UnknownExtractorError(
            f"unknown extractor {name!r}; valid extractors are {', '.join(list_specs())}"
        ) from None


def spec_as_run(
    name: str, chunk_seconds: float | None = None, recipe: str | None = None
) -> ExtractorSpec:
    """The spec called `name` with a stage's chunk length and recipe in place of its own
    (None keeps the spec's); a changed one then keys the extractor id."""
    spec = get_spec(name)
    if chunk_seconds is not None and chunk_seconds != spec.chunk_seconds:
        spec = dataclasses.replace(spec, chunk_seconds=float(chunk_seconds))
    if recipe is not None and recipe != spec.recipe:
        spec = dataclasses.replace(spec, recipe=recipe)
    return spec


def specs_of(models: Any) -> dict[str, ExtractorSpec]:
    """The spec per kind (visual, acoustic, asr, text) that a `models:` settings section names
    (an object with one attribute per kind); refuses an unknown name or a spec of another kind.
    Settings validation runs it, so a profile that names the wrong extractor fails on load."""
    specs = {kind: get_spec(getattr(models, kind)) for kind in KINDS}
    wrong = [f"models.{k}: {s.name} is kind {s.kind!r}" for k, s in specs.items() if s.kind != k]
    if wrong:
        raise UnknownExtractorError(f"extractors of the wrong kind: {'; '.join(wrong)}")
    return specs


def canonical_dtype(dtype: Any) -> str:
    """'fp32', 'bf16', 'fp16' or 'auto' for a dtype given as a name or a torch.dtype."""
    text = str(dtype).removeprefix("torch.").lower()
    aliases = {
        "float32": "fp32",
        "float": "fp32",
        "fp32": "fp32",
        "bfloat16": "bf16",
        "bf16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "fp16": "fp16",
        "auto": "auto",
    }
    try:
        return aliases[text]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 or auto") from None


def _jsonable(key: str, value: Any) -> Any:
    """A JSON-stable form of one setting value, or an error naming the setting."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(f"{key}.{k}", v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(
        f"setting {key}={value!r} ({type(value).__name__}) cannot key an extractor_id; "
        "pass a string, number, bool or a list/dict of those"
    )


def id_settings(spec: ExtractorSpec, **settings: Any) -> dict[str, Any]:
    """Every output-changing value that extractor_id hashes, as a JSON-ready dict."""
    fields = {
        f.name: _jsonable(f.name, getattr(spec, f.name))
        for f in dataclasses.fields(spec)
        if f.name not in _ID_EXEMPT_FIELDS
        # merflow's own recipe keeps the ids features had before recipes were selectable.
        and not (f.name == "recipe" and getattr(spec, f.name) == DEFAULT_RECIPE)
    }
    if spec.loader in FEATURE_VERSIONS:
        fields["feature_version"] = FEATURE_VERSIONS[spec.loader]
    extra: dict[str, Any] = {}
    for key, value in settings.items():
        if key in NON_OUTPUT_SETTINGS or value is None:
            continue
        extra[key] = canonical_dtype(value) if key == "dtype" else _jsonable(key, value)
    # The dtype a spec runs in changes its output; "auto" is resolved by the caller (the
    # encoder knows the device), and an explicit dtype setting replaces the spec default.
    if "dtype" in extra:
        fields["dtype"] = extra.pop("dtype")
    return {"spec": fields, "settings": extra}


def extractor_id(spec: ExtractorSpec, **settings: Any) -> str:
    """Readable, filesystem-safe id: spec name + short hash of every output-changing setting.

    Callers pass the compute dtype and checkpoint=checkpoint_revision(spec, path), as loaded
    encoders and models.extractors.planned_extractor_id do, so other weights get another id.
    """
    payload = json.dumps(id_settings(spec, **settings), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:8]
    return f"{spec.name}-{digest}"


def checkpoint_revision(spec: ExtractorSpec, model_path: Path) -> str:
    """The revision of the weights in `model_path`: tiny seed, HF commit, or the spec's."""
    marker = model_path / TINY_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        return f"tiny-seed{info['seed']}-v{info['format']}"
    # A Hugging Face cache snapshot lives in .../snapshots/<commit hash>/.
    if model_path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", model_path.name):
        return model_path.name
    return spec.revision


def checkpoint_problems(spec: ExtractorSpec, path: Path) -> list[str]:
    """What a checkpoint folder lacks for this spec (empty when it is complete)."""
    if not path.is_dir():
        return [f"{path} does not exist"]
    problems = [
        f"{path / name} is missing" for name in spec.required_files if not (path / name).is_file()
    ]
    if spec.model_file and not (path / spec.model_file).is_file():
        problems.append(f"{path / spec.model_file} is missing")
    if spec.weight_files and not any((path / name).is_file() for name in spec.weight_files):
        problems.append(f"{path} holds none of the weight files {', '.join(spec.weight_files)}")
    return problems


def _layout_hint(spec: ExtractorSpec) -> str:
    """How a checkpoint folder of this spec's loader must look."""
    if spec.loader == "open_clip":
        return (
            "an open_clip folder (open_clip_config.json + open_clip_model.safetensors), "
            "or the weights file alone when the architecture is an open_clip built-in"
        )
    if spec.loader == "sherpa-wenet-ctc":
        return f"a sherpa-onnx WeNet CTC folder ({spec.model_file} with metadata + tokens.txt)"
    extra = " + preprocessor_config.json" if spec.loader == "hf-hubert" else " + tokenizer files"
    return f"a transformers save_pretrained folder (config.json + weights{extra})"


def _hf_cache_dir(cache_dir: Path | None) -> Path:
    """The Hugging Face hub cache that lookups use."""
    if cache_dir is not None:
        return cache_dir
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    """Whether the environment forbids hub downloads (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    truthy = {"1", "on", "yes", "true"}
    return any(
        os.environ.get(var, "").strip().lower() in truthy
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _find_in_hf_cache(spec: ExtractorSpec, cache_dir: Path) -> tuple[Path | None, str]:
    """The cached snapshot folder of the spec's repo at its revision, or why there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert spec.hub_repo is not None
    try:
        found = snapshot_download(
            spec.hub_repo,
            revision=spec.revision,
            cache_dir=str(cache_dir),
            allow_patterns=list(spec.hub_files) or None,
            local_files_only=True,
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        return None, f"no snapshot of {spec.hub_repo}@{spec.revision} ({type(e).__name__})"
    problems = checkpoint_problems(spec, Path(found))
    if problems:
        return None, "incomplete snapshot: " + "; ".join(problems)
    return Path(found), ""


def _download(spec: ExtractorSpec, cache_dir: Path) -> Path:
    """Download the spec's files into the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    assert spec.hub_repo is not None
    logger.info("downloading %s@%s for extractor %s", spec.hub_repo, spec.revision, spec.name)
    try:
        found = Path(
            snapshot_download(
                spec.hub_repo,
                revision=spec.revision,
                cache_dir=str(cache_dir),
                allow_patterns=list(spec.hub_files) or None,
            )
        )
    except Exception as e:  # the hub client raises many unrelated types for one failed download
        raise ModelDownloadError(
            f"downloading {spec.hub_repo}@{spec.revision} for extractor {spec.name} failed: {e}; "
            "check the network and the revision, or provide the checkpoint locally"
        ) from e
    problems = checkpoint_problems(spec, found)
    if problems:
        raise ModelDownloadError(
            f"downloaded {spec.hub_repo}@{spec.revision} for extractor {spec.name} but it is "
            f"incomplete: {'; '.join(problems)}"
        )
    return found


def resolve_model_path(
    spec: ExtractorSpec,
    models_dir: Path | None,
    allow_download: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """The checkpoint folder of `spec`: models_dir/<name>, else the HF cache, else a download."""
    looked: list[str] = []
    if models_dir is not None:
        local = Path(models_dir) / spec.name
        problems = checkpoint_problems(spec, local)
        if not problems:
            return local
        looked.append("; ".join(problems))
    else:
        looked.append("no models_dir given")

    if spec.hub_repo is not None:
        hub_cache = _hf_cache_dir(cache_dir)
        found, why = _find_in_hf_cache(spec, hub_cache)
        if found is not None:
            return found
        looked.append(f"Hugging Face cache {hub_cache}: {why}")
        if allow_download and not _hub_offline():
            return _download(spec, hub_cache)

    target = Path(models_dir) / spec.name if models_dir is not None else Path("<models_dir>")
    ways = [f"put {_layout_hint(spec)} at {target}"]
    if spec.tiny:
        ways.append(f"build the tiny models with models.tiny.build_tiny_models({target.parent})")
    if spec.hub_repo is not None:
        ways.append(
            f"run `hf download {spec.hub_repo} --revision {spec.revision}` on a machine with "
            "network access and copy its Hugging Face cache here"
        )
        if not allow_download:
            ways.append("set allow_download=true to fetch it")
        elif _hub_offline():
            ways.append("unset HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE so that the download may run")
    source = f" ({spec.hub_repo}@{spec.revision})" if spec.hub_repo else ""
    raise ModelNotFoundError(
        f"no checkpoint for extractor {spec.name}{source}. Looked in: {' | '.join(looked)}. "
        f"Provide it: {'; or '.join(ways)}."
    )
