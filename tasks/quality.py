"""Feature-store quality: per-video quality signals, training masks, and the store check.

`check_stores` reads every feature table and reports findings: per table, rows, missing
modalities by reason, NaN / all-zero / outlying-norm vectors, dimension and contract version;
leakage (the same bytes, or features with cosine > 0.99, across the labelled and unlabelled
pools or across CV folds); drift between a modality's newest table and the one before it.
Findings go to the `findings` table and to `<data_root>/reports/check.md`.
"""

from __future__ import annotations

import json
import logging
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts import tables
from data_contracts.contracts import META_CONTRACT, META_VERSION, feature_contract
from data_contracts.labels import CLASS_INDEX, MODALITIES
from data_contracts.store import Store
from data_contracts.tables import TableRef
from tasks.errors import BadInputError

log = logging.getLogger(__name__)

LEVELS = ("error", "warning", "info")
LABELLED_POOL = "labeled"
REPORT = "reports/check.md"
# Where a modality's missing row is explained: its own stage, then the stages it reads from.
UPSTREAM = {
    "visual": ("visual", "faces", "probe"),
    "acoustic": ("acoustic", "audio", "probe"),
    "text": ("text", "transcribe", "audio", "probe"),
}
_PASS_THROUGH = "MissingModalityError"  # "my input is missing": the cause lies upstream
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
    "speech_ratio",
    "asr_confidence",
    "transcript_chars",
)


def _current(store: Store) -> pd.DataFrame:
    manifest = store.read(tables.MANIFEST, columns=["video_id", "sha256", "pool"])
    return manifest.sort_values("video_id").reset_index(drop=True)


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
    """Per manifest video: face-frame fraction and mean detection confidence, speech ratio, ASR
    confidence and transcript length (NaN where unknown); newest rows unless ids are given."""
    current = _current(store)
    faces = _latest_rows(
        store, tables.FACES, ["face_ratio", "mean_confidence", "backend"], current,
        faces_extractor_id,
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
    out["speech_ratio"] = ids.map(audio.speech_ratio).astype("float64")
    out["transcript_source"] = ids.map(text.source)
    out["asr_confidence"] = ids.map(text.confidence).astype("float64")
    out["transcript_chars"] = ids.map(text.n_chars).astype("float64")
    return out


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
def cv_folds(store: Store, n_splits: int, seed: int) -> dict[str, int]:
    """The fold of each labelled video, as the train flow assigns them: StratifiedKFold(n_splits,
    shuffle=True, random_state=seed) over the labelled manifest videos sorted by video_id."""
    from sklearn.model_selection import StratifiedKFold

    labels = store.read(tables.LABELS)
    manifest_ids = set(store.read(tables.MANIFEST, columns=["video_id"]).video_id)
    labels = labels[labels.video_id.isin(manifest_ids)].sort_values("video_id")
    if len(labels) < n_splits:
        raise ValueError(
            f"{len(labels)} labelled videos cannot make {n_splits} folds; label more videos or "
            f"pass a smaller n_splits"
        )
    y = labels.label.map(CLASS_INDEX).to_numpy()
    kfold = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on small sets
        for k, (_, test) in enumerate(kfold.split(np.zeros(len(y)), y)):
            fold[test] = k
    return dict(zip(labels.video_id, fold.tolist(), strict=True))


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
        if declared != {(contract.name, contract.version, str(int(next(iter(dims)))))}:
            problems.append(
                Finding(
                    "error", "contract-mismatch", name,
                    f"part files declare {sorted(declared)} but this merflow reads "
                    f"{contract.name} version {contract.version}; re-extract the table or use the "
                    f"merflow version that wrote it",
                )
            )  # fmt: skip
            continue
        found.append(FeatureTable(modality, extractor_id, int(next(iter(dims))), contract.version))
    return found, problems


def _read_features(store: Store, ft: FeatureTable) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
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


def _norms_and_finite(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.full(len(x), np.nan)
    finite = np.zeros(len(x), dtype=bool)
    for s in range(0, len(x), _ROWS):
        b = x[s : s + _ROWS].astype(np.float64)
        finite[s : s + _ROWS] = np.isfinite(b).all(axis=1)
        norms[s : s + _ROWS] = np.sqrt(np.einsum("ij,ij->i", b, b))
    return norms, finite


def _mean_std(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


# -- the check ---------------------------------------------------------------------------------
@dataclass
class _Context:
    current: pd.DataFrame  # manifest video_id, sha256, pool
    folds: dict[str, int]
    failures: pd.DataFrame
    cosine: float
    norm_z: float
    block: int


def _ids(values: Any) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in values}))


