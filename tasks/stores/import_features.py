"""Bring your own features: a folder of per-video `.npy` files (MERTools' layout) or a Parquet or
CSV table of `video_id` + vector, written into a feature table under the feature contract.

The table is `features/<modality>/imported-<NAME>`. Its rows are bound to the videos the
manifest holds (their sha256, as extracted features are); videos the source names that the
manifest lacks are left out, or, when the import says it has no videos (`without_videos`),
stored as feature-only rows whose sha256 is NO_VIDEO; either way they are counted in each row's
provenance and listed in the import record `imports/<modality>/imported-<NAME>.json` under the
data root. Everything is read and checked
before anything is written; the rows go through the store (validated, atomic, upserted) in parts
of half the store's part size. A table is read in chunks of READ_ROWS rows (Parquet batches,
CSV chunks) twice, to check and to write, so memory follows a chunk and a part, not the table. An id
names its vectors for good: importing a source again writes only videos the table lacks (new
in the source or in the manifest), and a source that changes a vector the table holds is
refused (docs/import.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts import tables
from data_contracts.labels import MODALITIES
from data_contracts.store import Store, arrow_system_memory
from data_contracts.tables import NO_VIDEO
from tasks.corpus.scan import sha256_file
from tasks.engine.errors import BadInputError
from tasks.engine.shard import now_utc
from tasks.stores.quality import find_feature_tables

PREFIX = "imported-"
ID_COLUMNS = ("video_id", "name")  # merflow's id column, then MER's (label-disdim.csv)
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHOWN = 10  # ids and problems shown in a message
# Rows of a table read at a time (Parquet batches, CSV chunks): memory follows this, not the
# table (a 5120-d text table: 4096 rows are 84 MB as float32).
READ_ROWS = 4096


@dataclass
class SourceVectors:
    """What a source holds: one vector per video, and how it was read. The vectors come in
    blocks of rows (`blocks`), so a table larger than memory is never held whole."""

    video_ids: list[str]
    dim: int
    blocks: Callable[[], Iterator[np.ndarray]]  # float32 (rows, D) blocks, in video_ids order
    n_items: np.ndarray  # frames pooled into each vector (1: utterance-level)
    format: str  # npy-folder, parquet or csv
    pooling: str  # none, or mean over frames
    sha256: str  # of the file, or of the folder's sorted (file name, file sha256) list
    columns: str | None = None  # a table's vector column(s)
    files: list[tuple[str, str]] | None = None  # npy: (file name, sha256) per video

    def row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) pairs over the whole source, in video_ids order."""
        start = 0
        for block in self.blocks():
            yield start, block
            start += len(block)


@dataclass
class ImportReport:
    """What one import did."""

    table: str
    source: str
    format: str
    pooling: str
    dim: int
    in_source: int
    written: int = 0
    already: int = 0  # held by the table already (same video bytes, same vector)
    not_in_manifest: list[str] = field(default_factory=list)
    without_videos: bool = False  # not_in_manifest imported as feature-only rows, not left out
    record: str | None = None

    def lines(self) -> list[str]:
        """What the command prints."""
        extractor_id = self.table.rsplit("/", 1)[-1]
        modality = self.table.split("/")[1]
        out = [
            f"{self.table}: {self.written} rows written, {self.already} already imported, "
            f"from {self.in_source} vectors in {self.source} ({self.format}, {self.dim}-d, "
            f"pooling: {self.pooling})"
        ]
        if self.not_in_manifest and self.without_videos:
            out.append(
                f"  not in the manifest, imported without videos (feature-only, sha256 "
                f"{NO_VIDEO}): {len(self.not_in_manifest)} ({_listing(self.not_in_manifest)})"
            )
        elif self.not_in_manifest:
            out.append(
                f"  not in the manifest, left out: {len(self.not_in_manifest)} "
                f"({_listing(self.not_in_manifest)}); `merflow scan VIDEO_DIR` adds their "
                f"videos, then import again; without the videos, import with --without-videos"
            )
        if self.record:
            out.append(f"  import record: {self.record}")
        out.append(f"  train on it: train.feature_tables={{{modality}: {extractor_id}}}")
        return out


