"""Data-parallel training across processes started by `torchrun` (DDP).

Every rank holds the whole (small, tabular) feature set and draws the same shuffled order, so a
global batch is the same rows as in a single-process run. Each rank runs the encoders on its
contiguous share of the batch; the per-row outputs are then gathered *with their gradients*
(a differentiable functional all-gather) and every rank computes the loss of the whole
global batch. That matters for MR-CCL: its InfoNCE terms take their negatives from the batch,
so a loss on per-rank shards would be a different objective with fewer negatives. With the
gathered loss, DDP's gradient averaging gives exactly the single-process gradient: rank r's
rows receive world_size x dL/dz_r through the gather's backward, and the average over ranks
divides that back out. What still differs is randomness (dropout masks, NEE noise), which each
rank draws from its own stream.

Nothing here starts processes: `torchrun` (or `flows.train`, which calls it) does, and
`init_from_env` joins the group it set up. Outside torchrun everything is a no-op of world size 1.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# Seeds of rank r's random streams (dropout, NEE noise) are seed + RANK_SEED_STRIDE * r; rank 0
# draws exactly what a single-process run draws.
RANK_SEED_STRIDE = 7919


@dataclass(frozen=True)
class World:
    """This process's place in the training job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints and reports."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def world() -> World:
    """The current process group, or a world of one outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            backend=str(dist.get_backend()),
        )
    return World()


def pick_backend(backend: str, device: str) -> str:
    """'auto' means NCCL when training on CUDA, gloo on the CPU."""
    if backend != "auto":
        return backend
    return "nccl" if device.startswith("cuda") else "gloo"


def init_from_env(backend: str = "auto", device: str = "cpu", timeout_s: float = 1800) -> World:
    """Join the process group that torchrun described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...). On CUDA each rank takes the GPU of its LOCAL_RANK."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"not started by torchrun: {', '.join(missing)} unset; launch with "
            "`python -m torch.distributed.run --nproc-per-node N ...` or set train.nproc_per_node"
        )
    chosen = pick_backend(backend, device)
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def shutdown() -> None:
    """Leave the process group (a no-op outside one).

    DDP wrappers keep the group alive in reference cycles. Left to the interpreter's last
    collection, the group and gloo's worker threads are torn down during finalisation, and the
    rank can die of SIGABRT ("terminate called without an active exception") after its work
    is done. Collect them first, while the interpreter is whole.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def local_device(device: str, w: World) -> str:
    """A rank's own device: 'cuda' becomes 'cuda:<local_rank>'; anything else is unchanged."""
    if device == "cuda" and w.distributed:
        return f"cuda:{w.local_rank}"
    return device


def share(n: int, w: World) -> tuple[np.ndarray, list[int]]:
    """Positions 0..n-1 split into world-size contiguous parts (sizes differ by at most one):
    this rank's part, and every part's size."""
    parts = np.array_split(np.arange(n), w.size)
    return parts[w.rank], [len(p) for p in parts]


def shard_batch(index: np.ndarray, w: World) -> tuple[np.ndarray, list[int]]:
    """This rank's share of a global batch of row indices, padded (by repeating the batch's first
    row) to the largest share so that every rank gathers equal shapes; and the true share sizes.
    Padding rows are dropped again by `RowGather`, so they never reach a loss."""
    mine, sizes = share(len(index), w)
    rows = index[mine]
    pad = max(sizes) - len(rows)
    if pad:
        rows = np.concatenate([rows, np.full(pad, index[0], dtype=index.dtype)])
    return rows, sizes


class RowGather:
    """Concatenate every rank's per-row tensor back into the global batch order, keeping the
    autograd graph (the backward sums each row's gradient from every rank's loss)."""

    def __init__(self, sizes: list[int], device: str | torch.device = "cpu") -> None:
        width = max(sizes)
        self.keep = torch.as_tensor(
            np.concatenate([np.arange(s) + r * width for r, s in enumerate(sizes)]),
            dtype=torch.long,
            device=device,  # where the outputs are: no copy per gathered tensor
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Functional collective: differentiable, its backward sums each row's gradient over ranks.
        everything = funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)
        return everything.index_select(0, self.keep)


def no_gather(x: torch.Tensor) -> torch.Tensor:
    """The single-process gather: the batch is already whole."""
    return x


Gather = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def gather_rows(x: np.ndarray, sizes: list[int], w: World) -> np.ndarray:
    """Every rank's (share, ...) array concatenated in rank order (no gradient; predictions)."""
    width = max(sizes)
    mine = torch.zeros((width, *x.shape[1:]), dtype=torch.from_numpy(x).dtype)
    mine[: len(x)] = torch.from_numpy(x)
    mine = mine.to(w.comm_device)
    parts = [torch.empty_like(mine) for _ in range(w.size)]
    dist.all_gather(parts, mine)
    return np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes, strict=True)])


def barrier(w: World) -> None:
    """Wait for every rank (a no-op in a world of one)."""
    if w.distributed:
        if w.backend == "nccl":
            dist.barrier(device_ids=[w.local_rank])
        else:
            dist.barrier()