def _content_duplicates(ctx: _Context) -> list[Finding]:
    """The same bytes (SHA-256) under several video ids: across pools or folds, it is leakage."""
    out = []
    m = ctx.current
    for sha, group in m[m.sha256.duplicated(keep=False)].groupby("sha256"):
        ids = _ids(group.video_id)
        pools = sorted(set(group.pool))
        folds = {ctx.folds[v] for v in ids if v in ctx.folds}
        detail = {"sha256": sha, "pools": pools, "folds": sorted(folds)}
        if LABELLED_POOL in pools and len(pools) > 1:
            code, level, why = "duplicate-content-across-pools", "error", f"pools {pools}"
        elif len(folds) > 1:
            code, level, why = "duplicate-content-across-folds", "error", f"CV folds {folds}"
        else:
            code, level, why = "duplicate-content", "warning", f"pool {pools[0]}"
        out.append(
            Finding(
                level, code, tables.MANIFEST.name,
                f"identical bytes (sha256 {sha[:12]}) under {len(ids)} names in {why}; remove the "
                f"copies or keep them in one pool and one fold",
                ids, detail,
            )
        )  # fmt: skip
    return out


def _missing(ft: FeatureTable, held: set[tuple], ctx: _Context) -> tuple[dict, list[Finding]]:
    """Videos of the manifest that lack a row in this table, grouped by the recorded reason."""
    stage, *upstream = UPSTREAM[ft.modality]
    f = ctx.failures
    own = f[(f.stage == stage) & (f.extractor_id == ft.extractor_id)]
    own = {(r.video_id, r.sha256): r for r in own.itertuples(index=False)}
    up = f[f.stage.isin(upstream)]
    up = {(r.video_id, r.sha256, r.stage): r for r in up.itertuples(index=False)}
    reasons: dict[str, list[str]] = {}
    examples: dict[str, str] = {}
    for key in zip(ctx.current.video_id, ctx.current.sha256, strict=True):
        if key in held:
            continue
        row = own.get(key)
        if row is None or row.error_type == _PASS_THROUGH:
            cause = next((up[(*key, s)] for s in upstream if (*key, s) in up), None)
            row = cause if cause is not None else row
        reason = "not extracted" if row is None else f"{row.stage}: {row.error_type}"
        reasons.setdefault(reason, []).append(key[0])
        examples.setdefault(reason, "" if row is None else row.message)
    findings = []
    for reason, ids in sorted(reasons.items()):
        if reason == "not extracted":
            msg = (
                f"{len(ids)} manifest video(s) have neither a {ft.modality} row nor a recorded "
                f"failure under this extractor; run the extraction (it computes only these)"
            )
            findings.append(Finding("warning", "not-extracted", ft.ref.name, msg, _ids(ids)))
        else:
            msg = f"{len(ids)} video(s) lack {ft.modality} features ({reason}): {examples[reason]}"
            findings.append(
                Finding("info", "missing-modality", ft.ref.name, msg[:500], _ids(ids),
                        {"reason": reason})
            )  # fmt: skip
    return {k: len(v) for k, v in sorted(reasons.items())}, findings


