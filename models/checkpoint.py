"""Checkpoints that rebuild themselves: model.safetensors + config.json (never pickle)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from data_contracts.labels import CLASSES, MODALITIES
from models.baseline import BaselineConfig, BaselineNet
from models.mrccl import MRCCL, MRCCLConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1

# model_type (stored in config.json) -> (network class, its config class)
MODEL_TYPES: dict[str, tuple[type[nn.Module], Any]] = {
    "mrccl": (MRCCL, MRCCLConfig),
    "baseline": (BaselineNet, BaselineConfig),
}


@dataclass
class Checkpoint:
    """A loaded model and the metadata saved with it."""

    model: nn.Module
    model_type: str
    labels: list[str]
    extractor_ids: dict[str, str]  # modality -> extractor id of the features it was trained on
    contract_version: str
    extra: dict[str, Any]


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    extractor_ids: Mapping[str, str],
    contract_version: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write model.safetensors and config.json (resolved config, labels, ids) into `directory`."""
    model_type = getattr(model, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"cannot checkpoint {type(model).__name__}; supported: {sorted(MODEL_TYPES)}"
        )
    missing = sorted(set(MODALITIES) - set(extractor_ids))
    if missing:
        raise ValueError(f"extractor_ids lacks {missing}; give the extractor id of every modality")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "config": dataclasses.asdict(model.config),
        "labels": list(CLASSES),
        "extractor_ids": dict(extractor_ids),
        "contract_version": contract_version,
        "extra": dict(extra or {}),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)  # fails early on non-JSON extra values
    # Write to temporary names, then rename: a crash never leaves a half checkpoint behind.
    tmp_weights, tmp_config = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    save_model(model, str(tmp_weights), metadata={"model_type": model_type})
    tmp_config.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    os.replace(tmp_config, out / CONFIG_FILE)
    return out


def load_checkpoint(directory: str | os.PathLike[str], device: str = "cpu") -> Checkpoint:
    """Rebuild the model from config.json alone and load its safetensors weights."""
    root = Path(directory)
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{root} is not a merflow checkpoint: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    meta = json.loads(config_path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {meta.get('format_version')!r}; this merflow reads "
            f"{FORMAT_VERSION}; re-save the model with this version"
        )
    if meta.get("labels") != list(CLASSES):
        raise ValueError(
            f"{config_path} was trained on labels {meta.get('labels')}, not {list(CLASSES)}"
        )
    model_type = meta.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{config_path}: unknown model_type {model_type!r}; valid: {sorted(MODEL_TYPES)}"
        )
    model_cls, config_cls = MODEL_TYPES[model_type]
    model = model_cls(config_cls.from_dict(meta["config"]))
    load_model(model, str(weights_path), strict=True, device=device)
    model.to(device).eval()
    return Checkpoint(
        model=model,
        model_type=model_type,
        labels=meta["labels"],
        extractor_ids=meta["extractor_ids"],
        contract_version=meta["contract_version"],
        extra=meta.get("extra", {}),
    )
