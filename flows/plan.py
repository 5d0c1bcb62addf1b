"""Which stages, extractor ids and feature tables a profile's settings produce (extraction and
training agree on them without running anything), and each stage's arguments: the flow's
Prefect tasks and `merflow task` build the same stages from the same plan."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts import tables
from data_contracts.labels import MODALITIES
from data_contracts.store import Store
from data_contracts.tables import TableRef
from flows.config import Settings
from models.registry import get_spec
from tasks.corrupt import Corruption
from tasks.dag import STAGES
from tasks.defaults import DEFAULT_SAMPLE_RATE
from tasks.embed import (
    ModelChoice,
    acoustic_stage,
    embed_acoustic_task,
    embed_text_task,
    embed_visual_task,
    text_stage,
    transcribe_stage,
    transcribe_task,
    transcripts_extractor_id,
    visual_stage,
)
from tasks.engine.stage import Stage
from tasks.faces.crop import faces_stage
from tasks.faces.settings import FaceSettings
from tasks.media import audio_extractor_id, audio_stage
from tasks.predict import ExtractorMismatchError, TrainedRun
from tasks.raw_video_tasks import crop_faces_task, extract_audio_task
from tasks.stores.quality import find_feature_tables, named_feature_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageCode:
    """A stage of the DAG (tasks/dag.py) in code: its builder, which takes the plan's
    `stage_args`, and its Prefect task, which takes (videos, data_root) and the same arguments."""

    build: Callable[..., Stage]
    task: Any


CODE: dict[str, StageCode] = {
    "audio": StageCode(audio_stage, extract_audio_task),
    "faces": StageCode(faces_stage, crop_faces_task),
    "acoustic": StageCode(acoustic_stage, embed_acoustic_task),
    "transcribe": StageCode(transcribe_stage, transcribe_task),
    "text": StageCode(text_stage, embed_text_task),
    "visual": StageCode(visual_stage, embed_visual_task),
}
assert tuple(CODE) == STAGES, "one StageCode per stage of tasks/dag.py, in its order"


@dataclass(frozen=True)
class ExtractionPlan:
    """Extractor choices and the ids keying every stage's rows."""

    models: dict[str, ModelChoice]
    faces: FaceSettings
    audio_id: str
    transcripts_id: str
    official_transcripts: bool
    sample_rate: int = DEFAULT_SAMPLE_RATE
    ffmpeg_bin: str | None = None
    ffmpeg_threads: int = 0
    # Robustness scoring: noise mixed into every wav (tasks/corrupt.py); see corrupted().
    audio_corruption: Corruption | None = None

    def corrupted(self, c: Corruption) -> ExtractionPlan:
        """This plan with `c` applied in its raw-video stage (the audio split for noise, the
        faces for blur, downscaling and dropped frames): every id downstream of it changes, so
        the corrupted media and features are rows of their own and the clean ones stay."""
        if c.modality == "video":
            return dataclasses.replace(self, faces=dataclasses.replace(self.faces, corruption=c))
        audio_id = audio_extractor_id(self.sample_rate, c)
        asr_id = self.models["asr"].extractor_id(audio_id)
        return dataclasses.replace(
            self,
            audio_corruption=c,
            audio_id=audio_id,
            transcripts_id=transcripts_extractor_id(asr_id, self.official_transcripts),
        )

    @property
    def upstream(self) -> dict[str, str]:
        """The input id each feature modality is computed from."""
        return {
            "visual": self.faces.extractor_id,
            "acoustic": self.audio_id,
            "text": self.transcripts_id,
        }

    def extractor_ids(self) -> dict[str, str]:
        """Modality -> extractor id of the plan's feature tables (what a run records)."""
        return {m: t.name.rsplit("/", 1)[-1] for m, t in self.feature_tables().items()}

    def feature_tables(self) -> dict[str, TableRef]:
        """One feature table per modality and extractor."""
        return {
            m: tables.features(m, self.models[m].extractor_id(up), self.models[m].spec.output_dim)
            for m, up in self.upstream.items()
        }

    def stage_args(self, stage: str, official: dict[str, str] | None = None) -> dict[str, Any]:
        """The arguments of `stage`'s builder (CODE) and of its Prefect task after
        (videos, data_root). `official`: the shard's official transcripts (transcribe only;
        None where the plan does not prefer them)."""
        m, rate = self.models, self.sample_rate
        official = (official or {}) if self.official_transcripts else None
        return {
            "audio": {
                "ffmpeg_bin": self.ffmpeg_bin,
                "sample_rate": rate,
                "ffmpeg_threads": self.ffmpeg_threads,
                "corruption": self.audio_corruption,
            },
            "faces": {"settings": self.faces},
            "acoustic": {
                "model": m["acoustic"],
                "audio_sample_rate": rate,
                "audio_corruption": self.audio_corruption,
            },
            "transcribe": {
                "model": m["asr"],
                "audio_sample_rate": rate,
                "official": official,
                "audio_corruption": self.audio_corruption,
            },
            "text": {"model": m["text"], "transcripts_extractor_id": self.transcripts_id},
            "visual": {"model": m["visual"], "faces": self.faces},
        }[stage]

    def stage(self, name: str, official: dict[str, str] | None = None) -> Stage:
        """The stage `name` as the engine runs it (tasks.engine.stage.run_stage)."""
        return CODE[name].build(**self.stage_args(name, official))


