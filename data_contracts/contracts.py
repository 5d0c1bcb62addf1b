"""Declared Arrow schemas of every merflow table, and lazy row-rule validation.

A contract is declared once: its name and version travel in each Parquet file's schema
metadata, so a file describes itself and a reader refuses a file of another contract or of a
version it does not know.

Versions. A change that only adds nullable columns bumps the version and lists the old version
in `older` with the columns added since: files of that version stay readable, their rows read
with those columns null ("not recorded"), and the store rewrites them in the current layout
when it merges parts (data_contracts.compaction). Any other change (a removed, renamed or
retyped column, a new key) bumps the version without `older`: old files are refused with a
message that says to re-run the step that writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.labels import CLASSES, MODALITIES

META_CONTRACT = b"merflow.contract"
META_VERSION = b"merflow.contract_version"
META_KEY = b"merflow.key"
META_LABELS = b"merflow.labels"
META_VECTORS = b"merflow.vectors"

TIMESTAMP = pa.timestamp("us", tz="UTC")


class ContractViolation(ValueError):
    """Rows break a table's contract; `problems` lists every problem found, not just the first."""

    def __init__(self, table: str, problems: list[str]):
        self.table = table
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} problem(s) in rows for table {table!r}; "
            f"nothing was written:\n{listing}"
        )


class ContractMismatch(ValueError):
    """A stored file was written under a different contract or version than this code reads."""


