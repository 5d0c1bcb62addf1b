"""Checkpoints rebuild their model from config.json and give identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.baseline import BaselineConfig, BaselineNet
from models.checkpoint import load_checkpoint, save_checkpoint
from models.mrccl import MRCCL, mrccl_config

DIMS = {"visual": 24, "acoustic": 32, "text": 40}
IDS = {"visual": "tiny-clip@1", "acoustic": "tiny-hubert@1", "text": "tiny-lm@1"}


def batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(4, d, generator=g) for m, d in DIMS.items()}
    present = {m: torch.tensor([True, True, False, True]) for m in DIMS}
    present["acoustic"][:] = True
    return feats, present


@pytest.mark.parametrize("kind", ["mrccl", "baseline"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(3)
    if kind == "mrccl":
        model = MRCCL(mrccl_config("tiny", dims=DIMS, nee_schedule="scaled_linear"))
    else:
        model = BaselineNet(BaselineConfig(dims=DIMS, hidden=16))
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt", IDS, "features-v1", extra={"fold": 2})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model_type == kind and loaded.extractor_ids == IDS
    assert loaded.contract_version == "features-v1" and loaded.extra == {"fold": 2}
    assert loaded.model.config == model.config
    feats, present = batch()
    with torch.no_grad():
        if kind == "mrccl":
            a = model(feats, present, with_contrastive=False).logits
            b = loaded.model(feats, present, with_contrastive=False).logits
            assert all(torch.equal(a[c], b[c]) for c in "AVTF")
        else:
            assert torch.equal(model(feats, present), loaded.model(feats, present))


def test_config_json_is_readable_and_complete(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MRCCL(mrccl_config("tiny", dims=DIMS)), tmp_path, IDS, "v1")
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["labels"] == ["neutral", "angry", "happy", "sad", "worried", "surprise"]
    assert meta["config"]["hidden"] == 32 and meta["config"]["dims"] == DIMS


def test_bad_checkpoints_are_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"needs config\.json and model\.safetensors"):
        load_checkpoint(tmp_path)
    model = BaselineNet(BaselineConfig(dims=DIMS, hidden=8))
    with pytest.raises(ValueError, match="extractor_ids lacks \\['text'\\]"):
        save_checkpoint(model, tmp_path, {"visual": "a", "acoustic": "b"}, "v1")
    save_checkpoint(model, tmp_path, IDS, "v1")
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["hiddn"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown keys \\['hiddn'\\]"):
        load_checkpoint(tmp_path)
