"""The crops file of the faces stage: one `.npz` per video with the chosen faces under the keys
it always had and every other face under `other_` keys (layout: tasks/faces/crop.py's docstring and
docs/faces.md), its writer, its readers, and the per-track preview sheet."""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from isal import isal_zlib
from PIL import Image, ImageDraw

from data_contracts.atomic import atomic_path
from tasks.faces.frames import Face
from tasks.faces.track import appearance


# -- crops file ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceCrops:
    """The chosen faces of one crops file (what the visual features are computed from)."""

    crops: np.ndarray  # (n, size, size, 3) uint8 RGB
    frame_idx: np.ndarray  # (n,) int32
    boxes: np.ndarray  # (n, 4) float32
    confidence: np.ndarray  # (n,) float32


def load_crops(path: str | os.PathLike[str]) -> FaceCrops:
    """Read the chosen faces of a crops `.npz` written by `crop_faces`."""
    with np.load(path, allow_pickle=False) as z:
        return FaceCrops(z["crops"], z["frame_idx"], z["boxes"], z["confidence"])


# Per-face arrays: stored for the chosen faces under these names, for the others with `other_`.
ROW_KEYS = ("crops", "frame_idx", "boxes", "confidence", "track_id", "landmarks")


@dataclass(frozen=True)
class FaceTracks:
    """Every face of one crops file, chosen or not, in frame order, with its track."""

    crops: np.ndarray  # (N, size, size, 3) uint8 RGB
    frame_idx: np.ndarray  # (N,) int32
    boxes: np.ndarray  # (N, 4) float32
    confidence: np.ndarray  # (N,) float32
    track_id: np.ndarray  # (N,) int32
    landmarks: np.ndarray  # (N, k, 2) float32
    chosen: np.ndarray  # (N,) bool
    track_score: np.ndarray  # (T,) float32
    cuts: np.ndarray  # int32: frames that start a new shot
    select: str
    chosen_track: int
    select_score: float
    select_reason: str

    @property
    def n_tracks(self) -> int:
        """Number of tracks."""
        return len(self.track_score)


def load_tracks(path: str | os.PathLike[str]) -> FaceTracks:
    """Read every face of a crops `.npz`, chosen and other, with its track."""
    with np.load(path, allow_pickle=False) as z:
        if "track_id" not in z.files:
            raise ValueError(
                f"{path} was written before face tracks existed and keeps only the chosen "
                "faces; crop the video again (`merflow task crop-faces`) to get its tracks"
            )
        rows = {k: np.concatenate([z[k], z[f"other_{k}"]]) for k in ROW_KEYS}
        chosen = np.arange(len(rows["frame_idx"])) < len(z["frame_idx"])
        order = np.lexsort((rows["track_id"], rows["frame_idx"]))
        return FaceTracks(
            **{k: v[order] for k, v in rows.items()},
            chosen=chosen[order],
            track_score=z["track_score"],
            cuts=z["cuts"],
            select=str(z["select"]),
            chosen_track=int(z["chosen_track"]),
            select_score=float(z["select_score"]),
            select_reason=str(z["select_reason"]),
        )


# The crops archive is deflated by ISA-L (isal) at this level, not by zlib: on a real 640x360
# clip's 112 px crops, 0.08 ms a crop against zlib level 1's 0.56 ms (~15 % of the faces stage
# at detect_every=5), for archives of 0.81 of the raw size against 0.74. It is plain deflate:
# np.load and any zip reader read it.
ZIP_LEVEL = 2


