"""The faces stage's settings, declared once: the profile's `faces:` section is this type
(flows/config.py), and the flow, `merflow task crop-faces` and the benchmarks build it from the
profile. Light on purpose (no video, model or table library), so the settings load fast.

The extractor id hashes every setting that changes the crops (`faces_extractor_id`); the others
(where the OpenFace binary is, worker processes, decoder threads, the fallback backend) do not
enter it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict

from tasks.corrupt import Corruption

BACKENDS: tuple[str, ...] = ("dlib", "opencv", "openface")
SELECT_RULES: tuple[str, ...] = ("largest", "speaking")
RECIPES: tuple[str, ...] = ("merflow", "mertools")
DEFAULT_DETECT_MAX_SIDE = 640
DEFAULT_PADDING = 0.25
# HOG scores just above dlib's default threshold (0) are often texture, and "largest face"
# would then prefer a large false face over the real one; real frontal faces score ~0.5 to 2.
DLIB_MIN_SCORE = 0.2
# Each backend's detection thresholds, as its code uses them; recorded in the provenance of the
# visual features computed from its crops.
THRESHOLDS: dict[str, dict[str, float | int | bool]] = {
    "dlib": {"min_hog_score": DLIB_MIN_SCORE, "upsample_small_frames": True},
    "opencv": {"scale_factor": 1.1, "min_neighbors": 5, "min_face_side_fraction": 0.125},
    "openface": {"nobadaligned": True},
}
# Per backend, detection on every sampled frame: bump when a code change alters its crops for
# the same settings, so old artifacts are not reused. (dlib was 2 for a while, detecting on a grey
# copy; detecting on colour again gives version 1's crops, so it is 1 again.)
FACES_CODE_VERSION: dict[str, int] = {"dlib": 1, "opencv": 1, "openface": 1}
# dlib with detect_every k > 1 (tasks/faces/track.py), keyed into those ids only. 2: grey
# detection; detection on every k-th frame while no face is followed; confirmations that look
# only for the followed faces' sizes. 3: detection on the colour frame again, the rest as 2.
# 4: tracked boxes snapped to the detector's window grid, landmarks fitted in the box recorded;
# two detections that disagree are bisected; no pruned confirmation that prunes nothing.
TRACKING_CODE_VERSION = 4
# Bump when the speaking-face choice (tasks/faces/speaker.py) can change for the same faces and
# audio.
SPEAKING_RULE_VERSION = 2


def _rate_name(fps: float | None, max_frames: int | None) -> str:
    """How frames are sampled, in words: `all`, `5fps`, `max30`, `5fps-max30`."""
    parts = ([f"{fps:g}fps"] if fps is not None else []) + (
        [f"max{max_frames}"] if max_frames is not None else []
    )
    return "-".join(parts) or "all"


def _id_settings(
    backend: str,
    size: int,
    fps: float | None,
    max_frames: int | None,
    detect: int,
    padding: float,
    detect_every: int = 1,
    select: str = "largest",
    recipe: str = "merflow",
    corruption: Corruption | None = None,
) -> dict[str, Any]:
    # Settings at their defaults (detection on every frame, the largest face) stay out of the
    # hash: a stored faces table keeps its id as long as its crops would be the same.
    tracked = (
        {"detect_every": detect_every, "tracking": TRACKING_CODE_VERSION}
        if detect_every > 1 and backend == "dlib"
        else {}
    )
    chosen = {"select": select} if select != "largest" else {}
    if select == "speaking":
        chosen["speaking_rule"] = SPEAKING_RULE_VERSION
    # The baseline's OpenFace crops (masked, failed frames kept); other backends have one recipe.
    baseline = {"recipe": recipe} if recipe != "merflow" and backend == "openface" else {}
    # Frames corrupted for robustness scoring (tasks/corrupt.py): crops of their own.
    corrupted = {"corruption": corruption.id} if corruption is not None else {}
    return {
        **baseline,
        **corrupted,
        **tracked,
        **chosen,
        "backend": backend,
        "size": size,
        "fps": fps,
        "max_frames": max_frames,
        # The OpenFace binary does its own detection and framing; these do not change its crops.
        "detect_max_side": None if backend == "openface" else detect,
        "padding": None if backend == "openface" else padding,
        "code": FACES_CODE_VERSION.get(backend, 1),
    }


def faces_extractor_id(
    backend: str = "dlib",
    size: int = 112,
    fps: float | None = None,
    max_frames: int | None = None,
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE,
    padding: float = DEFAULT_PADDING,
    detect_every: int = 1,
    select: str = "largest",
    recipe: str = "merflow",
    corruption: Corruption | None = None,
) -> str:
    """A readable name plus a short hash of all output-changing settings: `faces-dlib-112-all-…`
    (`…+corrupt-blur2-v1` for frames corrupted for robustness scoring)."""
    settings = _id_settings(
        backend,
        size,
        fps,
        max_frames,
        detect_max_side,
        padding,
        detect_every,
        select,
        recipe,
        corruption,
    )
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    name = f"faces-{backend}-{size}-{_rate_name(fps, max_frames)}-{digest}"
    return name + (f"+{corruption.id}" if corruption is not None else "")


@dataclass(frozen=True)
class FaceSettings:
    """How to crop faces: backend, crop size, sampling, and the backends' knobs (the profile's
    `faces:` section; unknown keys are refused)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    backend: Literal["dlib", "opencv", "openface"] = "dlib"
    size: int = 112  # the paper's (and OpenFace's -simsize) 112 x 112 aligned faces
    fps: float | None = None  # None: every frame, as the paper
    max_frames: int | None = None
    detect_max_side: int = DEFAULT_DETECT_MAX_SIDE  # detect on a copy no larger than this
    padding: float = DEFAULT_PADDING  # margin around the face, as dlib's get_face_chip
    openface_bin: str | None = None  # path of FeatureExtraction (a location, not an output knob)
    # dlib: run the detector on every k-th sampled frame and track the landmarks between
    # (tasks/faces/track.py LandmarkTracker); 1: detect on every frame.
    detect_every: int = 1
    decode_threads: int = 0  # PyAV decoder threads; 0: automatic (for_workers)
    # Which faces the crops keep: "largest", the largest face of each frame;
    # "speaking", the track whose mouth follows the speech (tasks/faces/speaker.py).
    select: Literal["largest", "speaking"] = "largest"
    # Worker processes that crop a shard's videos side by side, off the GIL of the process that
    # runs the model stages (tasks/engine/video_pool.py); None: every core, 0: in this process.
    processes: int | None = None
    # OpenFace only: "mertools" runs it with its defaults as the challenge baseline does (the
    # background masked, failed frames kept as black crops); "merflow": unmasked, failed dropped.
    recipe: Literal["merflow", "mertools"] = "merflow"
    # The backend used instead when `backend` cannot load here (openface without its binary);
    # the run says so once and the extractor id records the backend used (flows/plan.py
    # face_settings). None: an error.
    fallback: Literal["dlib", "opencv"] | None = None
    # Robustness scoring: each decoded frame blurred, downscaled or dropped before the backend
    # sees it (tasks/corrupt.py); None for the clean crops.
    corruption: Corruption | None = None

    def __post_init__(self) -> None:
        if self.corruption is not None and self.corruption.modality != "video":
            raise ValueError(f"faces take video corruptions, not {self.corruption.name}")
        if self.corruption is not None and self.backend == "openface":
            raise ValueError(
                f"{self.corruption.name} corrupts the frames merflow decodes, and OpenFace decodes "
                "the video itself; score robustness of video corruptions on a run whose faces came "
                "from faces.backend=dlib or opencv, or give audio levels only"
            )
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown faces recipe {self.recipe!r}; choose merflow or mertools")
        if self.recipe == "mertools" and self.backend == "openface" and self.select != "largest":
            # A failed frame (kept black, no box) would start a track of its own and be dropped
            # by the speaking-face rule, undoing the recipe; OpenFace follows one face anyway.
            raise ValueError(
                f"faces.recipe=mertools keeps OpenFace's one face in every frame, failed ones "
                f"included, as the challenge baseline did; it needs faces.select=largest, not "
                f"{self.select!r} (or use faces.recipe=merflow)"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown face backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.fallback is not None and self.fallback not in BACKENDS:
            raise ValueError(
                f"unknown fallback face backend {self.fallback!r}; choose dlib, opencv or none"
            )
        if self.select not in SELECT_RULES:
            raise ValueError(
                f"unknown face selection {self.select!r}; choose one of {', '.join(SELECT_RULES)}"
            )
        if not 16 <= self.size <= 1024:
            raise ValueError(f"crop size {self.size} is out of range; use 16..1024 (paper: 112)")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive or None (every frame), got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None (no cap), got {self.max_frames}")
        if self.detect_max_side < 64:
            raise ValueError(f"detect_max_side {self.detect_max_side} is too small; use >= 64")
        if self.detect_every < 1:
            raise ValueError(
                f"detect_every must be >= 1 (1: detect on every frame), got {self.detect_every}"
            )
        if self.processes is not None and self.processes < 0:
            raise ValueError(
                f"processes must be >= 0 (0: in this process) or None (every core), got "
                f"{self.processes}"
            )
        if self.decode_threads < 0:
            raise ValueError(
                f"decode_threads must be >= 0 (0: automatic), got {self.decode_threads}"
            )
        if not 0 <= self.padding <= 2:
            raise ValueError(f"padding {self.padding} is out of range; use 0..2 (default 0.25)")

    @property
    def _id_args(self) -> tuple:
        """The settings that change the crops, in faces_extractor_id's order."""
        return (
            self.backend,
            self.size,
            self.fps,
            self.max_frames,
            self.detect_max_side,
            self.padding,
            self.detect_every,
            self.select,
            self.recipe,
            self.corruption,
        )

    @property
    def extractor_id(self) -> str:
        """The extractor id of these settings (keys the faces table and the artifact folder)."""
        return faces_extractor_id(*self._id_args)

    @property
    def thresholds(self) -> dict[str, Any]:
        """The backend's thresholds as these settings run it (OpenFace's mertools recipe keeps
        the frames it aligned badly, and masks the background)."""
        if self.backend == "openface" and self.recipe == "mertools":
            return {"nobadaligned": False, "mask": True}
        return dict(THRESHOLDS[self.backend])

    def provenance(self) -> dict[str, Any]:
        """What the visual features computed from these crops record about them."""
        return {
            "faces_extractor_id": self.extractor_id,
            "faces_settings": _id_settings(*self._id_args),
            "face_backend": self.backend,
            "face_thresholds": self.thresholds,
            "faces_recipe": self.recipe if self.backend == "openface" else "merflow",
            "face_select": self.select,
            "crop_size": self.size,
            "frame_rate": self.fps,
            "max_frames": self.max_frames,
            "frame_sampling": _rate_name(self.fps, self.max_frames),  # "all": every frame
        }
