"""Generated clips with several faces, for the face-track and speaking-face tests.

Two real faces: scikit-image's astronaut as the demo renders her (tasks/demo/media.py, whose
"open" expression at an intensity opens her mouth), and Grace Hopper's portrait that matplotlib
ships as sample data. Speech comes from espeak-ng as in the demo corpus.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tasks.demo.media import (
    FACE_BOX_PX,
    FACE_CENTER_XY,
    SPEECH_RATE_HZ,
    encode_clip,
    face_image,
    require_tools,
    speak,
    write_wav,
)

SIZE = 320  # square frames (encode_clip's format)
FPS = 12
# Grace Hopper's face in matplotlib's 512 x 600 sample photo: dlib HOG box (161, 137)-(376, 352).
HOPPER_CENTER_XY, HOPPER_BOX_PX = (268.5, 244.5), 215.0
SENTENCE = "你好，我们今天走吧。"


def hopper() -> np.ndarray:
    """Grace Hopper's portrait (RGB), from matplotlib's sample data."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        return np.asarray(im.convert("RGB"))


def place(
    src: np.ndarray, centre_src: tuple, box_src: float, centre: tuple, side: float, w: int, h: int
) -> np.ndarray:
    """`src` scaled so its face box is `side` px wide, its face centre at `centre` of a w x h
    canvas (edges replicated, never mirrored: a mirror would show a second face)."""
    m = cv2.getRotationMatrix2D(centre_src, 0.0, side / box_src)
    m[:, 2] += np.array(centre) - np.array(centre_src)
    return cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def astronaut(opening: float, centre: tuple, side: float, w: int, h: int) -> np.ndarray:
    """The demo's astronaut with her mouth `opening` (0 closed .. 1 open) placed on a canvas."""
    face = face_image("open", float(np.clip(opening, 0.0, 1.0)))
    return place(face, FACE_CENTER_XY, FACE_BOX_PX, centre, side, w, h)


def speech(lead_s: float = 0.4, tail_s: float = 0.4) -> np.ndarray:
    """espeak-ng Mandarin speech between silences, float32 at SPEECH_RATE_HZ."""
    espeak, _ = require_tools()
    voice = speak(espeak, SENTENCE, 50, 240)
    voice = 0.8 * voice / max(1e-6, float(np.abs(voice).max()))
    pad = np.zeros(round(lead_s * SPEECH_RATE_HZ), np.float32)
    end = np.zeros(round(tail_s * SPEECH_RATE_HZ), np.float32)
    return np.concatenate([pad, voice, end]).astype(np.float32)


def envelope(audio: np.ndarray, n_frames: int, fps: int = FPS) -> np.ndarray:
    """Per video frame: the speech's RMS over that frame's period, scaled to 0..1."""
    hop = SPEECH_RATE_HZ / fps
    rms = np.array(
        [
            np.sqrt(np.mean(audio[round(i * hop) : round((i + 1) * hop)] ** 2) + 1e-12)
            for i in range(n_frames)
        ]
    )
    return np.clip(rms / (0.6 * rms.max()), 0.0, 1.0)


def encode(
    path: Path, frames: Iterator[np.ndarray], audio: np.ndarray | None, n_frames: int
) -> Path:
    """Encode frames (and the audio, or silence) as the demo encodes its clips."""
    _, ffmpeg = require_tools()
    if audio is None:
        audio = np.zeros(round(n_frames / FPS * SPEECH_RATE_HZ), np.float32)
    raw = b"".join(f.tobytes() for f in frames)
    with tempfile.TemporaryDirectory(prefix="merflow-faces-test-") as tmp:
        wav = Path(tmp) / "a.wav"
        write_wav(wav, audio, SPEECH_RATE_HZ)
        encode_clip(ffmpeg, raw, wav, path, SIZE, FPS)
    return path


def two_faces_clip(path: Path, speaker_side: float = 84.0, still_side: float = 136.0) -> Path:
    """The astronaut (left, smaller) speaking: her mouth opens with the speech's loudness;
    Grace Hopper (right, larger) still. `largest` keeps Hopper, the wrong face."""
    audio = speech()
    n = round(len(audio) / SPEECH_RATE_HZ * FPS)
    opening = envelope(audio, n)
    still = place(hopper(), HOPPER_CENTER_XY, HOPPER_BOX_PX, (80, 150), still_side, 160, SIZE)

    def frames() -> Iterator[np.ndarray]:
        for k in range(n):
            left = astronaut(opening[k], (80, 150), speaker_side, 160, SIZE)
            yield np.ascontiguousarray(np.concatenate([left, still], axis=1))

    return encode(path, frames(), audio, n)


def clip_of(path: Path, n: int, frame: Callable[[int], np.ndarray]) -> Path:
    """A silent clip of `n` frames drawn by `frame(k)`."""
    return encode(path, (frame(k) for k in range(n)), None, n)