@dataclass(frozen=True)
class Contract:
    """A table's schema, key and row rules."""

    name: str
    version: str
    fields: tuple[pa.Field, ...]
    key: tuple[str, ...]
    label_columns: tuple[str, ...] = ()
    vector_dims: tuple[tuple[str, int], ...] = ()
    extra_metadata: tuple[tuple[str, str], ...] = field(default=())
    # Older versions still read: (version, the columns added since it, null in its rows).
    older: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        by_name = {f.name: f for f in self.fields}
        for version, added in self.older:
            bad = [c for c in added if c not in by_name or not by_name[c].nullable or c in self.key]
            if version == self.version or bad:
                raise ValueError(
                    f"contract {self.name!r} v{self.version} cannot read v{version} files by "
                    f"filling {bad or list(added)} with nulls: only nullable non-key columns of "
                    f"this contract can be added; bump the version without `older` instead"
                )

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions whose files this contract reads: its own, then the older ones."""
        return (self.version, *(v for v, _ in self.older))

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema with the contract's self-description in its metadata."""
        meta = {
            META_CONTRACT: self.name.encode(),
            META_VERSION: self.version.encode(),
            META_KEY: json.dumps(list(self.key)).encode(),
        }
        if self.label_columns:
            meta[META_LABELS] = json.dumps(list(CLASSES)).encode()
        if self.vector_dims:
            meta[META_VECTORS] = json.dumps(dict(self.vector_dims)).encode()
        for k, v in self.extra_metadata:
            meta[f"merflow.{k}".encode()] = v.encode()
        return pa.schema(list(self.fields), metadata=meta)

    @property
    def columns(self) -> list[str]:
        """Column names in schema order."""
        return [f.name for f in self.fields]

    def to_arrow(self, df: pd.DataFrame) -> pa.Table:
        """Validate rows against every rule and return them as an Arrow table of this schema.

        Raises ContractViolation listing every problem at once (pandera-style lazy validation).
        """
        problems: list[str] = []
        missing = [c for c in self.columns if c not in df.columns]
        extra = [c for c in df.columns if c not in self.columns]
        if missing:
            problems.append(f"missing columns: {', '.join(missing)}")
        if extra:
            problems.append(f"columns not in the contract: {', '.join(map(str, extra))}")
        if problems:
            raise ContractViolation(self.name, problems)
        df = df.reset_index(drop=True)
        for col in self.key:
            nulls = df[col].isna() | (df[col].astype(str) == "")
            if col == "extractor_id" or col == "stage":
                nulls = df[col].isna()  # "" is a legal "not applicable" value for these
            if nulls.any():
                problems.append(f"key column {col!r} is null/empty in rows {_rows(nulls)}")
        dup = df.duplicated(subset=list(self.key), keep=False)
        if dup.any():
            examples = df.loc[dup, list(self.key)].drop_duplicates().head(5).to_dict("records")
            problems.append(f"duplicate keys {tuple(self.key)} in rows {_rows(dup)}: {examples}")
        for col in self.label_columns:
            vals = df[col]
            bad = vals.notna() & ~vals.isin(CLASSES)
            if bad.any():
                shown = sorted(set(map(str, vals[bad])))[:5]
                problems.append(
                    f"column {col!r} has unknown labels {shown} in rows {_rows(bad)}; "
                    f"valid labels are {', '.join(CLASSES)}"
                )
        vectors = dict(self.vector_dims)
        for col, dim in vectors.items():
            problems.extend(_check_vectors(df[col], col, dim, self._nullable(col)))
        for f in self.fields:
            if not f.nullable and f.name not in self.key and f.name not in vectors:
                nulls = df[f.name].isna()
                if nulls.any():
                    problems.append(f"column {f.name!r} may not be null (rows {_rows(nulls)})")
        if problems:
            raise ContractViolation(self.name, problems)
        arrays = []
        for f in self.fields:
            col = df[f.name]
            try:
                if f.name in vectors:
                    arrays.append(_vector_array(col, vectors[f.name]))
                else:
                    arrays.append(pa.array(_py(col), type=f.type, from_pandas=True))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
                problems.append(f"column {f.name!r} cannot be stored as {f.type}: {e}")
        if problems:
            raise ContractViolation(self.name, problems)
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _nullable(self, col: str) -> bool:
        return next(f for f in self.fields if f.name == col).nullable

    def check_schema(self, schema: pa.Schema, where: str) -> tuple[str, ...]:
        """The columns a stored file of `schema` lacks (those added since its version; none for
        the current one); refuse a file of another contract or of an unknown version."""
        meta = schema.metadata or {}
        name = meta.get(META_CONTRACT, b"").decode()
        version = meta.get(META_VERSION, b"").decode()
        added = dict(self.older).get(version, ()) if name == self.name else None
        if name != self.name or (version != self.version and not added):
            raise ContractMismatch(
                f"{where} declares contract {name or '<none>'!r} version {version or '<none>'!r}, "
                f"but this merflow reads {self.name!r} version "
                f"{', '.join(map(repr, self.versions))}; re-run the step that writes it (its old "
                f"files can be moved aside) or use the merflow version that wrote it"
            )
        lacking = [c for c in self.columns if c not in schema.names and c not in added]
        if lacking:
            raise ContractMismatch(
                f"{where} declares {self.name!r} version {version!r} but lacks its columns "
                f"{lacking}; the file is damaged or was written by another tool: move it aside "
                f"and re-run the step that writes it"
            )
        return tuple(c for c in added if c not in schema.names)

    def conform(
        self, t: pa.Table, schema: pa.Schema, where: str, columns: list[str] | None = None
    ) -> pa.Table:
        """Rows read from a stored file of `schema` (with the `columns` it has; None: all) in
        this version's layout: the columns added since the file's version are null."""
        missing = self.check_schema(schema, where)
        if not missing:
            return t
        wanted = self.columns if columns is None else columns
        fields = {f.name: f for f in self.fields}
        arrays = [
            pa.nulls(t.num_rows, fields[c].type) if c in missing else t.column(c) for c in wanted
        ]
        return pa.Table.from_arrays(arrays, schema=pa.schema([fields[c] for c in wanted]))


def _rows(mask: pd.Series) -> str:
    idx = list(np.flatnonzero(mask.to_numpy()))
    shown = ", ".join(map(str, idx[:10]))
    return shown + (f" (+{len(idx) - 10} more)" if len(idx) > 10 else "")


def _py(col: pd.Series) -> list:
    # pandas NA/NaT -> None so Arrow sees nulls; keeps numpy scalars as they are.
    return [None if _isna(v) else v for v in col.tolist()]


def _isna(v: object) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _check_vectors(col: pd.Series, name: str, dim: int, nullable: bool) -> list[str]:
    problems: list[str] = []
    wrong_dim, non_finite, nulls = [], [], []
    for i, v in enumerate(col.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            nulls.append(i)
            continue
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim != 1 or arr.shape[0] != dim:
            wrong_dim.append((i, arr.shape))
        elif not np.isfinite(arr).all():
            non_finite.append(i)
    if nulls and not nullable:
        problems.append(f"vector column {name!r} is null in rows {nulls[:10]}")
    if wrong_dim:
        shown = ", ".join(f"row {i} has shape {s}" for i, s in wrong_dim[:5])
        problems.append(f"vector column {name!r} must have dimension {dim}: {shown}")
    if non_finite:
        problems.append(f"vector column {name!r} has NaN/inf values in rows {non_finite[:10]}")
    return problems


def _vector_array(col: pd.Series, dim: int) -> pa.Array:
    values = col.tolist()
    mask = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values])
    flat = np.zeros((len(values), dim), dtype=np.float32)
    for i, v in enumerate(values):
        if not mask[i]:
            flat[i] = np.asarray(v, dtype=np.float32)
    storage = pa.array(flat.reshape(-1), type=pa.float32())
    arr = pa.FixedSizeListArray.from_arrays(storage, dim)
    if mask.any():
        arr = pa.FixedSizeListArray.from_arrays(storage, dim, mask=pa.array(mask))
    return arr