def savez(f: Any, **arrays: np.ndarray) -> None:
    """np.savez_compressed, deflated by ISA-L at ZIP_LEVEL, into the open file `f`: the same
    .npz np.load reads."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z:
        for key, value in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as out:
                # zipfile's member writer deflates through its `_compressor` (zlib's); ISA-L's
                # takes its place before the first byte (the member stays raw deflate, -15).
                out._compressor = isal_zlib.compressobj(ZIP_LEVEL, zlib.DEFLATED, -15)
                np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)


class CropWriter:
    """Collects every face with bounded memory and writes them as one compressed `.npz`,
    atomically: the chosen ones under the plain keys, the others under `other_` ones.

    Crops go to a raw scratch file beside the output every `chunk` faces; the final write
    streams that file (or, when only some faces are chosen, copies of its rows made chunk by
    chunk) into the archive, so a long video never holds all its crops in memory.
    """

    def __init__(self, out: Path, size: int, chunk: int = 256):
        self.out, self.size, self.chunk = Path(out), size, chunk
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._raw_path = self._scratch()
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 (closed by commit or close)
        self._more: list[Path] = []
        self._pending: list[np.ndarray] = []
        self.frame_idx: list[int] = []
        self.boxes: list[tuple[float, float, float, float]] = []
        self.confidence: list[float] = []
        self.rank: list[int] = []
        self.points: list[np.ndarray | None] = []
        self.signatures: list[np.ndarray] = []  # colour signatures, for linking tracks

    def _scratch(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".raw", dir=self.out.parent)
        os.close(fd)
        return Path(name)

    @property
    def n(self) -> int:
        """Number of faces added."""
        return len(self.frame_idx)

    def add(self, face: Face) -> None:
        """Append one face."""
        if face.crop.shape != (self.size, self.size, 3) or face.crop.dtype != np.uint8:
            raise ValueError(
                f"crop of frame {face.frame_idx} is {face.crop.shape} {face.crop.dtype}; "
                f"expected ({self.size}, {self.size}, 3) uint8"
            )
        self._pending.append(face.crop)
        self.frame_idx.append(face.frame_idx)
        self.boxes.append(face.box)
        self.confidence.append(face.confidence)
        self.rank.append(face.rank)
        self.points.append(face.landmarks)
        self.signatures.append(appearance(face.crop))
        if len(self._pending) >= self.chunk:
            self._spill()

    def _spill(self) -> None:
        if self._pending:
            self._raw.write(np.stack(self._pending).tobytes())
            self._pending.clear()

    def landmarks(self) -> np.ndarray:
        """(n, k, 2) float32 landmarks of the faces added; NaN rows for faces without."""
        k = next((len(p) for p in self.points if p is not None), 0)
        out = np.full((self.n, k, 2), np.nan, np.float32)
        for i, p in enumerate(self.points):
            if p is None:
                continue
            if len(p) != k:
                raise ValueError(
                    f"face of frame {self.frame_idx[i]} has {len(p)} landmarks, others {k}: "
                    "a backend gives one kind of landmarks per video"
                )
            out[i] = p
        return out

    @contextlib.contextmanager
    def _rows(self, crops: np.ndarray, idx: np.ndarray) -> Any:
        """`crops[idx]` without holding it in memory: the raw file itself when `idx` takes every
        row in order, else a copy made chunk by chunk."""
        if len(idx) == len(crops) and np.array_equal(idx, np.arange(len(crops))):
            yield crops
            return
        if len(idx) == 0:
            yield np.zeros((0, self.size, self.size, 3), np.uint8)
            return
        path = self._scratch()
        self._more.append(path)
        with open(path, "wb") as f:
            for i in range(0, len(idx), self.chunk):
                f.write(np.ascontiguousarray(crops[idx[i : i + self.chunk]]).tobytes())
        rows = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(idx), *crops.shape[1:]))
        try:
            yield rows
        finally:
            del rows

    def commit(
        self,
        chosen: np.ndarray | None = None,
        track_id: np.ndarray | None = None,
        video: dict[str, Any] | None = None,
    ) -> Path:
        """Write the `.npz` (atomically) and remove the scratch files. `chosen`: which faces the
        plain keys hold (default: all); `track_id`: each face's track (default: one track);
        `video`: the per-track and per-video keys (`track_score`, `cuts`, `select`, ...)."""
        self._spill()
        self._raw.close()
        n = self.n
        chosen = np.ones(n, bool) if chosen is None else np.asarray(chosen, bool)
        track_id = np.zeros(n, np.int32) if track_id is None else np.asarray(track_id, np.int32)
        n_tracks = int(track_id.max()) + 1 if n else 0
        per_video = {
            "track_score": np.full(n_tracks, np.nan, np.float32),
            "cuts": np.zeros(0, np.int32),
            "select": np.array("largest"),
            "chosen_track": np.array(-1, np.int32),
            "select_score": np.array(np.nan, np.float32),
            "select_reason": np.array(""),
        }
        for key, value in (video or {}).items():
            kind = per_video[key].dtype
            per_video[key] = np.asarray(value) if kind.kind == "U" else np.asarray(value, kind)
        rows = {
            "frame_idx": np.asarray(self.frame_idx, np.int32),
            "boxes": np.asarray(self.boxes, np.float32).reshape(-1, 4),
            "confidence": np.asarray(self.confidence, np.float32),
            "track_id": track_id,
            "landmarks": self.landmarks(),
        }
        shape = (n, self.size, self.size, 3)
        crops = (
            np.memmap(self._raw_path, dtype=np.uint8, mode="r", shape=shape)
            if n
            else np.zeros(shape, np.uint8)
        )
        pick, rest = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        arrays: dict[str, np.ndarray] = {}
        for key, value in rows.items():
            arrays[key], arrays[f"other_{key}"] = value[pick], value[rest]
        with (
            self._rows(crops, pick) as mine,
            self._rows(crops, rest) as others,
            atomic_path(self.out) as tmp,
            open(tmp, "wb") as f,
        ):
            savez(f, crops=mine, other_crops=others, **arrays, **per_video)
        del crops
        self.close()
        return self.out

    def close(self) -> None:
        """Drop the scratch files (the output, if committed, stays)."""
        self._raw.close()
        for path in (self._raw_path, *self._more):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> CropWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- preview -------------------------------------------------------------------------------------
CHOSEN_COLOUR, OTHER_COLOUR = (0, 170, 60), (200, 200, 200)


def track_sheet(
    tracks: FaceTracks, out: str | os.PathLike[str], cols: int = 8, max_tracks: int = 12
) -> Path:
    """Write a PNG with one row per track (up to `cols` faces spread over it, chosen faces
    framed in green, the chosen track labelled) under a line saying the rule and its reason."""
    if len(tracks.frame_idx) == 0:
        raise ValueError("no faces to put on a contact sheet")
    s = tracks.crops.shape[1]
    counts = np.bincount(tracks.track_id, minlength=tracks.n_tracks)
    shown = sorted(np.argsort(-counts, kind="stable")[:max_tracks].tolist())
    if tracks.chosen_track >= 0 and tracks.chosen_track not in shown:
        shown[-1] = tracks.chosen_track
        shown.sort()
    label_w, cell, head = 150, s + 8, 30
    row_h = max(cell, 48)
    width = label_w + cols * cell + 4
    sheet = Image.new("RGB", (width, head + len(shown) * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(20, width // 6)
    header = f"select={tracks.select}: {tracks.select_reason}"
    draw.text((4, 2), header[:chars], fill=(0, 0, 0))
    draw.text((4, 14), header[chars : 2 * chars], fill=(0, 0, 0))
    hidden = tracks.n_tracks - len(shown)
    for row, t in enumerate(shown):
        y = head + row * row_h
        faces = np.flatnonzero(tracks.track_id == t)
        frames = tracks.frame_idx[faces]
        score = tracks.track_score[t]
        lines = [
            f"track {t}" + ("  CHOSEN" if t == tracks.chosen_track else ""),
            f"frames {frames.min()}-{frames.max()} ({len(faces)})",
            f"score r={score:.2f}" if np.isfinite(score) else "not scored",
        ]
        if row == len(shown) - 1 and hidden > 0:
            lines.append(f"(+{hidden} smaller tracks)")
        colour = CHOSEN_COLOUR if t == tracks.chosen_track else (0, 0, 0)
        for i, line in enumerate(lines):
            draw.text((4, y + 2 + 11 * i), line, fill=colour)
        pick = np.unique(np.linspace(0, len(faces) - 1, min(cols, len(faces))).round().astype(int))
        for c, i in enumerate(faces[pick]):
            x0 = label_w + c * cell
            frame = CHOSEN_COLOUR if tracks.chosen[i] else OTHER_COLOUR
            draw.rectangle([x0, y, x0 + cell - 3, y + cell - 3], fill=frame)
            sheet.paste(Image.fromarray(tracks.crops[i]), (x0 + 3, y + 3))
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
