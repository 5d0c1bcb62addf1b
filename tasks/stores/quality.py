"""Feature-store quality: findings, per-video quality signals and training masks, the feature
tables of a store and the vector statistics the store check (tasks/stores/check.py) is built from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts import tables
from data_contracts.contracts import META_CONTRACT, META_VERSION, feature_contract
from data_contracts.labels import MODALITIES
from data_contracts.store import Store
from data_contracts.tables import NO_VIDEO, TableRef
from tasks.corpus.layout import LABELLED_POOL, UNLABELLED_POOL
from tasks.dag import FEATURE_STAGE, chain

log = logging.getLogger(__name__)

LEVELS = ("error", "warning", "info")
REPORT = "reports/check.md"
# Where a modality's missing row is explained: its own stage, then the stages it reads from.
UPSTREAM = {m: (*reversed(chain(stage)), "probe") for m, stage in FEATURE_STAGE.items()}
PASS_THROUGH = "MissingModalityError"  # "my input is missing": the cause lies upstream
_ROWS = 2048  # rows per block for norms and statistics: bounded temporaries at any table size


# -- findings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One thing the check found: level, code, the table it is about, and the videos involved."""

    level: str
    code: str
    table: str
    message: str
    video_ids: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"finding level {self.level!r} is not one of {', '.join(LEVELS)}")


@dataclass
class Findings:
    """The result of one check: findings, a summary row per feature table, quality signals."""

    check_id: str
    data_root: str
    created_at: datetime
    items: list[Finding]
    tables: list[dict[str, Any]] = field(default_factory=list)
    signals: pd.DataFrame | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def count(self, level: str) -> int:
        """How many findings have `level`."""
        return sum(f.level == level for f in self.items)

    @property
    def has_errors(self) -> bool:
        """Whether any error-level finding exists (the CLI then exits non-zero)."""
        return self.count("error") > 0

    def frame(self) -> pd.DataFrame:
        """The findings as rows of the `findings` table."""
        rows = [
            {
                "check_id": self.check_id,
                "seq": i,
                "level": f.level,
                "code": f.code,
                "table": f.table,
                "message": f.message,
                "video_ids": list(f.video_ids),
                "n_videos": len(f.video_ids),
                "details": json.dumps(f.details, sort_keys=True, default=str),
                "created_at": self.created_at,
            }
            for i, f in enumerate(self.items)
        ]
        return pd.DataFrame(rows, columns=tables.FINDINGS.contract.columns)

    def markdown(self) -> str:
        """The readable report (the CLI's printout, reports/check.md and the Prefect artifact)."""
        n = {lv: self.count(lv) for lv in LEVELS}
        lines = [
            f"# merflow check `{self.check_id}`",
            "",
            f"data root `{self.data_root}` · {self.created_at:%Y-%m-%d %H:%M:%S} UTC · "
            f"**{n['error']} error(s)**, {n['warning']} warning(s), {n['info']} info",
            "",
            "settings: "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items())
            + " (cosines are computed on features centred on their table's mean)",
            "",
            "## Feature tables",
            "",
            "| table | rows | current | dim | contract | newest | NaN | zero | outlying norms | "
            "missing (reason: videos) |",
            "|---|---:|---:|---:|---|---|---:|---:|---:|---|",
        ]
        for t in self.tables:
            missing = ", ".join(f"{k}: {v}" for k, v in t["missing"].items()) or "-"
            lines.append(
                f"| `{t['table']}` | {t['rows']} | {t['current']} | {t['dim']} | {t['contract']} "
                f"| {'yes' if t['newest'] else 'no'} | {t['nan']} | {t['zero']} "
                f"| {t['outliers']} | {missing} |"
            )
        if not self.tables:
            lines.append("| (no feature tables) | | | | | | | | | |")
        for level in LEVELS:
            found = [f for f in self.items if f.level == level and f.code != "table"]
            if not found:
                continue
            title = {"error": "Errors", "warning": "Warnings", "info": "Info"}[level]
            lines += ["", f"## {title}", "", "| code | table | finding | videos |"]
            lines.append("|---|---|---|---|")
            for f in found:
                shown = ", ".join(f.video_ids[:5]) + (
                    f" (+{len(f.video_ids) - 5})" if len(f.video_ids) > 5 else ""
                )
                message = f.message.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {f.code} | `{f.table}` | {message} | {shown or '-'} |")
        if self.signals is not None and len(self.signals):
            lines += ["", "## Quality signals", "", "| signal | videos | min | median | max |"]
            lines.append("|---|---:|---:|---:|---:|")
            for col in SIGNAL_COLUMNS:
                v = self.signals[col].dropna().astype(float)
                if len(v):
                    lines.append(
                        f"| {col} | {len(v)} | {v.min():.3g} | {v.median():.3g} | {v.max():.3g} |"
                    )
        return "\n".join(lines) + "\n"