def _leakage(
    ft: FeatureTable, keys: pd.DataFrame, x: np.ndarray, use: np.ndarray, mean: np.ndarray,
    ctx: _Context,
) -> list[Finding]:  # fmt: skip
    """Near-duplicate features (centred cosine) across the pools and across CV folds."""
    rows = np.flatnonzero(use)
    vid = keys.video_id.to_numpy().astype(str)
    sha = keys.sha256.to_numpy().astype(str)
    pool = keys.video_id.map(dict(zip(ctx.current.video_id, ctx.current.pool, strict=True)))
    fold = keys.video_id.map(ctx.folds).fillna(-1).to_numpy(dtype=np.int64)
    labelled = pool.to_numpy() == LABELLED_POOL
    checks = [
        ("near-duplicate-across-pools", rows[labelled[rows]], rows[~labelled[rows]], "pools"),
        ("near-duplicate-across-folds", rows[fold[rows] >= 0], None, "CV folds"),
    ]
    out = []
    for code, a, b, what in checks:
        if len(a) == 0 or (b is not None and len(b) == 0):
            continue
        i, j, cos, total = near_duplicate_pairs(x, a, b, ctx.cosine, ctx.block, center=mean)
        capped = total > len(i)  # only the first pairs were kept: the counts are lower bounds
        keep = sha[i] != sha[j]  # identical bytes are reported once, from the manifest
        if code.endswith("folds"):
            keep &= fold[i] != fold[j]
        i, j, cos = i[keep], j[keep], cos[keep]
        if len(i) == 0:
            continue
        order = np.argsort(-cos)
        pairs = [[vid[i[k]], vid[j[k]], round(float(cos[k]), 5)] for k in order[:50]]
        candidates = len(a) * len(b) if b is not None else len(a) * (len(a) - 1) // 2
        msg = (
            f"{len(i)} pair(s) of different videos across {what} have {ft.modality} features "
            f"with centred cosine > {ctx.cosine} (closest: {pairs[0][0]} ~ {pairs[0][1]}, "
            f"{pairs[0][2]}); check whether they are the same clip re-encoded"
        )
        if capped:
            msg += f"; {total} candidate pairs over the threshold, only the first were examined"
        if len(i) >= 10 and len(i) > 0.01 * candidates:
            msg += f"; {len(i) / candidates:.0%} of all pairs: the features may have collapsed"
        out.append(
            Finding("warning", code, ft.ref.name, msg, _ids([*vid[i], *vid[j]]),
                    {"n_pairs": len(i), "pairs": pairs, "candidates": candidates,
                     "capped": capped})
        )  # fmt: skip
    return out


