"""Typed settings: a profile file from configs/, then MERFLOW_* environment variables, then
`key=value` overrides. Unknown keys and wrong types are errors that list every problem at once;
the resolved settings are saved beside every output."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from data_contracts.location import (
    DataRootError,
    default_local_dir,
    is_url,
    normalize_root,
    split_root_list,
)
from models.settings import TrainSettings
from tasks.corpus import layout
from tasks.defaults import DEFAULT_RETRIES, DEFAULT_SAMPLE_RATE
from tasks.faces.settings import FaceSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
ENV_PREFIX = "MERFLOW_"
# Environment variables read by single tools, not settings (tasks/media.py, face_openface.py,
# data_contracts/location.py, flows/server.py, tasks/engine/gpu_slots.py).
TOOL_ENV = frozenset(
    {
        "MERFLOW_HOME",
        "MERFLOW_FFMPEG",
        "MERFLOW_OPENFACE_BIN",
        "MERFLOW_CACHE_DIR",
        "MERFLOW_STATE_DIR",
        "MERFLOW_CPU_DIR",
    }
)


class SettingsError(ValueError):
    """Settings could not be loaded; the message lists every problem and the way out."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusSettings(_Section):
    """Where a MER2024-shaped corpus keeps its videos and CSVs (relative to the corpus folder);
    a folder without the two video folders is a plain folder of unlabelled videos. The
    defaults are declared in tasks/corpus/layout.py."""

    labelled_dir: str = layout.LABELLED_DIR
    unlabelled_dir: str = layout.UNLABELLED_DIR
    labels_csv: str = layout.LABELS_CSV
    transcripts_csv: str = layout.TRANSCRIPTS_CSV
    video_extensions: list[str] = Field(default_factory=lambda: list(layout.VIDEO_EXTENSIONS))


class AudioSettings(_Section):
    """FFmpeg audio split."""

    sample_rate: int = Field(DEFAULT_SAMPLE_RATE, gt=0)  # speech models resample to their own
    ffmpeg_bin: str | None = None
    ffmpeg_threads: int = Field(0, ge=0)  # ffmpeg's -threads per audio split; 0: its own choice


class ModelSettings(_Section):
    """Which extractor specs to run (names from models.registry) and how."""

    visual: str = "clip-vit-large-patch14"
    acoustic: str = "chinese-hubert-large"
    asr: str = "wenet-wenetspeech"
    text: str = "baichuan2-13b-base"
    models_dir: str | None = None  # local checkpoints; default <data_root>/models
    allow_download: bool = False
    build_tiny: bool = False  # build the tiny-* checkpoints (seeded) when absent: the demo
    tiny_seed: int = 0
    trust_remote_code: bool | None = None  # None: what each spec says
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    visual_batch: int = Field(64, gt=0)
    audio_batch_seconds: float = Field(120.0, gt=0)
    audio_chunk_seconds: float = Field(10.0, gt=0)  # HuBERT's chunks; other than 10: a new id
    # Per modality, how a feature is computed from its model: "merflow" (padding left out, the
    # mean of the last layers, the device's fast dtype) or "mertools", the challenge baseline's
    # own recipe (docs/method.md §2). "mertools" keys a new extractor id; the ASR has none.
    visual_recipe: Literal["merflow", "mertools"] = "merflow"
    acoustic_recipe: Literal["merflow", "mertools"] = "merflow"
    text_recipe: Literal["merflow", "mertools"] = "merflow"
    text_batch_tokens: int = Field(4096, gt=0)

    @model_validator(mode="after")
    def _known_specs_of_their_kind(self) -> ModelSettings:
        from models.registry import specs_of  # light: no torch

        specs_of(self)  # an unknown name lists the valid ones; a wrong kind says which
        return self


class ExtractSettings(_Section):
    """The extraction flow."""

    shard_size: int = Field(64, gt=0)
    prefer_official_transcripts: bool = True
    # Prefect retries of a stage's shard on transient errors.
    retries: int = Field(DEFAULT_RETRIES, ge=0)
    # torch intra-op threads (and ASR threads) of each model stage; None: half the cores this
    # worker may use (a CPU stage of the next shard runs beside it), at least 1.
    model_threads: int | None = Field(None, gt=0)
    # Frame-level feature tables beside the utterance ones, written in the same model pass
    # (docs/features.md): visual, one row per face crop; acoustic, HuBERT's 50 frames a second
    # mean-pooled to acoustic_frame_rate windows a second.
    frame_features: list[Literal["visual", "acoustic"]] = Field(default_factory=list)
    acoustic_frame_rate: float = Field(10.0, gt=0)
    # Where tasks run: threads of the flow's process, or Dask worker processes (a LocalCluster
    # of dask_workers, or an existing scheduler at dask_address, e.g. from dask-jobqueue).
    task_runner: Literal["threads", "dask"] = "threads"
    dask_workers: int = Field(2, gt=0)
    dask_address: str | None = None


class PrefectSettings(_Section):
    """The Prefect server merflow talks to."""

    # A server every data root shares (as PREFECT_API_URL does); default: the data root's own
    # server, started when needed (flows/server.py connect, docs/servers.md).
    api_url: str | None = None
    # The address that local server binds to (flows/server.py); beyond loopback only with
    # PREFECT_SERVER_API_AUTH_STRING set.
    host: str = "127.0.0.1"
    port: int = Field(4200, gt=0, lt=65536)
    # Slots per GPU of a machine: the global concurrency limit `gpu:<host>:<device>` that every
    # GPU task (an extraction shard's model stage, a training step, prediction) holds one slot
    # of (tasks/engine/gpu_slots.py); 1: one task per GPU at a time.
    gpu_slots: int = Field(1, gt=0)


