"""The loss of each training stage, which the loop of models/training.py minimises:
pretraining (the contrastive terms), fine-tuning (cross-entropy of each classifier and of the
vote, plus the contrastive terms) and the supervised baseline (cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_contracts.labels import CLASSIFIERS
from models.baseline import BaselineNet
from models.distributed import Gather, no_gather
from models.featureset import TensorBatch
from models.mrccl import MRCCL

# A stage loss sees this rank's rows (`local`: features for the forward), the whole global batch's
# labels and presence (`whole`) and a `gather` that turns per-row outputs of the local rows into
# the whole batch's (the identity in a single process). Every rank then computes the same loss
# of the whole batch: see models/distributed.py for why that gives the single-process gradient.
# Each returns the loss and its terms as floats (the epoch's stats).


def pretrain_loss(
    model: MRCCL, local: TensorBatch, whole: TensorBatch, gather: Gather = no_gather
) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive only: L_intra + L_imc."""
    reps = model.encode(local.features, local.present, with_contrastive=True).map(gather)
    # whole.groups: copies of a video (oversampling) are not each other's negatives.
    out = model.heads(reps, whole.present, with_contrastive=True, groups=whole.groups)
    loss = out.l_intra + out.l_imc
    return loss, {"loss": loss.item(), "l_intra": out.l_intra.item(), "l_imc": out.l_imc.item()}


def fine_tune_loss(
    model: MRCCL,
    local: TensorBatch,
    whole: TensorBatch,
    gather: Gather = no_gather,
    lambda_con: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean CE of A, V, T, F + CE of the voted scores + lambda_con * (L_intra + L_imc)."""
    contrastive = lambda_con > 0
    reps = model.encode(local.features, local.present, with_contrastive=contrastive).map(gather)
    out = model.heads(reps, whole.present, with_contrastive=contrastive, groups=whole.groups)
    y = whole.labels
    # A classifier whose modality is missing in a row does not learn from that row.
    ces = [
        F.cross_entropy(out.logits[c][out.presence[c]], y[out.presence[c]])
        for c in CLASSIFIERS
        if bool(out.presence[c].any())
    ]
    ce = torch.stack(ces).mean()
    ce_vote = F.nll_loss(model.vote(out).clamp_min(1e-12).log(), y)
    con = out.l_intra + out.l_imc
    loss = ce + ce_vote + lambda_con * con
    return loss, {
        "loss": loss.item(),
        "ce": ce.item(),
        "ce_vote": ce_vote.item(),
        "con": con.item(),
    }


def baseline_loss(
    model: BaselineNet, local: TensorBatch, whole: TensorBatch, gather: Gather = no_gather
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain cross-entropy."""
    logits = gather(model(local.features, local.present))
    loss = F.cross_entropy(logits, whole.labels)
    return loss, {"loss": loss.item()}