def model_choices(
    settings: Settings, data_root: Path | str, build: bool = True
) -> dict[str, ModelChoice]:
    """The four extractors of a profile, as picklable choices for the tasks (their checkpoints
    are local: under the data root, or its local work folder when it is a URL). `build`: build
    the tiny checkpoints when models.build_tiny says so (False: use only what is there)."""
    m = settings.models
    models_dir = settings.models_dir(data_root)
    if m.build_tiny and build:
        from models.tiny import build_tiny_models

        build_tiny_models(models_dir, seed=m.tiny_seed)
    dtype = None if m.dtype == "auto" else m.dtype
    common = {
        "models_dir": str(models_dir),
        "device": m.device,
        "dtype": dtype,
        "allow_download": m.allow_download,
        "trust_remote_code": m.trust_remote_code,
        "gpu_slots": settings.prefect.gpu_slots,
        # None: resolved where the stage computes (tasks/embed.py ModelChoice.compute_threads).
        "threads": settings.extract.model_threads,
    }
    # Audio reaches the model at the model's own rate (resampled), so the budget is in its samples.
    model_rate = get_spec(m.acoustic).sample_rate
    return {
        "visual": ModelChoice(
            m.visual,
            batch=m.visual_batch,
            recipe=m.visual_recipe,
            frames="visual" in settings.extract.frame_features,
            **common,
        ),
        "acoustic": ModelChoice(
            m.acoustic,
            batch=m.audio_batch_seconds * model_rate,
            chunk_seconds=m.audio_chunk_seconds,
            recipe=m.acoustic_recipe,
            frames="acoustic" in settings.extract.frame_features,
            frame_rate=settings.extract.acoustic_frame_rate,
            **common,
        ),
        "asr": ModelChoice(m.asr, **common),
        "text": ModelChoice(m.text, batch=m.text_batch_tokens, recipe=m.text_recipe, **common),
    }


def face_settings(settings: Settings) -> FaceSettings:
    """The profile's face settings as this machine runs them: `faces.fallback` in place of a
    backend that cannot load here (said once; the extractor id records the backend used)."""
    f = settings.faces
    if not f.fallback or f.fallback == f.backend:
        return f
    from tasks.faces.backends import BackendUnavailableError, load_backend

    try:
        load_backend(f.backend, openface_bin=f.openface_bin)
    except BackendUnavailableError as e:
        _say_fallback_once(f.backend, f.fallback, str(e))
        return dataclasses.replace(f, backend=f.fallback)
    return f


@functools.cache
def _say_fallback_once(backend: str, fallback: str, why: str) -> None:
    log.warning(
        "face backend %r is unavailable here, using %r instead (the faces extractor id records "
        "it): %s",
        backend,
        fallback,
        why,
    )


def plan_extraction(
    settings: Settings,
    data_root: Path | str,
    corpus_dir: Path | None,
    official: bool | None = None,
    build: bool = True,
) -> ExtractionPlan:
    """The plan of a profile on a corpus (official transcripts change the transcripts id).

    `official` None: official transcripts are preferred when the settings say so and the
    corpus ships them; True or False decides it (`merflow task embed-text --text`). `build`:
    as in model_choices.
    """
    if official is None:
        official = bool(
            corpus_dir is not None
            and settings.extract.prefer_official_transcripts
            and (Path(corpus_dir) / settings.corpus.transcripts_csv).exists()
        )
    models = model_choices(settings, data_root, build)
    audio_id = audio_extractor_id(settings.audio.sample_rate)
    asr_id = models["asr"].extractor_id(audio_id)
    return ExtractionPlan(
        models=models,
        faces=face_settings(settings),
        audio_id=audio_id,
        transcripts_id=transcripts_extractor_id(asr_id, official),
        official_transcripts=official,
        sample_rate=settings.audio.sample_rate,
        ffmpeg_bin=settings.audio.ffmpeg_bin,
        ffmpeg_threads=settings.audio.ffmpeg_threads,
    )


