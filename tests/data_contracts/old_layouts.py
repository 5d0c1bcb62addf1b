"""Tables as older merflow versions wrote them, for the tests of reading old data roots."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pandas as pd

from data_contracts import contracts as c
from data_contracts.tables import TableRef

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ADDED = dict(c.FACES.older)["1"]
# The faces contract as merflow declared it before version 2: what old data roots hold.
FACES_V1 = TableRef(
    "faces",
    replace(
        c.FACES,
        version="1",
        fields=tuple(f for f in c.FACES.fields if f.name not in ADDED),
        older=(),
    ),
)


def v1_rows(ids: list[str], n_faces: int = 8, shas: list[str] | None = None) -> pd.DataFrame:
    """Faces rows of version 1's columns (`shas`: the videos' sha256, else made up)."""
    return pd.DataFrame(
        {
            "video_id": ids, "sha256": shas or [f"{v:0>64}" for v in ids],
            "extractor_id": "faces-x", "path": [f"{v}.npz" for v in ids], "backend": "dlib",
            "n_frames_decoded": 10, "n_frames_sampled": 10, "n_faces": n_faces,
            "face_ratio": n_faces / 10,
            "mean_confidence": 1.5, "crop_size": 112, "created_at": NOW,
        }
    )  # fmt: skip


def v2_rows(
    ids: list[str], score: float | None = 0.7, shas: list[str] | None = None
) -> pd.DataFrame:
    """Faces rows of the current version: a speaking track chosen with r = `score`."""
    return v1_rows(ids, 6, shas).assign(
        any_face_ratio=0.9, n_faces_all=15, n_tracks=2, select_rule="speaking", chosen_track=1,
        select_score=score, select_reason="speaking: track 1's mouth follows the speech",
    )  # fmt: skip