def imported_extractor_id(name: str) -> str:
    """The extractor id of the table imported under `name`."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"import name {name!r} must start with a letter or digit and hold only letters, "
            f"digits, '.', '_' and '-' (it becomes the table's id {PREFIX}NAME)"
        )
    return f"{PREFIX}{name}"


def read_source(source: Path) -> SourceVectors:
    """The vectors of a folder of `<video_id>.npy` files or of a .parquet/.csv table."""
    source = Path(source).expanduser()
    if source.is_dir():
        return read_npy_folder(source)
    if not source.is_file():
        raise FileNotFoundError(
            f"feature source {source} does not exist; give a folder of <video_id>.npy files or "
            f"a .parquet/.csv file"
        )
    kind = TABLE_SUFFIXES.get(source.suffix.lower())
    if kind is None:
        raise ValueError(
            f"feature source {source} is neither a folder of .npy files nor a table "
            f"({', '.join(TABLE_SUFFIXES)}); give one of those"
        )
    return read_table(source, kind)


def read_npy_folder(folder: Path) -> SourceVectors:
    """MERTools' layout: one `<video_id>.npy` per video, (D,) or (T, D) (mean over T)."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npy" and p.is_file())
    if not files:
        raise ValueError(
            f"feature folder {folder} holds no .npy file; give the folder MERTools wrote (one "
            f"<video_id>.npy per video) or a .parquet/.csv file"
        )
    problems: list[str] = []
    vectors, counts, shas, ranks = {}, {}, {}, {}
    for path in files:
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            problems.append(f"{path.name}: not a readable .npy array ({e})")
            continue
        if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or 0 in arr.shape:
            problems.append(
                f"{path.name}: {arr.dtype} array of shape {arr.shape}; expected numbers of "
                f"shape (D,) or (T, D)"
            )
            continue
        if not np.isfinite(arr).all():
            problems.append(f"{path.name}: holds NaN or inf values")
            continue
        vec = arr if arr.ndim == 1 else arr.mean(axis=0, dtype=np.float64)
        vectors[path.stem], counts[path.stem] = vec, 1 if arr.ndim == 1 else arr.shape[0]
        shas[path.stem], ranks[path.stem] = sha256_file(path), arr.ndim
    problems += _mixed(ranks, {v: vec.shape[0] for v, vec in vectors.items()}, ".npy")
    if problems:
        raise BadInputError(_refused(folder, problems))
    ids = sorted(vectors)
    listing = "".join(f"{v}.npy\t{shas[v]}\n" for v in ids)
    frames = next(iter(ranks.values())) == 2
    matrix = np.stack([vectors[v] for v in ids]).astype(np.float32)
    return SourceVectors(
        video_ids=ids,
        dim=int(matrix.shape[1]),
        blocks=lambda: iter([matrix]),
        n_items=np.array([counts[v] for v in ids], dtype=np.int64),
        format="npy-folder",
        pooling="mean over frames of (T, D) arrays" if frames else "none: (D,) arrays",
        sha256=hashlib.sha256(listing.encode()).hexdigest(),
        files=[(f"{v}.npy", shas[v]) for v in ids],
    )


def _mixed(ranks: dict[str, int], dims: dict[str, int], suffix: str) -> list[str]:
    """Problems of a folder whose arrays disagree on their kind or dimension."""
    problems = []
    for what, values in (("kind ((D,) or (T, D))", ranks), ("dimension D", dims)):
        groups: dict[int, list[str]] = {}
        for vid, value in values.items():
            groups.setdefault(value, []).append(f"{vid}{suffix}")
        if len(groups) > 1:
            shown = "; ".join(
                f"{len(ids)} with {_rank_or_dim(what, value)} ({_listing(ids, 3)})"
                for value, ids in sorted(groups.items(), key=lambda g: -len(g[1]))
            )
            problems.append(f"the files disagree on the {what}: {shown}; import one kind")
    return problems


def _rank_or_dim(what: str, value: int) -> str:
    if what.startswith("kind"):
        return "(D,)" if value == 1 else "(T, D)"
    return f"D={value}"


def _header(path: Path, kind: str) -> list[str]:
    """The table's column names, stripped."""
    if kind == "parquet":
        names = pq.read_schema(path).names
    else:
        names = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    return [str(c).strip() for c in names]


