"""The extraction DAG, declared once: the six stages in the order a flow submits them, and the
stage each one reads from (none: the video itself).

    audio ─┬─▶ acoustic          faces ─▶ visual
           └─▶ transcribe ─▶ text

Everything that walks the DAG reads it from here: each stage's builder names its upstream
(tasks/media.py, tasks/faces/crop.py, tasks/embed.py), the extraction plan builds stages by
these names (flows/plan.py), the extract flow submits and chains its Prefect tasks by them
(flows/extract.py), the store check explains a missing row through them
(tasks/stores/quality.py), and the benchmarks time phases under them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from data_contracts.store import Store
    from data_contracts.tables import TableRef
    from tasks.engine.stage import Stage
    from tasks.faces.settings import FaceSettings

AUDIO, FACES = "audio", "faces"
ACOUSTIC, TRANSCRIBE, TEXT, VISUAL = "acoustic", "transcribe", "text", "visual"

STAGES: tuple[str, ...] = (AUDIO, FACES, ACOUSTIC, TRANSCRIBE, TEXT, VISUAL)
UPSTREAM: dict[str, str] = {ACOUSTIC: AUDIO, TRANSCRIBE: AUDIO, TEXT: TRANSCRIBE, VISUAL: FACES}
# The stage whose table holds each feature modality.
FEATURE_STAGE: dict[str, str] = {"visual": VISUAL, "acoustic": ACOUSTIC, "text": TEXT}


class Plan(Protocol):
    """What tasks read of an extraction plan (flows/plan.py ExtractionPlan builds it from the
    settings): each stage as the engine runs it, and the ids keying its rows."""

    faces: FaceSettings
    audio_id: str
    transcripts_id: str
    official_transcripts: bool

    def stage(self, name: str, official: dict[str, str] | None = None) -> Stage: ...

    def feature_tables(self) -> dict[str, TableRef]: ...

    def extractor_ids(self) -> dict[str, str]: ...


def chain(stage: str) -> list[str]:
    """`stage` and every stage it needs, upstream first."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return [*chain(UPSTREAM[stage]), stage] if stage in UPSTREAM else [stage]


def pending_per_stage(store: Store, videos: pd.DataFrame, plan: Plan) -> dict[str, set[str]]:
    """Per stage, the video ids whose output (or recorded failure)
    the store lacks under `plan`'s stages (an ExtractionPlan, flows/plan.py)."""
    from tasks.engine.stage import stage_pending

    out = {}
    for name in STAGES:
        stage = plan.stage(name)
        todo = stage_pending(stage, videos, store)[0]
        out[name] = set(todo.video_id)
    return out