def matching_plan(settings: Settings, data_root: Path | str, run: TrainedRun) -> ExtractionPlan:
    """The extraction plan of the current settings whose feature tables are the run's; refused,
    naming each difference, when there is none. Official transcripts are a property of the
    corpus, not of the settings: a run trained with them reads one transcripts table where the
    official text takes precedence and ASR fills in, so new videos get ASR text in that table."""
    choices = [False, True] if settings.extract.prefer_official_transcripts else [False]
    plans = [plan_extraction(settings, data_root, None, official=o) for o in choices]
    for plan in plans:
        if plan.extractor_ids() == run.extractor_ids:
            return plan
    found = plans[-1].extractor_ids()
    diffs = "; ".join(
        f"{m}: run {run.extractor_ids[m]}, settings {found[m]}"
        for m in MODALITIES
        if found[m] != run.extractor_ids[m]
    )
    raise ExtractorMismatchError(
        f"run {run.key} was trained on other features than the current settings extract ({diffs});"
        f" its features would not mean what its models learnt. Give the run's profile and "
        f"overrides (its settings.yaml), or train a run on the current settings"
    )


def stored_plan(settings: Settings, store: Store) -> ExtractionPlan:
    """The plan of a data root read without its corpus folder: no model is built, and official
    transcripts count where the stores hold the text features made from them (with a corpus,
    its transcript CSV decides)."""
    try:
        plan = plan_extraction(settings, store.root, None, official=False, build=False)
        plan.feature_tables()  # every extractor's id: a checkpoint that is not there shows here
        asr_id = plan.models["asr"].extractor_id(plan.audio_id)
    except FileNotFoundError as e:  # models.registry.ModelNotFoundError
        raise LookupError(
            f"without a corpus folder the extraction plan names its tables from the models in "
            f"{settings.models_dir(store.root)}, and they are not all there ({e}); name the table "
            f"of every modality with train.feature_tables={{visual: ID, acoustic: ID, text: ID}} "
            f"({_stored_listing(store)}), or give the corpus folder"
        ) from e
    if not settings.extract.prefer_official_transcripts:
        return plan
    official = dataclasses.replace(
        plan,
        transcripts_id=transcripts_extractor_id(asr_id, True),
        official_transcripts=True,
    )
    return official if store.exists(official.feature_tables()["text"]) else plan


def training_tables(
    settings: Settings, store: Store, corpus_dir: Path | None
) -> dict[str, TableRef]:
    """The feature table of each modality a run trains on: the stored table the setting
    `train.feature_tables` names, else the extraction plan's. Without a corpus folder the plan
    is stored_plan (no model built) and its tables must be in the stores; with every modality
    named, no plan is made at all."""
    named = settings.train.feature_tables
    chosen = named_feature_tables(store, named)
    missing = [m for m in MODALITIES if m in named and m not in chosen]
    if missing:
        m = missing[0]
        raise LookupError(
            f"train.feature_tables names the {m} table {named[m]!r}, which the stores under "
            f"{store.url} do not hold ({_stored_listing(store, m)}); import one with "
            f"`merflow import-features {m} NAME SOURCE` (table imported-NAME)"
        )
    rest = [m for m in MODALITIES if m not in chosen]
    if not rest:
        return chosen
    if corpus_dir is not None:
        planned = plan_extraction(settings, store.root, corpus_dir).feature_tables()
        return {m: chosen.get(m, planned[m]) for m in MODALITIES}
    planned = stored_plan(settings, store).feature_tables()
    absent = [m for m in rest if not store.exists(planned[m])]
    if absent:
        wanted = ", ".join(f"{m}: {planned[m].name.rsplit('/', 1)[-1]}" for m in absent)
        raise LookupError(
            f"without a corpus folder training reads the tables the stores hold, and they lack "
            f"the extraction plan's {wanted}; name the tables to train on with "
            f"train.feature_tables={{{', '.join(f'{m}: ID' for m in absent)}}} "
            f"({_stored_listing(store)}), or extract them (`merflow extract CORPUS`)"
        )
    return {m: chosen.get(m, planned[m]) for m in MODALITIES}


def _stored_listing(store: Store, modality: str | None = None) -> str:
    """The feature tables the stores hold (of one modality), for an error message."""
    stored, _ = find_feature_tables(store)
    names = [
        f"{t.modality}: {t.extractor_id}" if modality is None else t.extractor_id
        for t in stored
        if modality in (None, t.modality)
    ]
    what = f"{modality} tables" if modality else "feature tables"
    return f"the stores hold {'; '.join(names)}" if names else f"the stores hold no {what}"