class Settings(_Section):
    """Everything a merflow run needs, resolved."""

    profile: str = "paper"
    data_root: str | None = None  # default: <corpus>/merflow; or a URL (s3://bucket/prefix)
    # For a URL data root: the local folder for what must stay local (models, training runs,
    # the Prefect server home); default ~/.cache/merflow/<URL slug>-<hash>. See local_root().
    work_dir: str | None = None
    # Folders that run parameters (from the UI) may point into; empty: no restriction (local
    # CLI). `merflow serve` sets it; see flows/safety.py. MERFLOW_ALLOWED_ROOTS=/a:/b works too.
    allowed_roots: list[str] = Field(default_factory=list)
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    audio: AudioSettings = Field(default_factory=AudioSettings)
    faces: FaceSettings = Field(default_factory=FaceSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):  # an environment variable: os.pathsep-separated folders/URLs
            return split_root_list(value)
        return value

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, value: list[str]) -> list[str]:
        relative = [v for v in value if not is_url(v) and not Path(v).expanduser().is_absolute()]
        if relative:
            raise ValueError(f"allowed_roots must be absolute paths or URLs; relative: {relative}")
        return value

    def resolved_data_root(self, corpus_dir: Path | str | None = None) -> Path | str:
        """The data root: the setting, else `<corpus_dir>/merflow`; a Path, or a normalised URL
        string when data_root is a URL (`s3://bucket/prefix`)."""
        if self.data_root:
            try:
                return normalize_root(self.data_root)
            except DataRootError as e:
                raise SettingsError(str(e)) from e
        if corpus_dir is None:
            raise SettingsError("no data root: pass --data-root or set data_root=PATH")
        return (Path(corpus_dir).expanduser() / "merflow").resolve()

    def local_root(self, data_root: Path | str) -> Path:
        """The local folder for what must stay on this machine's disk (model checkpoints,
        training runs, the Prefect server home, caches): the data root itself when it is a
        local path; for a URL data root, `work_dir`, else ~/.cache/merflow/<URL slug>-<hash>."""
        root = normalize_root(data_root)
        if isinstance(root, Path):
            return root
        return (
            Path(self.work_dir).expanduser().resolve() if self.work_dir else default_local_dir(root)
        )

    def models_dir(self, data_root: Path | str) -> Path:
        """Where local checkpoints live (under local_root() for a URL data root)."""
        if self.models.models_dir:
            return Path(self.models.models_dir).expanduser()
        return (self.local_root(data_root) if is_url(data_root) else Path(data_root)) / "models"


def list_profiles() -> list[str]:
    """Profile names available in configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _profile_path(profile: str | Path) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{profile}.yaml"
    if candidate.exists():
        return candidate
    raise SettingsError(
        f"unknown profile {str(profile)!r}; valid profiles are {', '.join(list_profiles())} "
        f"(files in {CONFIG_DIR}), or give the path of a .yaml file"
    )


def _section_fields(annotation: Any) -> list[str] | None:
    """The keys of a settings section (a pydantic model, or a dataclass such as the faces
    stage's own FaceSettings); None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return [f.name for f in dataclasses.fields(annotation)]
    return None


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str], origin: str) -> None:
    parts = dotted.split(".")
    model: Any = Settings
    node = tree
    for i, part in enumerate(parts):
        fields = _section_fields(model) or []
        if part not in fields:
            where = ".".join(parts[:i]) or "top level"
            problems.append(
                f"{origin}: unknown setting {dotted!r} ({part!r} is not in {where}; "
                f"valid: {', '.join(fields)})"
            )
            return
        annotation = _field_type(model, part)
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return
        if _section_fields(annotation) is None:
            problems.append(f"{origin}: {'.'.join(parts[: i + 1])} is a value, not a section")
            return
        node = node.setdefault(part, {})
        model = annotation


def _field_type(section: Any, name: str) -> Any:
    """The declared type of a section's field (a sub-section's class, or a value's type)."""
    if issubclass(section, BaseModel):
        return section.model_fields[name].annotation
    return typing.get_type_hints(section)[name]


def _parse_value(raw: str) -> Any:
    # YAML parsing gives ints, floats, bools, null, lists and dicts their natural types.
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def load_settings(
    profile: str | Path = "demo",
    overrides: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Settings:
    """Load a profile, apply MERFLOW_SECTION__KEY environment variables, then overrides."""
    path = _profile_path(profile)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"profile {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise SettingsError(f"profile {path} must be a mapping of settings")
    tree.setdefault("profile", Path(profile).stem)
    problems: list[str] = []
    flat = dict(tree)
    tree = {}
    for key, value in flat.items():
        _merge_tree(tree, key, value, problems, f"profile {path.name}")
    env = os.environ if env is None else env
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and name not in TOOL_ENV:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, _parse_value(raw), problems, f"environment {name}")
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form key=value (e.g. faces.fps=5)")
            continue
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(raw.strip()), problems, f"override {item!r}")
    settings = None
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as e:
        problems += [
            f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        ]
    if problems or settings is None:
        raise SettingsError("settings refused:\n" + "\n".join(f"  - {p}" for p in problems))
    return settings


def _merge_tree(tree: dict, key: str, value: Any, problems: list[str], origin: str) -> None:
    field = Settings.model_fields.get(key)
    if isinstance(value, dict) and field is not None and _section_fields(field.annotation):
        for sub, v in value.items():
            _set_dotted(tree, f"{key}.{sub}", v, problems, origin)
        return
    _set_dotted(tree, key, value, problems, origin)


def save_resolved(settings: Settings, path: Path) -> Path:
    """Write the resolved settings as YAML (beside an output, so it can be reproduced)."""
    from data_contracts.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path