def _chunks(path: Path, kind: str, header: list[str], rows: int) -> Iterator[pd.DataFrame]:
    """The table in chunks of at most `rows` rows (Parquet batches, CSV chunks)."""
    if kind == "parquet":
        # Without pre-buffering and through a small read buffer: by default the reader keeps
        # the file's column chunks it fetched ahead (a 2.3 GB table held ~0.7 GB per 0.6 GB read).
        source = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        for batch in source.iter_batches(batch_size=rows):
            columns = [_rows_of(column) for column in batch.columns]
            del batch
            yield pd.DataFrame(dict(zip(header, columns, strict=True)))
        return
    ids = {i: str for i, c in enumerate(header) if c in ID_COLUMNS}
    for df in pd.read_csv(path, dtype=ids, chunksize=rows, encoding="utf-8"):
        df.columns = header
        yield df


def _rows_of(column: pa.Array) -> pd.Series | list:
    """A Parquet column for pandas. A list column whose rows have one length becomes row views
    of one matrix: to_pandas() would make one small array per row, whose thousands of small
    allocations the process keeps after they are freed (1 GB for a few 5120-d chunks)."""
    if (
        pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    ) and column.null_count == 0:
        lengths = pc.list_value_length(column)
        if len(column) and pc.min_max(lengths)["min"] == pc.min_max(lengths)["max"]:
            values = column.flatten().to_numpy(zero_copy_only=False)
            return list(values.reshape(len(column), -1))
    return column.to_pandas()


def read_table(path: Path, kind: str, rows: int = READ_ROWS) -> SourceVectors:
    """A table of `video_id` (or `name`) and either one list column or D numeric columns.

    Read in chunks of `rows` rows: this pass checks every row and keeps the ids only; the
    vectors are read again, chunk by chunk, when they are written (`SourceVectors.blocks`)."""
    problems: list[str] = []
    id_parts: list[pd.Series] = []
    dims: set[int] = set()
    columns, seen = None, 0
    try:
        header = _header(path, kind)
        id_col = next((c for c in ID_COLUMNS if c in header), None)
        if id_col is None:
            raise BadInputError(
                f"feature table {path} has no video_id (or name) column (found: "
                f"{', '.join(header[:10]) or 'none'}); name the id column video_id"
            )
        others = [c for c in header if c not in ID_COLUMNS]
        for df in _chunks(path, kind, header, rows):
            ids = df[id_col].astype("string").str.strip()
            id_parts.append(ids)
            empty = np.flatnonzero((ids.isna() | (ids == "")).to_numpy()) + seen
            if len(empty):
                problems.append(f"empty {id_col} in rows {_listing([str(i) for i in empty])}")
            seen += len(df)
            matrix, columns = _vector_columns(df, others, problems)
            if matrix is None:
                break
            dims.add(matrix.shape[1])
            if not np.isfinite(matrix).all():
                bad = ids[~np.isfinite(matrix).all(axis=1)].tolist()
                problems.append(f"NaN or inf values in the vectors of {_listing(bad)}")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"feature table {path} is not a readable {kind} file: {e}") from e
    all_ids = pd.concat(id_parts, ignore_index=True) if id_parts else pd.Series([], dtype="string")
    if seen == 0:
        problems.append("it holds no rows")
        if not others:
            problems.append("no vector column beside the id")
    if len(dims) > 1:
        problems.append(f"the vectors of column {columns!r} have lengths {sorted(dims)}")
    dup = sorted(set(all_ids[all_ids.duplicated() & all_ids.notna()]))
    if dup:
        problems.append(f"{id_col} values occur more than once: {_listing(dup)}")
    if problems or not dims:
        raise BadInputError(_refused(path, problems))

    def blocks() -> Iterator[np.ndarray]:
        for df in _chunks(path, kind, header, rows):
            matrix, _ = _vector_columns(df, others, [])
            yield np.asarray(matrix, dtype=np.float32)

    return SourceVectors(
        video_ids=all_ids.tolist(),
        dim=dims.pop(),
        blocks=blocks,
        n_items=np.ones(seen, dtype=np.int64),
        format=kind,
        pooling="none: one vector per row",
        sha256=sha256_file(path),
        columns=columns,
    )