# -- quality signals ---------------------------------------------------------------------------
SIGNAL_COLUMNS = (
    "face_ratio",
    "face_confidence",
    "speaker_score",
    "speech_ratio",
    "asr_confidence",
    "transcript_chars",
)


def current_manifest(store: Store) -> pd.DataFrame:
    manifest = store.read(tables.MANIFEST, columns=["video_id", "sha256", "pool"])
    return manifest.sort_values("video_id").reset_index(drop=True)


def current_videos(store: Store, feature_tables: Iterable[TableRef]) -> pd.DataFrame:
    """The videos a run on `feature_tables` trains on, sorted by id (video_id, sha256, pool): the
    manifest's current bytes, then the ids the tables hold feature-only (imported without their
    videos, sha256 NO_VIDEO) that the manifest lacks; an id in both is the manifest's. A
    feature-only video has no folder, so its pool is the labels table's say: LABELLED_POOL when
    it has a label, else UNLABELLED_POOL (as training splits them)."""
    manifest = current_manifest(store)
    only: set[str] = set()
    for table in feature_tables:
        if store.exists(table):
            only |= set(
                store.read(table, columns=["video_id"], where={"sha256": [NO_VIDEO]}).video_id
            )
    only -= set(manifest.video_id)  # the manifest's bytes win
    if not only:
        return manifest
    labelled = set(store.read(tables.LABELS, columns=["video_id"]).video_id)
    ids = sorted(only)
    extra = pd.DataFrame(
        {
            "video_id": ids,
            "sha256": NO_VIDEO,
            "pool": [LABELLED_POOL if v in labelled else UNLABELLED_POOL for v in ids],
        }
    )
    videos = pd.concat([manifest, extra], ignore_index=True)
    return videos.sort_values("video_id").reset_index(drop=True)


def _latest_rows(
    store: Store,
    table: TableRef,
    columns: list[str],
    current: pd.DataFrame,
    extractor_id: str | None,
) -> pd.DataFrame:
    # The newest row per video among rows of its current bytes (and of one extractor if given).
    df = store.read(table, columns=["video_id", "sha256", "extractor_id", "created_at", *columns])
    if extractor_id is not None:
        df = df[df.extractor_id == extractor_id]
    df = df.merge(current[["video_id", "sha256"]], on=["video_id", "sha256"])
    df = df.sort_values("created_at").drop_duplicates("video_id", keep="last")
    return df.set_index("video_id")