def vector_type(dim: int) -> pa.DataType:
    """Fixed-size list of float32 with the dimension in the type."""
    return pa.list_(pa.float32(), dim)


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_ID = (_f("video_id", pa.string()), _f("sha256", pa.string()))
_EXT = _f("extractor_id", pa.string())
_CREATED = _f("created_at", TIMESTAMP)

MANIFEST = Contract(
    name="manifest",
    version="1",
    fields=(
        *_ID,
        _f("path", pa.string()),
        _f("source_dir", pa.string()),
        _f("pool", pa.string()),
        _f("size", pa.int64()),
        _f("mtime_ns", pa.int64()),
        _f("duration", pa.float64(), True),
        _f("fps", pa.float64(), True),
        _f("n_frames", pa.int64(), True),
        _f("width", pa.int32(), True),
        _f("height", pa.int32(), True),
        _f("has_video", pa.bool_()),
        _f("has_audio", pa.bool_()),
        _f("audio_sample_rate", pa.int32(), True),
        _f("probe_error", pa.string(), True),
        _f("scanned_at", TIMESTAMP),
    ),
    key=("video_id",),
)

AUDIO = Contract(
    name="audio",
    version="1",
    fields=(
        *_ID,
        _EXT,
        _f("path", pa.string()),
        _f("sample_rate", pa.int32()),
        _f("n_samples", pa.int64()),
        _f("duration", pa.float64()),
        _f("speech_ratio", pa.float32(), True),
        _CREATED,
    ),
    key=("video_id", "sha256", "extractor_id"),
)

# Version 2 records the faces not chosen and the choice (docs/faces.md); version 1 rows read
# them as null.
_FACES_SELECTION = (
    "any_face_ratio",
    "n_faces_all",
    "n_tracks",
    "select_rule",
    "chosen_track",
    "select_score",
    "select_reason",
)
FACES = Contract(
    name="faces",
    version="2",
    fields=(
        *_ID,
        _EXT,
        _f("path", pa.string()),
        _f("backend", pa.string()),
        _f("n_frames_decoded", pa.int32()),
        _f("n_frames_sampled", pa.int32()),
        _f("n_faces", pa.int32()),  # chosen faces: the crops the visual features see
        _f("face_ratio", pa.float32()),  # share of sampled frames with a chosen face
        _f("mean_confidence", pa.float32(), True),
        _f("crop_size", pa.int32()),
        _f("any_face_ratio", pa.float32(), True),  # share of sampled frames with any face
        _f("n_faces_all", pa.int32(), True),  # every face found, chosen or not
        _f("n_tracks", pa.int32(), True),
        _f("select_rule", pa.string(), True),  # faces.select: largest or speaking
        _f("chosen_track", pa.int32(), True),  # largest: the track most chosen faces are from
        _f("select_score", pa.float32(), True),  # the chosen track's speaking r; null: not scored
        _f("select_reason", pa.string(), True),
        _CREATED,
    ),
    key=("video_id", "sha256", "extractor_id"),
    older=(("1", _FACES_SELECTION),),
)

TRANSCRIPTS = Contract(
    name="transcripts",
    version="1",
    fields=(
        *_ID,
        _EXT,
        _f("text", pa.string()),
        _f("source", pa.string()),  # "official" (label-transcription.csv) or "asr"
        _f("confidence", pa.float32(), True),
        _f("n_chars", pa.int32()),
        _CREATED,
    ),
    key=("video_id", "sha256", "extractor_id"),
)

LABELS = Contract(
    name="labels",
    version="1",
    fields=(
        _f("video_id", pa.string()),
        _f("label", pa.string()),
        _f("source", pa.string()),  # the CSV it came from
    ),
    key=("video_id",),
    label_columns=("label",),
)