def _vector_columns(
    df: pd.DataFrame, others: list[str], problems: list[str]
) -> tuple[np.ndarray | None, str | None]:
    """The (N, D) matrix of one list column or of D numeric columns, and their names."""
    if not others:
        problems.append("no vector column beside the id")
        return None, None
    if len(others) == 1 and not pd.api.types.is_numeric_dtype(df[others[0]]):
        col = others[0]
        try:
            rows = [json.loads(v) if isinstance(v, str) else v for v in df[col]]
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                problems.append(f"the vectors of column {col!r} have lengths {sorted(lengths)}")
                return None, None
            # float32, as the table stores them: a float64 copy of a 4,096-row 5120-d chunk
            # would be 168 MB more for nothing (float64 -> float32 rounds the same either way).
            return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1), col
        except (TypeError, ValueError) as e:
            problems.append(f"column {col!r} does not hold one list of numbers per row ({e})")
            return None, None
    text = [c for c in others if not pd.api.types.is_numeric_dtype(df[c])]
    if text:
        problems.append(
            f"columns {_listing(text)} are not numeric; keep the id and either one vector "
            f"column or only the D numeric columns"
        )
        return None, None
    names = f"{others[0]} .. {others[-1]} ({len(others)} columns)" if len(others) > 1 else others[0]
    return df[others].to_numpy(dtype=np.float64), names


def _refused(source: Path, problems: list[str]) -> str:
    shown = problems[:_SHOWN] + (
        [f"... and {len(problems) - _SHOWN} more"] if problems[_SHOWN:] else []
    )
    listing = "\n".join(f"  - {p}" for p in shown)
    return f"feature source {source} refused, nothing was written:\n{listing}"


def _listing(items: list[str], n: int = _SHOWN) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def import_features(
    store: Store, modality: str, name: str, source: Path, without_videos: bool = False
) -> ImportReport:
    """Import `source` as the feature table `features/<modality>/imported-<name>`; videos the
    manifest lacks are left out, or with `without_videos` stored as feature-only rows. The
    source is streamed, through the system allocator (arrow_system_memory)."""
    with arrow_system_memory():
        return _import(store, modality, name, source, without_videos)