def quality_signals(
    store: Store,
    faces_extractor_id: str | None = None,
    audio_extractor_id: str | None = None,
    transcripts_extractor_id: str | None = None,
) -> pd.DataFrame:
    """Per manifest video: face-frame fraction, mean detection confidence and the speaking
    face's score, speech ratio, ASR confidence and transcript length (NaN where unknown);
    newest rows unless ids are given."""
    current = current_manifest(store)
    faces = _latest_rows(
        store, tables.FACES, ["face_ratio", "mean_confidence", "backend", "select_score"],
        current, faces_extractor_id,
    )  # fmt: skip
    audio = _latest_rows(store, tables.AUDIO, ["speech_ratio"], current, audio_extractor_id)
    text = _latest_rows(
        store, tables.TRANSCRIPTS, ["source", "confidence", "n_chars"], current,
        transcripts_extractor_id,
    )  # fmt: skip
    ids = current.video_id
    out = current.copy()
    out["face_ratio"] = ids.map(faces.face_ratio).astype("float64")
    # Scales differ by backend (dlib HOG score, OpenCV level weight, OpenFace [0, 1]).
    out["face_confidence"] = ids.map(faces.mean_confidence).astype("float64")
    out["face_backend"] = ids.map(faces.backend)
    # faces.select=speaking: how well the kept track's mouth follows the speech (r); NaN for
    # `largest`, an unscored fallback, or a row written before the faces table recorded it.
    out["speaker_score"] = ids.map(faces.select_score).astype("float64")
    out["speech_ratio"] = ids.map(audio.speech_ratio).astype("float64")
    out["transcript_source"] = ids.map(text.source)
    out["asr_confidence"] = ids.map(text.confidence).astype("float64")
    out["transcript_chars"] = ids.map(text.n_chars).astype("float64")
    return out


def quality_thresholds(ts: Any) -> dict[str, float | int | None]:
    """A run's quality filters (train.quality_min_*) as quality_mask's keyword arguments; all
    None when the run has none."""
    return {
        "min_face_ratio": ts.quality_min_face_ratio,
        "min_face_confidence": ts.quality_min_face_confidence,
        "min_speech_ratio": ts.quality_min_speech_ratio,
        "min_asr_confidence": ts.quality_min_asr_confidence,
        "min_transcript_chars": ts.quality_min_transcript_chars,
    }


def quality_mask(
    store: Store,
    video_ids: list[str] | np.ndarray,
    min_face_ratio: float | None = None,
    min_speech_ratio: float | None = None,
    min_face_confidence: float | None = None,
    min_asr_confidence: float | None = None,
    min_transcript_chars: int | None = None,
    signals: pd.DataFrame | None = None,
) -> dict[str, np.ndarray]:
    """Per modality, a bool array over `video_ids`: False masks that modality of a low-quality
    video (AND it with the feature set's `present`). Unknown signals and None thresholds keep."""
    s = quality_signals(store) if signals is None else signals
    s = s.drop_duplicates("video_id", keep="last").set_index("video_id")
    ids = pd.Index(np.asarray(video_ids).astype(str))
    n = len(ids)

    def below(column: str, threshold: float | None, where: np.ndarray | None = None) -> np.ndarray:
        if threshold is None:
            return np.zeros(n, dtype=bool)
        v = s[column].reindex(ids).to_numpy(dtype=float, na_value=np.nan)
        low = np.nan_to_num(v, nan=np.inf) < threshold  # unknown never masks
        return low if where is None else low & where

    asr = (s["transcript_source"].reindex(ids) == "asr").to_numpy(dtype=bool, na_value=False)
    return {
        "visual": ~(
            below("face_ratio", min_face_ratio) | below("face_confidence", min_face_confidence)
        ),
        "acoustic": ~below("speech_ratio", min_speech_ratio),
        # Official transcripts are not judged by ASR confidence; only ASR output is.
        "text": ~(
            below("asr_confidence", min_asr_confidence, asr)
            | below("transcript_chars", min_transcript_chars)
        ),
    }


# -- folds and tables --------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureTable:
    """One feature table found on disk."""

    modality: str
    extractor_id: str
    dim: int
    version: str

    @property
    def ref(self) -> TableRef:
        """The table reference the store reads it with."""
        return tables.features(self.modality, self.extractor_id, self.dim)


