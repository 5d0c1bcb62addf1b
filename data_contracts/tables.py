"""References to the stored tables: a name (its folder under the stores) and its contract."""

from __future__ import annotations

from dataclasses import dataclass

from data_contracts import contracts as c


@dataclass(frozen=True)
class TableRef:
    """One stored table: `name` is its folder under `<data_root>/stores/`."""

    name: str
    contract: c.Contract

    @property
    def key(self) -> tuple[str, ...]:
        """The columns that identify a row."""
        return self.contract.key


# The sha256 of a feature-only row: a video imported without its file (--without-videos). No
# digest has a '-', so it never matches a scanned file's bytes; it is the same on every import,
# so an id names its vectors for good, as a scanned video's rows do (the source's own sha256 is
# in the provenance). Training takes such rows for the ids the manifest lacks
# (tasks/stores/quality.py current_videos).
NO_VIDEO = "no-video"

MANIFEST = TableRef("manifest", c.MANIFEST)
AUDIO = TableRef("audio", c.AUDIO)
FACES = TableRef("faces", c.FACES)
TRANSCRIPTS = TableRef("transcripts", c.TRANSCRIPTS)
LABELS = TableRef("labels", c.LABELS)
PSEUDO_LABELS = TableRef("pseudo_labels", c.PSEUDO_LABELS)
PREDICTIONS = TableRef("predictions", c.PREDICTIONS)
FAILURES = TableRef("failures", c.FAILURES)

FIXED_TABLES: tuple[TableRef, ...] = (
    MANIFEST,
    AUDIO,
    FACES,
    TRANSCRIPTS,
    LABELS,
    PSEUDO_LABELS,
    PREDICTIONS,
    FAILURES,
)


def features(modality: str, extractor_id: str, dim: int) -> TableRef:
    """The feature table of one modality and extractor (one table per modality and extractor)."""
    if not extractor_id or "/" in extractor_id or extractor_id.startswith("."):
        raise ValueError(f"extractor_id {extractor_id!r} is not a valid table folder name")
    return TableRef(f"features/{modality}/{extractor_id}", c.feature_contract(modality, dim))


def frame_features(modality: str, extractor_id: str, dim: int) -> TableRef:
    """The frame-level feature table of one modality and extractor id (`frames/...`)."""
    features(modality, extractor_id, dim)  # the same folder-name rules
    return TableRef(f"frames/{modality}/{extractor_id}", c.frame_feature_contract(modality, dim))


# Results of `merflow check` (tasks.stores.quality): one row per finding, one check_id per run.
FINDINGS = TableRef("findings", c.FINDINGS)