def _check_table(
    store: Store, ft: FeatureTable, newest: bool, ctx: _Context
) -> tuple[dict, list[Finding], tuple[np.ndarray, np.ndarray, int]]:
    """Row-level health of one table; missing modalities and leakage for a modality's newest."""
    name = ft.ref.name
    keys, x, _ = _read_features(store, ft)
    current_keys = set(zip(ctx.current.video_id, ctx.current.sha256, strict=True))
    current = np.array(
        [k in current_keys for k in zip(keys.video_id, keys.sha256, strict=True)], dtype=bool
    )
    norms, finite = _norms_and_finite(x)
    zero = finite & (norms == 0)
    ok = finite & ~zero
    vid = keys.video_id.to_numpy().astype(str)
    findings = []
    if (~finite).any():
        findings.append(
            Finding("error", "nan-vectors", name,
                    f"{int((~finite).sum())} vector(s) hold NaN, inf or null; the extractor that "
                    f"wrote them is broken: delete the rows and re-extract", _ids(vid[~finite]))
        )  # fmt: skip
    if zero.any():
        findings.append(
            Finding("error", "zero-vectors", name,
                    f"{int(zero.sum())} all-zero vector(s): a missing modality must be a failure "
                    f"row, never a zero vector; delete the rows and re-extract", _ids(vid[zero]))
        )  # fmt: skip
    use = ok & current
    outliers = np.zeros(len(x), dtype=bool)
    if use.sum() >= 10:
        med = float(np.median(norms[use]))
        mad = 1.4826 * float(np.median(np.abs(norms[use] - med)))
        if mad > 0:
            z = np.where(use, np.abs(norms - med) / mad, 0.0)
            outliers = z > ctx.norm_z
            if outliers.any():
                top = np.argsort(-z)[: min(20, int(outliers.sum()))]
                findings.append(
                    Finding("warning", "outlying-norms", name,
                            f"{int(outliers.sum())} vector(s) have a norm more than {ctx.norm_z} "
                            f"robust SDs from the median {med:.4g} (MAD-SD {mad:.3g})",
                            _ids(vid[outliers]),
                            {"median": med, "mad_sd": mad,
                             "z": {vid[k]: round(float(z[k]), 2) for k in top}})
                )  # fmt: skip
    stale = int((~current).sum())
    if stale:
        findings.append(
            Finding("info", "stale-rows", name,
                    f"{stale} row(s) belong to videos gone from the manifest or whose bytes "
                    f"changed; training ignores them", _ids(vid[~current]))
        )  # fmt: skip
    missing: dict[str, int] = {}
    if newest:
        held = set(zip(keys.video_id[ok], keys.sha256[ok], strict=True))
        missing, more = _missing(ft, held, ctx)
        findings += more
    mean, std = _mean_std(x, np.flatnonzero(use))
    if newest and use.any():
        findings += _leakage(ft, keys, x, use, mean, ctx)
    summary = {
        "table": name,
        "modality": ft.modality,
        "extractor_id": ft.extractor_id,
        "rows": len(x),
        "current": int(current.sum()),
        "dim": ft.dim,
        "contract": f"{ft.ref.contract.name} v{ft.version}",
        "newest": newest,
        "nan": int((~finite).sum()),
        "zero": int(zero.sum()),
        "outliers": int(outliers.sum()),
        "stale": stale,
        "missing": missing,
    }
    findings.insert(
        0,
        Finding("info", "table", name,
                f"{len(x)} rows ({summary['current']} of current videos), dim {ft.dim}, "
                f"contract {summary['contract']}", (), summary),
    )  # fmt: skip
    return summary, findings, (mean, std, int(use.sum()))


def _drift(
    modality: str, new: FeatureTable, old: FeatureTable, stats: dict, drift_warn: float
) -> Finding:
    """Per-dimension mean/std shift of a modality's newest table against the previous one."""
    name = new.ref.name
    (m1, s1, n1), (m0, s0, n0) = stats.get(new.ref.name), stats.get(old.ref.name)
    if new.dim != old.dim or not n0 or not n1:
        why = f"dims {new.dim} vs {old.dim}" if new.dim != old.dim else "a table has no rows"
        return Finding(
            "info", "drift-not-comparable", name,
            f"{modality}: {new.extractor_id} (newest) and {old.extractor_id} are not comparable "
            f"({why})", (), {"previous": old.ref.name},
        )  # fmt: skip
    pooled = np.sqrt((s0 * s0 + s1 * s1) / 2) + 1e-12
    shift = np.abs(m1 - m0) / pooled  # standardised mean difference per dimension
    ratio = (s1 + 1e-12) / (s0 + 1e-12)
    detail = {
        "previous": old.ref.name,
        "rows": [n1, n0],
        "mean_shift": float(shift.mean()),
        "max_shift": float(shift.max()),
        "dims_over_0.5": float((shift > 0.5).mean()),
        "std_ratio_median": float(np.median(ratio)),
        "std_ratio_range": [float(ratio.min()), float(ratio.max())],
    }
    level = "warning" if detail["mean_shift"] > drift_warn else "info"
    return Finding(
        level, "drift", name,
        f"{modality}: {new.extractor_id} (newest, {n1} rows) vs {old.extractor_id} ({n0} rows): "
        f"mean per-dimension shift {detail['mean_shift']:.3f} pooled SD (max "
        f"{detail['max_shift']:.2f}, {detail['dims_over_0.5']:.0%} of dims over 0.5); std ratio "
        f"median {detail['std_ratio_median']:.3f}"
        + ("; retrain models fitted on the previous table" if level == "warning" else ""),
        (), detail,
    )  # fmt: skip