def find_feature_tables(store: Store) -> tuple[list[FeatureTable], list[Finding]]:
    """Every feature table under the store, and error findings for those this code cannot read."""
    found, problems = [], []
    for name in store.list_tables("features", 2):
        _, modality, extractor_id = name.split("/")
        try:
            schemas = store.part_schemas(name)
            metas = [schema.metadata or {} for schema in schemas]
        except (OSError, pa.ArrowInvalid) as e:
            problems.append(Finding("error", "unreadable-table", name, f"unreadable part: {e}"))
            continue
        declared = {
            (m.get(META_CONTRACT, b"").decode(), m.get(META_VERSION, b"").decode(),
             m.get(b"merflow.dim", b"").decode())
            for m in metas
        }  # fmt: skip
        dims = {d for _, _, d in declared}
        if modality not in MODALITIES or len(dims) != 1 or not next(iter(dims)).isdigit():
            problems.append(
                Finding(
                    "error", "unreadable-table", name,
                    f"{len(metas)} part file(s) declare {sorted(declared)}: not one feature table "
                    f"of a known modality ({', '.join(MODALITIES)}) and one dimension; move the "
                    f"folder aside and re-extract",
                )
            )  # fmt: skip
            continue
        contract = feature_contract(modality, int(next(iter(dims))))
        if any(n != contract.name or v not in contract.versions for n, v, _ in declared):
            problems.append(
                Finding(
                    "error", "contract-mismatch", name,
                    f"part files declare {sorted(declared)} but this merflow reads "
                    f"{contract.name} version {', '.join(contract.versions)}; re-extract the "
                    f"table or use the merflow version that wrote it",
                )
            )  # fmt: skip
            continue
        found.append(FeatureTable(modality, extractor_id, int(next(iter(dims))), contract.version))
    return found, problems


def read_features(store: Store, ft: FeatureTable) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    # Keys, a float32 (N, dim) matrix and a non-null mask; a null vector (written by a broken
    # tool) reads as a row of NaN rather than failing the read.
    t = store.read_arrow(ft.ref, columns=["video_id", "sha256", "created_at", "embedding"])
    keys = t.select(["video_id", "sha256", "created_at"]).to_pandas()
    if t.num_rows == 0:
        return keys, np.zeros((0, ft.dim), np.float32), np.zeros(0, bool)
    col = t.column("embedding").combine_chunks()
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    values = col.values.slice(col.offset * ft.dim, len(col) * ft.dim)
    x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, ft.dim)
    if not valid.all():
        x = x.copy()  # Arrow's buffer is read-only
        x[~valid] = np.nan
    return keys, x, valid


def norms_and_finite(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.full(len(x), np.nan)
    finite = np.zeros(len(x), dtype=bool)
    for s in range(0, len(x), _ROWS):
        b = x[s : s + _ROWS].astype(np.float64)
        finite[s : s + _ROWS] = np.isfinite(b).all(axis=1)
        norms[s : s + _ROWS] = np.sqrt(np.einsum("ij,ij->i", b, b))
    return norms, finite


def mean_std(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Float64 sums over blocks: exact enough at 115k rows, and no float64 copy of the matrix.
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for s in range(0, len(rows), _ROWS):
        b = x[rows[s : s + _ROWS]].astype(np.float64)
        total += b.sum(axis=0)
        squares += (b * b).sum(axis=0)
    n = max(len(rows), 1)
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0))


