"""The MR-CCL network: specificity encoders, a shared invariant encoder, classifiers A, V, T, F."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from data_contracts.labels import CLASSIFIER_OF_MODALITY, CLASSIFIERS, MODALITIES, NUM_CLASSES
from models.contrastive import LearnableTemperature, imcl_ae, imcl_ne, temperature_names
from models.nee import NOISE_KINDS, NoiseSchedule
from models.settings import default
from models.voting import DEFAULT_VOTING_WEIGHTS, check_weights, classifier_presence, soft_vote

# Utterance feature dims of the paper's extractors (CLIP ViT-L/14, HuBERT-large, Baichuan2-13B).
PAPER_DIMS: dict[str, int] = {"visual": 768, "acoustic": 1024, "text": 5120}

C = TypeVar("C")


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config dataclass from a mapping; unknown keys and wrong types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        origin = typing.get_origin(hints[key]) or hints[key]
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, int | float) and not isinstance(value, bool),
            str: isinstance(value, str),
            dict: isinstance(value, Mapping),
        }.get(origin, True)
        if not ok:
            raise TypeError(
                f"{cls.__name__}.{key} must be {hints[key]}; got {value!r} ({type(value).__name__})"
            )
        values[key] = (
            dict(value) if origin is dict else (float(value) if origin is float else value)
        )
    return cls(**values)


@dataclass
class MRCCLConfig:
    """Every setting that shapes an MR-CCL network; saved beside each checkpoint."""

    dims: dict[str, int] = field(default_factory=lambda: dict(PAPER_DIMS))
    n_tokens: int = default("n_tokens")  # an utterance vector is cut into this many tokens
    hidden: int = default("hidden")
    n_layers: int = default("n_layers")
    n_heads: int = default("n_heads")
    ff_mult: int = 4  # Transformer feed-forward width = ff_mult * hidden
    dropout: float = default("dropout")
    num_classes: int = NUM_CLASSES
    use_nee: bool = default("use_nee")  # False: the "without NEE" ablation (no noisy view)
    nee_schedule: str = default("nee_schedule")
    nee_steps: int = 100
    nee_beta_start: float = 0.001
    nee_beta_end: float = 0.1
    temperature_init: float = 0.07
    temperature_min: float = 0.01
    voting_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_VOTING_WEIGHTS))

    def __post_init__(self) -> None:
        if set(self.dims) != set(MODALITIES):
            raise ValueError(f"dims must name exactly {MODALITIES}; got {sorted(self.dims)}")
        if self.hidden % self.n_heads:
            raise ValueError(
                f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides hidden"
            )
        for m, d in self.dims.items():
            if not 1 <= self.n_tokens <= d:
                raise ValueError(f"n_tokens={self.n_tokens} must be in 1..{d} (dim of {m})")
        if self.nee_schedule not in NOISE_KINDS:
            raise ValueError(
                f"nee_schedule {self.nee_schedule!r} unknown; valid: {', '.join(NOISE_KINDS)}"
            )
        self.voting_weights = check_weights(self.voting_weights)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MRCCLConfig:
        """Config from a mapping (e.g. a checkpoint's JSON); unknown keys are errors."""
        return config_from_dict(cls, data)


# Named specs: the paper-sized network and a tiny one of the same architecture for tests/demo.
MRCCL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {"n_tokens": 4, "hidden": 32, "n_layers": 2, "n_heads": 2, "ff_mult": 2},
}