def _table_time(store: Store, ft: FeatureTable) -> pd.Timestamp:
    t = store.read_arrow(ft.ref, columns=["created_at"]).column("created_at")
    latest = pc.max(t).as_py() if len(t) else None
    return pd.Timestamp(latest) if latest is not None else pd.Timestamp(0, tz="UTC")


def check_stores(
    store: Store,
    n_splits: int = 5,
    seed: int = 0,
    cosine_threshold: float = 0.99,
    norm_z: float = 5.0,
    drift_warn: float = 0.1,
    block: int = 4096,
    write: bool = True,
) -> Findings:
    """Check every feature table of the store; write the findings table and reports/check.md."""
    if not store.has_stores():
        raise BadInputError(
            f"{store.root} holds no stores/ folder: it is not a merflow data root; give the data "
            f"root of an extraction (default <corpus>/merflow)"
        )
    now = datetime.now(UTC)
    check_id = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    items: list[Finding] = []
    current = _current(store)
    if current.empty:
        items.append(
            Finding("error", "no-manifest", tables.MANIFEST.name,
                    f"the manifest under {store.root} is empty; run `merflow extract` first")
        )  # fmt: skip
    try:
        folds = cv_folds(store, n_splits, seed) if not current.empty else {}
    except ValueError as e:
        folds = {}
        items.append(Finding("info", "folds-unavailable", tables.LABELS.name, str(e)))
    ctx = _Context(current, folds, store.read(tables.FAILURES), cosine_threshold, norm_z, block)
    items += _content_duplicates(ctx)
    found, problems = find_feature_tables(store)
    items += problems
    by_modality: dict[str, list[FeatureTable]] = {}
    for ft in sorted(found, key=lambda t: (_table_time(store, t), t.extractor_id), reverse=True):
        by_modality.setdefault(ft.modality, []).append(ft)
    summaries, stats = [], {}
    for modality in MODALITIES:
        for k, ft in enumerate(by_modality.get(modality, [])):
            summary, more, stats[ft.ref.name] = _check_table(store, ft, k == 0, ctx)
            summaries.append(summary)
            items += more
        fts = by_modality.get(modality, [])
        if len(fts) > 1:
            items.append(_drift(modality, fts[0], fts[1], stats, drift_warn))
    signals = quality_signals(store) if not current.empty else None
    order = {lv: i for i, lv in enumerate(LEVELS)}
    items.sort(key=lambda f: order[f.level])  # stable: errors first, tables in order
    findings = Findings(
        check_id, str(store.root), now, items, summaries, signals,
        {"n_splits": n_splits, "seed": seed, "cosine": cosine_threshold, "norm_z": norm_z,
         "drift_warn": drift_warn},
    )  # fmt: skip
    if write:
        write_findings(store, findings)
    log.info(
        "check %s: %d error(s), %d warning(s)", check_id, findings.count("error"),
        findings.count("warning"),
    )  # fmt: skip
    return findings


def write_findings(store: Store, findings: Findings) -> Path | str:
    """Append the findings to the `findings` table and write reports/check.md; returns its path
    (its URL for a data root on object storage)."""
    if findings.items:
        store.upsert(tables.FINDINGS, findings.frame())
    return store.write_text(REPORT, findings.markdown())


@task(name="check-stores", cache_policy=NO_CACHE)
def check_task(
    data_root: str,
    n_splits: int = 5,
    seed: int = 0,
    cosine_threshold: float = 0.99,
    drift_warn: float = 0.1,
) -> Findings:
    """Prefect task: check the feature stores (never cached: the stores change under it)."""
    return check_stores(Store(data_root), n_splits, seed, cosine_threshold, drift_warn=drift_warn)