def near_duplicate_pairs(
    x: np.ndarray,
    rows_a: np.ndarray,
    rows_b: np.ndarray | None = None,
    threshold: float = 0.99,
    block: int = 4096,
    center: np.ndarray | None = None,
    max_pairs: int = 100_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Row pairs of `x` with cosine > threshold: (i in rows_a, j in rows_b), or i < j within rows_a
    when rows_b is None. Block by block (block x block products), never an N x N matrix.

    Returns the first `max_pairs` pairs as (i, j, cosine) and the total number found.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"cosine threshold must be in (0, 1], got {threshold}")
    within = rows_b is None
    rows_b = rows_a if rows_b is None else rows_b
    x = np.asarray(x, dtype=np.float32)
    shift = None if center is None else np.asarray(center, dtype=np.float32)
    # Buffers reused across blocks: fresh 100 MB arrays per block cost more in page faults than
    # the normalisation itself.
    buf_a = np.empty((min(block, len(rows_a)), x.shape[1]), np.float32)
    buf_b = np.empty((min(block, len(rows_b)), x.shape[1]), np.float32)
    buf_sim = np.empty(len(buf_a) * len(buf_b), np.float32)

    def unit(rows: np.ndarray, buf: np.ndarray) -> np.ndarray:
        v = buf[: len(rows)]
        np.take(x, rows, axis=0, out=v)  # a copy: centring never touches `x`
        if shift is not None:
            v -= shift
        norm = np.sqrt(np.einsum("ij,ij->i", v, v))
        v *= np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)[:, None]
        return v

    found_i, found_j, found_c, total, kept = [], [], [], 0, 0
    for s in range(0, len(rows_a), block):
        a = unit(rows_a[s : s + block], buf_a)
        for t in range(s if within else 0, len(rows_b), block):
            diagonal = within and t == s
            b = a if diagonal else unit(rows_b[t : t + block], buf_b)
            sim = buf_sim[: len(a) * len(b)].reshape(len(a), len(b))
            np.matmul(a, b.T, out=sim)  # (block_a, block_b) cosines
            ii, jj = np.nonzero(sim > threshold)
            if diagonal:  # each pair once, never a row with itself
                ii, jj = ii[ii < jj], jj[ii < jj]
            total += len(ii)
            take = max(0, min(len(ii), max_pairs - kept))
            if take:
                found_i.append(rows_a[s + ii[:take]])
                found_j.append(rows_b[t + jj[:take]])
                found_c.append(sim[ii[:take], jj[:take]])
                kept += take
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, np.float32), total
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_c), total


def _table_time(store: Store, ft: FeatureTable) -> pd.Timestamp:
    t = store.read_arrow(ft.ref, columns=["created_at"]).column("created_at")
    latest = pc.max(t).as_py() if len(t) else None
    return pd.Timestamp(latest) if latest is not None else pd.Timestamp(0, tz="UTC")


def newest_first(store: Store, found: list[FeatureTable]) -> dict[str, list[FeatureTable]]:
    """The feature tables of each modality, the most recently written first."""
    by_modality: dict[str, list[FeatureTable]] = {}
    for ft in sorted(found, key=lambda t: (_table_time(store, t), t.extractor_id), reverse=True):
        by_modality.setdefault(ft.modality, []).append(ft)
    return by_modality


def named_feature_tables(store: Store, named: dict[str, str]) -> dict[str, TableRef]:
    """The stored table of each modality `named` gives an extractor id for (the setting
    train.feature_tables); a modality whose table the stores lack is left out."""
    if not named:
        return {}
    found = {(t.modality, t.extractor_id): t.ref for t in find_feature_tables(store)[0]}
    return {m: found[(m, named[m])] for m in MODALITIES if (m, named.get(m)) in found}


def newest_feature_tables(store: Store) -> dict[str, TableRef]:
    """The most recently written feature table of each modality that has one."""
    found, _ = find_feature_tables(store)
    return {m: fts[0].ref for m, fts in newest_first(store, found).items()}


def stored_table_choice(store: Store, modalities: Iterable[str]) -> dict[str, tuple[TableRef, str]]:
    """For each of `modalities` the stores hold a feature table of: that table when it is the
    only one, else the most recently written, with a note saying which it is (training's
    fallback when the extraction plan's table is absent, e.g. a features-only store)."""
    found, _ = find_feature_tables(store)
    wanted = set(modalities)
    chosen = {}
    for m, fts in newest_first(store, [t for t in found if t.modality in wanted]).items():
        if len(fts) == 1:
            note = f"the only stored {m} table"
        else:
            others = ", ".join(t.extractor_id for t in fts[1:])
            note = f"the newest of {len(fts)} stored {m} tables (also {others})"
        chosen[m] = (fts[0].ref, note)
    return chosen
