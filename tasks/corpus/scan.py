"""Scan video folders into the manifest, hashing only new or changed files."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from data_contracts import tables
from data_contracts.failures import failure_row, failures_frame
from data_contracts.store import Store
from tasks.corpus.layout import POOL_OF_FOLDER, is_video, video_extensions
from tasks.engine.errors import BadInputError

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """What a scan found, compared with the manifest it updated."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    unchanged: int = 0
    hashed: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        return (
            f"{len(self.new)} new, {len(self.changed)} changed, {len(self.gone)} gone, "
            f"{self.unchanged} unchanged ({self.hashed} files hashed, "
            f"{len(self.unreadable)} unreadable)"
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_videos(
    video_dirs: list[Path], extensions: Collection[str] | None = None
) -> dict[str, Path]:
    """Map video_id (file stem) to path; two files with one stem are an error listing all.

    `extensions`: the setting `corpus.video_extensions` (None: its default)."""
    found: dict[str, list[Path]] = {}
    exts = video_extensions(extensions)
    for folder in video_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise BadInputError(
                f"video folder {folder} does not exist or is not a folder; pass an existing folder"
            )
        for p in sorted(folder.iterdir()):
            if is_video(p, exts):
                found.setdefault(p.stem, []).append(p)
    clashes = {k: v for k, v in found.items() if len(v) > 1}
    if clashes:
        listing = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in sorted(clashes.items()))
        raise BadInputError(
            f"video ids must be unique (the file stem is the id), but these stems occur more "
            f"than once: {listing}. Rename or remove the duplicates and scan again."
        )
    return {k: v[0] for k, v in found.items()}


def _probe_row(path: Path) -> dict:
    # Imported here so that scanning a folder that needs no probe costs no PyAV import.
    from tasks.media import probe

    try:
        info = probe(path)
    except BadInputError as e:
        return {"has_video": False, "has_audio": False, "probe_error": str(e)}
    return {
        "duration": info.duration,
        "fps": info.fps,
        "n_frames": info.n_frames,
        "width": info.width,
        "height": info.height,
        "has_video": info.has_video,
        "has_audio": info.has_audio,
        "audio_sample_rate": info.audio_sample_rate,
        "probe_error": None,
    }


def scan_videos(
    video_dirs: list[Path],
    store: Store,
    extensions: Collection[str] | None = None,
    workers: int = 2,
    pool: str | None = None,
) -> tuple[ScanReport, pd.DataFrame]:
    """Build or update the manifest from `video_dirs`; return the report and the scanned rows.

    `extensions`: which files are videos (the setting `corpus.video_extensions`; None: its
    default). `pool`: every video's pool (a plain folder's: unlabeled); None: its folder's,
    POOL_OF_FOLDER or the folder's own name. Size + mtime is the cheap first test: an
    unchanged file is neither hashed nor probed.
    A file whose bytes changed gets a new sha256, so every downstream key changes with it.
    """
    video_dirs = [Path(d).expanduser().resolve() for d in video_dirs]
    files = list_videos(video_dirs, extensions)
    old = store.read(tables.MANIFEST)
    old_by_id = {r.video_id: r for r in old.itertuples(index=False)}
    report = ScanReport()
    now = datetime.now(UTC)
    stats = {vid: p.stat() for vid, p in files.items()}  # follows symlinks

    def needs_hash(vid: str) -> bool:
        prev = old_by_id.get(vid)
        st = stats[vid]
        return prev is None or (
            prev.path != str(files[vid])
            or prev.size != st.st_size
            or prev.mtime_ns != st.st_mtime_ns
        )

    to_hash = [vid for vid in files if needs_hash(vid)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        digests = dict(
            zip(to_hash, executor.map(lambda v: sha256_file(files[v]), to_hash), strict=True)
        )
    report.hashed = len(digests)

    def probe(vid: str) -> dict:
        return _probe_row(files[vid])

    to_probe = [
        vid
        for vid, digest in digests.items()
        if vid not in old_by_id or old_by_id[vid].sha256 != digest
    ]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        probes = dict(zip(to_probe, executor.map(probe, to_probe), strict=True))

    rows, failures = [], []
    for vid, path in files.items():
        st = stats[vid]
        prev = old_by_id.get(vid)
        if vid not in digests:
            report.unchanged += 1
            rows.append(prev._asdict())
            continue
        base = {
            "video_id": vid,
            "sha256": digests[vid],
            "path": str(path),
            "source_dir": str(path.parent),
            "pool": pool or POOL_OF_FOLDER.get(path.parent.name, path.parent.name),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "scanned_at": now,
        }
        if vid in probes:
            meta = probes[vid]
            (report.new if prev is None else report.changed).append(vid)
            if meta.get("probe_error"):
                report.unreadable.append(vid)
                failures.append(failure_row(vid, digests[vid], "probe", meta["probe_error"]))
        else:  # same bytes under a new mtime or path: keep the probe results
            report.unchanged += 1
            meta = {k: getattr(prev, k) for k in _PROBE_COLUMNS}
        rows.append({**base, **{k: meta.get(k) for k in _PROBE_COLUMNS}})

    scanned = set(map(str, video_dirs))
    gone = [vid for vid, r in old_by_id.items() if r.source_dir in scanned and vid not in files]
    report.gone = sorted(gone)
    manifest = pd.DataFrame(rows, columns=tables.MANIFEST.contract.columns)
    if report.new or report.changed or report.hashed:
        store.upsert(tables.MANIFEST, manifest[manifest.video_id.isin(digests)])
    if gone:
        store.delete(tables.MANIFEST, {(vid,) for vid in gone})
    if failures:
        store.upsert(tables.FAILURES, failures_frame(failures))
    log.info("scan of %s: %s", ", ".join(map(str, video_dirs)), report.summary())
    return report, manifest


_PROBE_COLUMNS = (
    "duration",
    "fps",
    "n_frames",
    "width",
    "height",
    "has_video",
    "has_audio",
    "audio_sample_rate",
    "probe_error",
)