def _import(
    store: Store, modality: str, name: str, source: Path, without_videos: bool
) -> ImportReport:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; give one of {', '.join(MODALITIES)}")
    extractor_id = imported_extractor_id(name)
    source = Path(source).expanduser().resolve()
    read = read_source(source)
    table = tables.features(modality, extractor_id, read.dim)
    manifest = store.read(tables.MANIFEST, columns=["video_id", "sha256"])
    sha_of = dict(zip(manifest.video_id, manifest.sha256, strict=True))
    unknown = sorted(v for v in read.video_ids if v not in sha_of)
    if without_videos:  # a video the manifest holds keeps its bytes' sha256
        sha_of |= dict.fromkeys(unknown, NO_VIDEO)
    _refuse_changed_vectors(store, table, read, sha_of, source)
    report = ImportReport(
        table.name,
        str(source),
        read.format,
        read.pooling,
        read.dim,
        len(read.video_ids),
        not_in_manifest=unknown,
        without_videos=without_videos,
    )
    if not without_videos and len(unknown) == len(read.video_ids):
        raise BadInputError(
            f"the manifest under {store.url} holds none of the {len(unknown)} videos "
            f"{source} names ({_listing(unknown, 3)}; the manifest holds "
            f"{_listing(sorted(sha_of), 3) or 'no video'}); features are bound to the bytes of "
            f"scanned videos: run `merflow scan VIDEO_DIR --data-root {store.url}` first, and "
            f"name the vectors by the video file's stem; or, with the features and no videos, "
            f"import them with --without-videos"
        )
    bound = [i for i, v in enumerate(read.video_ids) if v in sha_of]
    held = store.existing_keys(table, where={"video_id": [read.video_ids[i] for i in bound]})
    rows = [
        i for i in bound if (read.video_ids[i], sha_of[read.video_ids[i]], extractor_id) not in held
    ]
    report.already = len(bound) - len(rows)
    record = f"imports/{modality}/{extractor_id}.json"
    if not rows and store.read_text(record) is not None:
        return report  # every vector is in the table already: nothing changes
    # merflow's version and commit, as extracted rows carry them (tasks/embed.py loads torch:
    # only when there is something to write).
    from tasks.engine.code_version import code_version

    now = now_utc()
    common = {
        "importer": "merflow import-features",
        "extractor_id": extractor_id,
        "modality": modality,
        "source": str(source),
        "format": read.format,
        "source_sha256": read.sha256,
        "pooling": read.pooling,
        "dim": read.dim,
        "columns": read.columns,
        "imported_at": now.isoformat(),
        "not_in_manifest": len(unknown),
        "without_videos": without_videos,
        "record": record,
        **code_version(),
    }
    # Written in parts of three quarters of the store's target part size (one upsert each), so
    # that no part counts as small and none is merged again (the store merges parts below half
    # the target), block by block of the source: memory follows a part, not the table. Every
    # row was checked above; a crash between parts leaves whole parts, and importing again
    # writes the rest.
    per_part = max(1, 3 * store.target_part_bytes // (4 * 4 * read.dim))
    wanted, pending = np.zeros(len(read.video_ids), dtype=bool), []
    wanted[rows] = True
    for start, block in read.row_blocks():
        picked = np.flatnonzero(wanted[start : start + len(block)])
        pending += [(int(start + i), block[i]) for i in picked]
        while len(pending) >= per_part:
            report.written += _write(store, table, pending[:per_part], read, sha_of, common, now)
            del pending[:per_part]
    report.written += _write(store, table, pending, read, sha_of, common, now)
    summary = {**common, "table": table.name, "rows": report.written + report.already}
    summary["not_in_manifest"] = {
        "count": len(unknown),
        "video_ids": unknown,
        "imported": "feature-only" if without_videos else "left out",
    }
    report.record = str(store.write_text(record, json.dumps(summary, indent=2, sort_keys=True)))
    return report


def _write(
    store: Store,
    table,
    picked: list[tuple[int, np.ndarray]],
    read: SourceVectors,
    sha_of: dict[str, str],
    common: dict,
    now,
) -> int:
    """Upsert the source's rows `picked` ((row, vector) pairs); returns the rows written."""
    if not picked:
        return 0
    rows = [i for i, _ in picked]
    df = pd.DataFrame(
        {
            "video_id": [read.video_ids[i] for i in rows],
            "sha256": [sha_of[read.video_ids[i]] for i in rows],
            "extractor_id": common["extractor_id"],
            "embedding": [vector for _, vector in picked],
            "n_items": read.n_items[rows].astype(np.int32),
            "provenance": [
                json.dumps({**common, **_row_of(read, i, sha_of)}, sort_keys=True) for i in rows
            ],
            "created_at": now,
        }
    )
    return store.upsert(table, df).written


def _row_of(read: SourceVectors, i: int, sha_of: dict[str, str]) -> dict:
    """The per-row part of the provenance: feature-only or not, the .npy file and its frames."""
    row = {"feature_only": sha_of[read.video_ids[i]] == NO_VIDEO}
    if read.files is None:
        return row
    file, sha = read.files[i]
    return {**row, "file": file, "file_sha256": sha, "n_frames": int(read.n_items[i])}


def _refuse_changed_vectors(
    store: Store, table, read: SourceVectors, sha_of: dict[str, str], source: Path
) -> None:
    """An id names its vectors for good: a source may add videos to an imported table, never
    change a vector it holds (nor its dimension)."""
    modality, extractor_id = table.name.split("/")[1:]
    found = [
        t
        for t in find_feature_tables(store)[0]
        if t.modality == modality and t.extractor_id == extractor_id
    ]
    if not found:
        return
    if found[0].dim != read.dim:
        held = f"{found[0].dim}-d vectors, and {source} gives {read.dim}-d ones"
    else:
        changed = []
        for start, block in read.row_blocks():  # block by block: the source is never whole
            ids = read.video_ids[start : start + len(block)]
            keys, matrix = store.read_vectors(table, where={"video_id": ids})
            position = {v: i for i, v in enumerate(ids)}
            changed += [
                v
                for j, (v, sha) in enumerate(zip(keys.video_id, keys.sha256, strict=True))
                if sha_of.get(v) == sha
                and not np.array_equal(matrix[j], block[position[v] - start])
            ]
        if not changed:
            return
        held = f"other vectors than {source} gives for {len(changed)} videos ({_listing(changed)})"
    raise ValueError(
        f"{table.name} already holds {held}; a table's vectors never change under its id. "
        f"Import the source under another NAME (and point train.feature_tables at it), or move "
        f"{store.table_dir(table)} aside to import it again"
    )
