"""Which extractor ids and feature tables a profile's settings produce (extraction and training
agree on them without running anything)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_contracts import tables
from data_contracts.tables import TableRef
from flows.config import Settings
from tasks.embed import ModelChoice, transcripts_extractor_id
from tasks.faces import FaceSettings
from tasks.media import audio_extractor_id


@dataclass(frozen=True)
class ExtractionPlan:
    """Extractor choices and the ids keying every stage's rows."""

    models: dict[str, ModelChoice]
    faces: FaceSettings
    audio_id: str
    transcripts_id: str
    official_transcripts: bool

    @property
    def upstream(self) -> dict[str, str]:
        """The input id each feature modality is computed from."""
        return {
            "visual": self.faces.extractor_id,
            "acoustic": self.audio_id,
            "text": self.transcripts_id,
        }

    def feature_tables(self) -> dict[str, TableRef]:
        """One feature table per modality and extractor."""
        return {
            m: tables.features(m, self.models[m].extractor_id(up), self.models[m].spec.output_dim)
            for m, up in self.upstream.items()
        }


def model_choices(settings: Settings, data_root: Path | str) -> dict[str, ModelChoice]:
    """The four extractors of a profile, as picklable choices for the tasks (their checkpoints
    are local: under the data root, or its local work folder when it is a URL)."""
    m = settings.models
    models_dir = settings.models_dir(data_root)
    if m.build_tiny:
        from models.tiny import build_tiny_models

        build_tiny_models(models_dir, seed=m.tiny_seed)
    dtype = None if m.dtype == "auto" else m.dtype
    common = {
        "models_dir": str(models_dir),
        "device": m.device,
        "dtype": dtype,
        "allow_download": m.allow_download,
        "trust_remote_code": m.trust_remote_code,
    }
    sr = settings.audio.sample_rate
    return {
        "visual": ModelChoice(m.visual, batch=m.visual_batch, **common),
        "acoustic": ModelChoice(m.acoustic, batch=m.audio_batch_seconds * sr, **common),
        "asr": ModelChoice(m.asr, **common),
        "text": ModelChoice(m.text, batch=m.text_batch_tokens, **common),
    }


def face_settings(settings: Settings) -> FaceSettings:
    """The faces stage's settings from the profile."""
    f = settings.faces
    return FaceSettings(
        backend=f.backend,
        size=f.size,
        fps=f.fps,
        max_frames=f.max_frames,
        openface_bin=f.openface_bin,
    )


def plan_extraction(
    settings: Settings, data_root: Path | str, corpus_dir: Path | None
) -> ExtractionPlan:
    """The plan of a profile on a corpus (official transcripts change the transcripts id)."""
    official = bool(
        corpus_dir is not None
        and settings.extract.prefer_official_transcripts
        and (Path(corpus_dir) / settings.corpus.transcripts_csv).exists()
    )
    models = model_choices(settings, data_root)
    audio_id = audio_extractor_id(settings.audio.sample_rate)
    asr_id = models["asr"].extractor_id(audio_id)
    return ExtractionPlan(
        models=models,
        faces=face_settings(settings),
        audio_id=audio_id,
        transcripts_id=transcripts_extractor_id(asr_id, official),
        official_transcripts=official,
    )
