"""The `train:` settings: every number of the recipe of docs/method.md, declared once.

The engine's dataclasses (models/training.py TrainConfig, models/mrccl.py MRCCLConfig,
models/recipe.py RecipeConfig, models/selftrain.py, models/voting.py) take their defaults from
here, and models/recipe.py `recipe_from_settings` builds them from a profile's settings. Light
on purpose (pydantic only, no torch): the command line reads settings without loading models.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_contracts.labels import MODALITIES


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask: a container's, Slurm's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TrainSettings(BaseModel):
    """The `train:` section of the settings: the recipe, the quality filters and how many
    processes run a step."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0  # each stage re-seeds torch and its own numpy shuffler from it
    standardize: bool = True  # z-score each modality over all videos (label-free) before training
    n_splits: int = Field(5, ge=2)
    lr: float = Field(1e-4, gt=0)
    lr_step2: float = Field(5e-5, gt=0)
    batch_size: int = Field(512, gt=0)  # capped at the number of rows, for small data
    # The paper's "maximum of 40 epochs" and patience 5 for MR-CCL. merflow applies max_epochs to
    # the baseline (the paper gives it none) and both to pretraining (docs/method.md §7).
    max_epochs: int = Field(40, gt=0)
    patience: int = Field(5, gt=0)  # epochs without a better early-stopping score before stopping
    final_epochs: int = Field(20, gt=0)  # at most this many epochs in step 1 and in step 2
    pretrain_epochs: int = Field(40, ge=0)  # at most; early-stopped on held-out rows' loss
    # Share of the rows held out to choose the epoch (docs/method.md §7): of each fold's
    # training rows (stratified; voted WAF) and of pretraining's videos (contrastive loss);
    # 0: no early stopping, every stage trains its full epoch count.
    inner_val_fraction: float = Field(0.15, ge=0, lt=1)
    lambda_con: float = Field(1.0, ge=0)  # weight of L_intra + L_imc during fine-tuning
    hidden: int = Field(256, gt=0)
    n_tokens: int = Field(8, gt=0)  # an utterance vector is cut into this many tokens
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    baseline_dropout: float = Field(0.3, ge=0, lt=1)  # the challenge baseline's own
    nee_schedule: Literal["linear", "scaled_linear"] = "linear"
    oversample_step1: dict[str, int] = Field(
        default_factory=lambda: {"sad": 850, "worried": 850, "surprise": 850}
    )
    oversample_step2: dict[str, int] = Field(
        default_factory=lambda: {"sad": 1000, "worried": 1000, "surprise": 1000}
    )
    # 0.99 for the four big classes, 0.85 for the two rare ones.
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {
            "neutral": 0.99,
            "angry": 0.99,
            "happy": 0.99,
            "sad": 0.99,
            "worried": 0.85,
            "surprise": 0.85,
        }
    )
    # The paper saw the baseline do better on happy, worried and surprise, MR-CCL on the others.
    preferred_baseline: list[str] = Field(default_factory=lambda: ["happy", "worried", "surprise"])
    vote_weights: list[float] = Field(default_factory=lambda: [0.7, 0.5, 0.4, 0.7])  # A V T F
    # Quality filters (tasks/stores/quality.py): mask a modality of a video whose signal is below
    # the threshold. Off by default so that the paper's numbers stay comparable.
    quality_min_face_ratio: float | None = Field(None, ge=0, le=1)
    quality_min_face_confidence: float | None = None
    quality_min_speech_ratio: float | None = Field(None, ge=0, le=1)
    quality_min_asr_confidence: float | None = Field(None, ge=0, le=1)
    quality_min_transcript_chars: int | None = Field(None, ge=0)
    # Ablations of the paper's Table 1, one switch each.
    use_pretraining: bool = True
    use_nee: bool = True
    use_pseudo_labels: bool = True
    use_oversampling: bool = True
    # Also train the challenge baseline on the oversampled fit rows, for the report only (a row
    # of merflow's; the paper's Table 3 has 83.03 for it): the paper's baseline, which makes the
    # pseudo labels, trains on the labelled fit rows without oversampling.
    oversampled_baseline: bool = True
    device: str = "auto"
    # The feature table of a modality to train on (docs/import.md): its extractor id (e.g.
    # imported-mertools-clip) or its table name (features/visual/<id>, kept as the id); a
    # modality not named trains on the extraction plan's table, as extraction names it.
    feature_tables: dict[str, str] = Field(default_factory=dict)
    # Data-parallel training (models/distributed.py): more than one process in all runs each
    # step under torchrun. These say how a step runs, not what it computes, so they are left out
    # of a run's identity: a run started on 8 GPUs resumes on 4 in the same folder.
    nproc_per_node: int = Field(1, ge=1)  # processes on this machine, one per GPU
    nnodes: int = Field(1, ge=1)  # machines; the others run `merflow train-join`
    rdzv_endpoint: str | None = None  # host:port on node 0 that every node can reach
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on CUDA, else gloo
    # torch intra-op threads of each training process; None: the cores this worker may use,
    # shared out over its nproc_per_node processes. Set it when two jobs share a machine: more
    # threads than free cores make every op wait for a descheduled thread (~8x slower).
    threads: int | None = Field(None, gt=0)

    @field_validator("feature_tables")
    @classmethod
    def _tables_of_known_modalities(cls, value: dict[str, str]) -> dict[str, str]:
        problems = []
        for m, name in value.items():
            parts = name.split("/")
            table_name = len(parts) == 3 and parts[:2] == ["features", m]
            if m not in MODALITIES:
                problems.append(f"{m!r} is not a modality ({', '.join(MODALITIES)})")
            elif not parts[-1].strip() or (len(parts) > 1 and not table_name):
                problems.append(f"{m}: {name!r} is not an extractor id nor features/{m}/<id>")
        if problems:
            raise ValueError("; ".join(problems))
        # Kept as extractor ids: two spellings of one table are one run key.
        return {m: name.rsplit("/", 1)[-1].strip() for m, name in value.items()}

    @model_validator(mode="after")
    def _multi_node_needs_endpoint(self) -> TrainSettings:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"train.nnodes={self.nnodes} needs train.rdzv_endpoint=HOST:PORT, an address on "
                "the first machine that every machine can reach"
            )
        return self

    def process_threads(self, cpus: int) -> int:
        """Intra-op threads of each training process on a worker with `cpus` usable cores."""
        return self.threads or max(1, cpus // self.nproc_per_node)

    @property
    def world_size(self) -> int:
        """Training processes in all."""
        return self.nproc_per_node * self.nnodes


# Train settings that only say how many processes (and threads) run a step (excluded from the
# run key).
LAUNCH_SETTINGS = frozenset(
    {"nproc_per_node", "nnodes", "rdzv_endpoint", "dist_backend", "threads"}
)


def default(name: str) -> Any:
    """The declared default of train setting `name` (a fresh copy for lists and dicts)."""
    info = TrainSettings.model_fields[name]
    return info.default_factory() if info.default_factory is not None else info.default