def mrccl_config(name: str, **overrides: Any) -> MRCCLConfig:
    """The named preset with `overrides` applied; an unknown name lists the valid ones."""
    if name not in MRCCL_PRESETS:
        raise ValueError(f"unknown MR-CCL preset {name!r}; valid presets: {sorted(MRCCL_PRESETS)}")
    return MRCCLConfig.from_dict({**MRCCL_PRESETS[name], **overrides})


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-row zero mean, unit variance: extractors differ wildly in output scale."""
    return F.layer_norm(x, (x.shape[-1],))


def masked_rows(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """x with rows of absent items set to zero (where(), so a NaN placeholder cannot leak)."""
    return torch.where(present.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))


class SpecificityEncoder(nn.Module):
    """Utterance vector -> n_tokens chunks, each projected to a token -> Transformer (within one
    sample) -> mean-pool."""

    def __init__(self, dim: int, cfg: MRCCLConfig) -> None:
        super().__init__()
        self.n_tokens = cfg.n_tokens
        self.chunk = math.ceil(dim / cfg.n_tokens)
        self.pad = self.chunk * cfg.n_tokens - dim  # zero-pad the tail to whole chunks
        # One projection per chunk: the chunks of an utterance vector are unrelated blocks of
        # dimensions, so sharing one projection across them would throw information away.
        bound = 1.0 / math.sqrt(self.chunk)  # nn.Linear's default init
        self.tokenize_weight = nn.Parameter(
            torch.empty(cfg.n_tokens, self.chunk, cfg.hidden).uniform_(-bound, bound)
        )
        self.tokenize_bias = nn.Parameter(torch.zeros(cfg.n_tokens, cfg.hidden))
        self.position = nn.Parameter(torch.randn(1, cfg.n_tokens, cfg.hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.n_heads,
            cfg.ff_mult * cfg.hidden,
            cfg.dropout,
            activation="gelu",
            batch_first=True,  # (B, tokens, hidden): attention runs within a sample only
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, hidden)."""
        x = F.pad(x, (0, self.pad)).view(x.shape[0], self.n_tokens, self.chunk)  # (B, n, chunk)
        tokens = torch.einsum("bnc,nch->bnh", x, self.tokenize_weight) + self.tokenize_bias
        tokens = tokens + self.position  # (B, n_tokens, hidden)
        return self.norm(self.encoder(tokens)).mean(dim=1)  # (B, hidden)


def mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear-GELU-(Dropout)-Linear."""
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out)
    )


@dataclass
class MRCCLReps:
    """Per-row vectors of one forward pass, before anything mixes rows."""

    specific: dict[str, torch.Tensor]  # modality -> (B, hidden)
    noisy: dict[str, torch.Tensor]  # modality -> (B, hidden) NEE view; empty without one
    invariant: dict[str, torch.Tensor]  # modality -> (B, hidden)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MRCCLReps:
        """The same vectors with `fn` applied to each (e.g. a gather across ranks)."""
        return MRCCLReps(
            {m: fn(v) for m, v in self.specific.items()},
            {m: fn(v) for m, v in self.noisy.items()},
            {m: fn(v) for m, v in self.invariant.items()},
        )


@dataclass
class MRCCLOutput:
    """What one forward pass returns."""

    logits: dict[str, torch.Tensor]  # classifier (A, V, T, F) -> (B, C)
    presence: dict[str, torch.Tensor]  # classifier -> (B,) bool: had an input in that row
    l_intra: torch.Tensor  # scalar, IMCL-NE (0 when not computed)
    l_imc: torch.Tensor  # scalar, IMCL-AE (0 when not computed)
    terms: dict[str, torch.Tensor]  # each contrastive term, for logging


class MRCCL(nn.Module):
    """Modality Representation Combinatorial Contrastive Learning network."""

    model_type = "mrccl"

    def __init__(self, cfg: MRCCLConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden
        self.specific = nn.ModuleDict({m: SpecificityEncoder(cfg.dims[m], cfg) for m in MODALITIES})
        self.invariant = mlp(h, h, h)  # shared by the three modalities
        self.projections = nn.ModuleDict({m: mlp(h, 2 * h, 2 * h) for m in MODALITIES})
        self.temperatures = nn.ModuleDict(
            {
                name: LearnableTemperature(cfg.temperature_init, cfg.temperature_min)
                for name in temperature_names()
            }
        )
        self.classifiers = nn.ModuleDict(
            {CLASSIFIER_OF_MODALITY[m]: mlp(h, h, cfg.num_classes, cfg.dropout) for m in MODALITIES}
        )
        self.classifiers["F"] = mlp(len(MODALITIES) * h, h, cfg.num_classes, cfg.dropout)
        self.nee = (
            NoiseSchedule(cfg.nee_schedule, cfg.nee_steps, cfg.nee_beta_start, cfg.nee_beta_end)
            if cfg.use_nee
            else None
        )

    def encode(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        with_contrastive: bool = True,
        generator: torch.Generator | None = None,
    ) -> MRCCLReps:
        """The per-row part of a forward pass: specific (and NEE-noised) and invariant vectors.

        Everything after this (`heads`) mixes rows only through the contrastive losses, so a
        data-parallel run gathers these from every rank and calls `heads` on the whole batch.
        """
        noisy_view = with_contrastive and self.nee is not None
        specific, noisy, invariant = {}, {}, {}
        for m in MODALITIES:
            x = normalize_rows(masked_rows(features[m], present[m]))  # (B, d_m)
            if noisy_view:
                # NEE on the standardised input, so a timestep means the same noise-to-signal
                # ratio for every extractor; clean and noisy share one encoder call.
                both = self.specific[m](torch.cat([x, self.nee.add_noise(x, generator)]))
                specific[m], noisy[m] = both.chunk(2)  # (B, hidden) each
            else:
                specific[m] = self.specific[m](x)  # (B, hidden)
            invariant[m] = self.invariant(specific[m])  # (B, hidden)
        return MRCCLReps(specific, noisy, invariant)

    def heads(
        self,
        reps: MRCCLReps,
        present: Mapping[str, torch.Tensor],
        with_contrastive: bool = True,
        groups: torch.Tensor | None = None,
    ) -> MRCCLOutput:
        """Logits of A, V, T, F and (if asked) L_intra and L_imc from encoded rows.

        `groups` (B,) integers, equal = the same video (oversampled copies): the contrastive
        terms then do not treat a copy of a row as its negative. None: all rows are distinct.
        """
        specific, invariant = reps.specific, reps.invariant
        logits = {
            CLASSIFIER_OF_MODALITY[m]: self.classifiers[CLASSIFIER_OF_MODALITY[m]](specific[m])
            for m in MODALITIES
        }
        fused = torch.cat([masked_rows(invariant[m], present[m]) for m in MODALITIES], -1)
        logits["F"] = self.classifiers["F"](fused)  # (B, C) from (B, 3*hidden)
        zero = fused.new_zeros(())
        l_intra, l_imc, terms = zero, zero, {}
        if with_contrastive and reps.noisy:
            l_intra, t = imcl_ne(specific, reps.noisy, present, self.temperatures, groups)
            terms.update(t)
        if with_contrastive:
            l_imc, t = imcl_ae(invariant, present, self.temperatures, self.projections, groups)
            terms.update(t)
        logits = {c: logits[c] for c in CLASSIFIERS}
        return MRCCLOutput(logits, classifier_presence(present), l_intra, l_imc, terms)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        with_contrastive: bool = True,
        generator: torch.Generator | None = None,
        groups: torch.Tensor | None = None,
    ) -> MRCCLOutput:
        """Logits of A, V, T, F and (if asked) L_intra and L_imc for a batch of B rows;
        `groups` as in `heads`."""
        reps = self.encode(features, present, with_contrastive, generator)
        return self.heads(reps, present, with_contrastive, groups)

    def vote(self, out: MRCCLOutput) -> torch.Tensor:
        """Voted class probabilities (B, C) with the config's weights."""
        probs = {c: out.logits[c].softmax(-1) for c in CLASSIFIERS}
        return soft_vote(probs, out.presence, self.config.voting_weights)
