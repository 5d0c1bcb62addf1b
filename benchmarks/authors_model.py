"""The authors' released MR-CCL model (repository WooyoohL/MER2024-SEMI), loaded from a LOCAL
copy for timing against merflow's: `benchmarks/train_synthetic.py --throughput --authors DIR`.

Nothing here fetches or ships their code: DIR is a checkout's `models/` folder (the one holding
`Contrastive_model.py` and `Noise_scheduler.py`), e.g. from
`git clone https://github.com/WooyoohL/MER2024-SEMI /tmp/mer2024-semi`. Their file imports two
things the repository does not hold: `einops` (imported, unused) and the MERBench toolkit's
`FcClassifier`; both are stood in for below, the classifier as that toolkit defines it (Linear,
ReLU, BatchNorm, Dropout per layer, then an output Linear). Their forward calls `.cuda()` on a
weight vector; on CPU that call is made a no-op while their step runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn


class FcClassifier(nn.Module):
    """MERBench's toolkit.models.fcclassifier.FcClassifier: returns (logits, features)."""

    def __init__(
        self, input_dim: int, layers: list[int], output_dim: int, dropout: float, use_bn: bool
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for width in layers:
            blocks += [nn.Linear(input_dim, width), nn.ReLU()]
            blocks += [nn.BatchNorm1d(width)] if use_bn else []
            blocks += [nn.Dropout(dropout)] if dropout > 0 else []
            input_dim = width
        self.module = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.module(x)
        return self.fc_out(feat), feat


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules their file imports that are not in their repository."""
    einops = types.ModuleType("einops")
    einops.rearrange = None  # type: ignore[attr-defined]
    fc = types.ModuleType("toolkit.models.fcclassifier")
    fc.FcClassifier = FcClassifier  # type: ignore[attr-defined]
    toolkit, models = types.ModuleType("toolkit"), types.ModuleType("toolkit.models")
    return {"einops": einops, "toolkit": toolkit, "toolkit.models": models, fc.__name__: fc}


def load_authors_model(
    folder: str | Path, dims: dict[str, int], hidden: int, layers: int, heads: int, dropout: float
) -> nn.Module:
    """Their CONTRASTIVE network (the fine-tuning model: both views, contrastive + CE loss)."""
    folder = Path(folder)
    source = folder / "Contrastive_model.py"
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} not found: --authors must name the `models/` folder of a local copy of "
            "WooyoohL/MER2024-SEMI (Contrastive_model.py, Noise_scheduler.py)"
        )
    missing = {k: v for k, v in _stand_ins().items() if k not in sys.modules}
    sys.modules.update(missing)
    sys.path.insert(0, str(folder))  # their `from Noise_scheduler import NoiseScheduler`
    try:
        spec = importlib.util.spec_from_file_location("authors_contrastive_model", source)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(folder))
    args = types.SimpleNamespace(
        batch_size=512,
        audio_dim=dims["acoustic"],
        text_dim=dims["text"],
        video_dim=dims["visual"],
        output_dim1=6,
        output_dim2=1,
        dropout=dropout,
        hidden_dim=hidden,
        num_heads=heads,
        layers=layers,
        grad_clip=-1,
        num_timestep=100,
    )
    return module.CONTRASTIVE(args)


@contextlib.contextmanager
def _cuda_calls_stay(device: torch.device) -> Iterator[None]:
    """Their forward moves a constant with `.cuda()`; on CPU keep it where it is."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def authors_step(
    model: nn.Module,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    lr: float = 1e-4,
) -> Callable[[], float]:
    """One training step of their model on one batch (forward in train mode, their loss,
    backward, Adam), as a callable returning the loss."""
    device = labels.device
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = {
        "videos": features["visual"],
        "audios": features["acoustic"],
        "texts": features["text"],
    }
    vals = torch.zeros(len(labels), device=device)

    def step() -> float:
        with _cuda_calls_stay(device):
            _, _, _, loss = model((batch, labels, vals, None))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    return step
