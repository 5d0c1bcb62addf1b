"""MR-CCL's contrastive terms (Eq. 3, symmetric InfoNCE; IMCL-NE; IMCL-AE) and their learnable
temperatures, which the network (models/mrccl.py) computes in its heads; the loss of each
training stage is models/losses.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from data_contracts.labels import MODALITIES

# Loss-term names; one learnable temperature each (tau_v, tau_a, tau_t, tau_av, ...).
INTRA_TERMS: tuple[str, ...] = MODALITIES
PAIR_TERMS: tuple[tuple[str, str], ...] = (
    ("visual", "acoustic"),
    ("acoustic", "text"),
    ("visual", "text"),
)
# One modality against the concatenation of the other two, in MODALITIES order.
ONE_VS_TWO_TERMS: tuple[tuple[str, tuple[str, str]], ...] = tuple(
    (m, tuple(o for o in MODALITIES if o != m)) for m in MODALITIES
)


def pair_name(a: str, b: str) -> str:
    """Name of the pairwise term between two modalities, e.g. 'visual-acoustic'."""
    return f"{a}-{b}"


def one_vs_two_name(m: str) -> str:
    """Name of the one-vs-two term of modality m, e.g. 'visual-vs-rest'."""
    return f"{m}-vs-rest"


def temperature_names() -> tuple[str, ...]:
    """Every term that owns a temperature: 3 intra, 3 pairwise, 3 one-vs-two."""
    return (
        tuple(f"intra-{m}" for m in INTRA_TERMS)
        + tuple(pair_name(a, b) for a, b in PAIR_TERMS)
        + tuple(one_vs_two_name(m) for m, _ in ONE_VS_TWO_TERMS)
    )


def same_group_negatives(groups: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: [i, j] is True where i != j and rows i, j are the same video."""
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    return same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)


def symmetric_info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 3: InfoNCE of a_k against b_j plus of b_k against a_j (summed); rows of a, b pair up.

    `groups` (B,) integers, equal values = the same video (e.g. oversampled copies): a copy of
    row k is then no negative of row k; the pair leaves both softmax denominators (its logit is
    -inf in both directions) while the positive (k, k) stays. None: every j != k is a negative.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"symmetric_info_nce needs two (B, d) tensors; got {a.shape}, {b.shape}")
    if groups is not None and groups.shape != (a.shape[0],):
        raise ValueError(
            f"symmetric_info_nce: groups must have shape ({a.shape[0]},); got {tuple(groups.shape)}"
        )
    if a.shape[0] == 0:
        return a.sum() * 0.0  # empty batch: zero, still attached to the graph
    logits = a @ b.T / temperature  # (B, B): [k, j] = a_k . b_j / tau
    if groups is not None:
        # Symmetric mask, so logits.T below is masked the same way; the diagonal is never masked,
        # so no row is all -inf and the loss and its gradients stay finite.
        logits = logits.masked_fill(same_group_negatives(groups.to(a.device)), float("-inf"))
    target = torch.arange(a.shape[0], device=a.device)
    # Row k of logits normalises over b_j; row k of logits.T over a_j (the second sum of Eq. 3).
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


class LearnableTemperature(nn.Module):
    """A temperature learned in log space, initialised at `init`, never below `minimum`."""

    def __init__(self, init: float = 0.07, minimum: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < minimum <= init:
            raise ValueError(f"temperature needs 0 < minimum <= init; got {minimum}, {init}")
        self.minimum = minimum
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        """Current temperature, a scalar tensor >= minimum."""
        return self.log_tau.exp().clamp(min=self.minimum)


def _masked(
    a: torch.Tensor,
    b: torch.Tensor,
    rows: torch.Tensor,
    tau: torch.Tensor | float,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Eq. 3 on the rows where both sides exist, on L2-normalised vectors; returns (loss, rows).

    `groups` (B,) are the video groups of all B rows; they are selected with the same `rows`."""
    n = int(rows.sum())
    a, b = a[rows], b[rows]
    g = None if groups is None else groups.to(rows.device)[rows]
    return symmetric_info_nce(F.normalize(a, dim=-1), F.normalize(b, dim=-1), tau, g), n


def _mean_of_terms(terms: dict[str, torch.Tensor], counts: dict[str, int]) -> torch.Tensor:
    """Mean of the terms that had at least two rows (a one-row InfoNCE is identically zero)."""
    used = [terms[k] for k in terms if counts[k] >= 2]
    if not used:
        return next(iter(terms.values())) * 0.0
    return torch.stack(used).mean()


def imcl_ne(
    clean: Mapping[str, torch.Tensor],
    noisy: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    temperatures: Mapping[str, Callable[[], torch.Tensor]],
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IMCL-NE: L_intra = mean over modalities of Eq. 3 between F_hat^m and N_hat^m.

    `groups` (B,): rows of the same video are not each other's negatives (see Eq. 3's function).
    """
    terms, counts = {}, {}
    for m in INTRA_TERMS:
        name = f"intra-{m}"
        terms[name], counts[name] = _masked(
            clean[m], noisy[m], present[m], temperatures[name](), groups
        )
    return _mean_of_terms(terms, counts), terms


def imcl_ae(
    invariant: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    temperatures: Mapping[str, Callable[[], torch.Tensor]],
    projections: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IMCL-AE: L_imc = mean of 3 pairwise and 3 one-vs-two Eq. 3 terms on H^v, H^a, H^t.

    In a one-vs-two term the single side goes through `projections[m]` (hidden -> 2*hidden)
    and faces concat of the other two H's; only rows with all three modalities count.
    `groups` (B,): rows of the same video are not each other's negatives.
    """
    terms, counts = {}, {}
    for a, b in PAIR_TERMS:
        name = pair_name(a, b)
        rows = present[a] & present[b]
        terms[name], counts[name] = _masked(
            invariant[a], invariant[b], rows, temperatures[name](), groups
        )
    for m, (o1, o2) in ONE_VS_TWO_TERMS:
        name = one_vs_two_name(m)
        rows = present[m] & present[o1] & present[o2]
        single = projections[m](invariant[m])  # (B, 2*hidden)
        pair = torch.cat([invariant[o1], invariant[o2]], dim=-1)  # (B, 2*hidden)
        terms[name], counts[name] = _masked(single, pair, rows, temperatures[name](), groups)
    return _mean_of_terms(terms, counts), terms


# ----------------------------------------------------------------------------- losses per stage