PSEUDO_LABELS = Contract(
    name="pseudo_labels",
    version="1",
    fields=(
        _f("video_id", pa.string()),
        _f("run_id", pa.string()),
        _f("label", pa.string()),
        _f("confidence", pa.float32()),
        _f("preferred_model", pa.string()),
        _CREATED,
    ),
    key=("video_id", "run_id"),
    label_columns=("label",),
)

FAILURES = Contract(
    name="failures",
    version="1",
    fields=(
        *_ID,
        _f("stage", pa.string()),
        _EXT,
        _f("error_type", pa.string()),
        _f("message", pa.string()),
        _f("attempt", pa.int32()),
        _f("timestamp", TIMESTAMP),
    ),
    key=("video_id", "sha256", "stage", "extractor_id"),
)

_PROB_COLUMNS = ("prob_A", "prob_V", "prob_T", "prob_F", "prob_voted")
PREDICTIONS = Contract(
    name="predictions",
    version="1",
    fields=(
        _f("video_id", pa.string()),
        _f("run_id", pa.string()),
        _f("split", pa.string()),  # "cv" (out-of-fold), "unlabeled" or "predict" (tasks/predict.py)
        _f("fold", pa.int32()),  # -1: averaged over the fold models
        *(_f(c, vector_type(len(CLASSES)), c != "prob_voted") for c in _PROB_COLUMNS),
        _f("predicted", pa.string()),
        _f("label", pa.string(), True),  # ground truth where known
    ),
    key=("video_id", "run_id", "split"),
    label_columns=("predicted", "label"),
    vector_dims=tuple((c, len(CLASSES)) for c in _PROB_COLUMNS),
)

FEATURES_VERSION = "1"


def feature_contract(modality: str, dim: int) -> Contract:
    """The contract of one modality's utterance-level feature table of dimension `dim`."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if dim <= 0:
        raise ValueError(f"feature dimension must be positive, got {dim}")
    return Contract(
        name=f"features_{modality}",
        version=FEATURES_VERSION,
        fields=(
            *_ID,
            _EXT,
            _f("embedding", vector_type(dim)),
            _f("n_items", pa.int32()),  # frames, audio chunks or tokens pooled into the vector
            _f("provenance", pa.string(), True),  # JSON: model, revision, layers, pooling, upstream
            _CREATED,
        ),
        key=("video_id", "sha256", "extractor_id"),
        vector_dims=(("embedding", dim),),
        extra_metadata=(("modality", modality), ("dim", str(dim))),
    )


# Modalities with a frame-level table: CLIP per face crop, HuBERT frames pooled to a fixed rate.
FRAME_MODALITIES = ("visual", "acoustic")


def frame_feature_contract(modality: str, dim: int) -> Contract:
    """The contract of one modality's frame-level feature table: a row per face crop (visual)
    or per fixed-rate window of HuBERT frames (acoustic), beside the utterance table."""
    if modality not in FRAME_MODALITIES:
        raise ValueError(
            f"no frame-level features for {modality!r}; valid: {', '.join(FRAME_MODALITIES)}"
        )
    if dim <= 0:
        raise ValueError(f"feature dimension must be positive, got {dim}")
    return Contract(
        name=f"frames_{modality}",
        version=FEATURES_VERSION,
        fields=(
            *_ID,
            _EXT,
            _f("frame", pa.int32()),  # position in the video's sequence, from 0
            _f("start_s", pa.float32(), True),  # where it starts in the video; null: no frame rate
            _f("embedding", vector_type(dim)),
            # model frames pooled into the row: 1 per face crop, the window's HuBERT frames
            _f("n_items", pa.int32()),
            _CREATED,
        ),
        key=("video_id", "sha256", "extractor_id", "frame"),
        vector_dims=(("embedding", dim),),
        extra_metadata=(("modality", modality), ("dim", str(dim)), ("level", "frame")),
    )


FINDINGS = Contract(
    name="findings",
    version="1",
    fields=(
        _f("check_id", pa.string()),  # one run of `merflow check`
        _f("seq", pa.int32()),  # the finding's position in that run's report
        _f("level", pa.string()),  # error, warning or info
        _f("code", pa.string()),  # e.g. nan-vectors, duplicate-content-across-pools, drift
        _f("table", pa.string()),  # the store table it is about (features/<modality>/<id>, ...)
        _f("message", pa.string()),
        _f("video_ids", pa.list_(pa.string())),
        _f("n_videos", pa.int32()),
        _f("details", pa.string(), True),  # JSON: the figures behind the finding
        _CREATED,
    ),
    key=("check_id", "seq"),
)
