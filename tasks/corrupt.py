"""Corruptions of raw video for robustness scoring (MER-NOISE style): noise added to the audio at
a signal-to-noise ratio, and the frames blurred, downscaled or dropped before faces are found.

A corruption is a setting of a raw-video stage, not a separate copy of the corpus: the audio
stage (tasks/media.py) mixes the noise into the wav it splits, the faces stage
(tasks/faces/crop.py) corrupts each decoded frame before its backend sees it. Its id enters the
stage's extractor id, so the corrupted wavs, crops and every feature computed from them are
rows of their own beside the clean ones (never overwriting them), cached and resumed like any
stage. The noise and the dropped frames are drawn from a generator seeded by the video's id and
bytes (its artifact's name) and the corruption, so a rerun writes the same media.

Levels are written `KIND:LEVEL` (`noise:10`: white noise at 10 dB SNR):

    noise  white Gaussian noise, LEVEL = SNR in dB          (audio)
    pink   pink (1/f) noise, LEVEL = SNR in dB              (audio)
    blur   Gaussian blur, LEVEL = sigma in pixels of the frame   (video)
    down   MER-NOISE's blur: LEVEL (2, 4, 8, ...) = 2^k, the frame taken k times down and k
           times back up its Gaussian pyramid (cv2.pyrDown, cv2.pyrUp)   (video)
    drop   LEVEL percent of the sampled frames dropped           (video)

The challenge baseline's MER-NOISE recipe mixes recordings from a noise corpus at an SNR drawn
per video from 5..10 dB and blurs with its pyramid at a rate drawn from 1, 2, 4; merflow uses
fixed levels (a curve, not one draw) and noise it generates (nothing is downloaded). The SNR is
defined as the baseline defines it: the clip's RMS over the noise's, over the whole clip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Bump when a corruption's output changes for the same level, so old media are not reused.
CORRUPTION_VERSION = 1
AUDIO_KINDS = ("noise", "pink")
VIDEO_KINDS = ("blur", "down", "drop")
CLEAN = "clean"
# The levels `merflow robustness` scores when none are given: SNRs around MER-NOISE's 5..10 dB,
# and its pyramid blur at rates 2 and 4.
DEFAULT_LEVELS = ("noise:20", "noise:10", "noise:5", "noise:0", "down:2", "down:4")
_LIMITS = {
    "noise": (-20.0, 60.0),
    "pink": (-20.0, 60.0),
    "blur": (0.1, 50.0),
    "down": (2.0, 32.0),
    "drop": (1.0, 99.0),
}
_UNITS = {"noise": "dB SNR", "pink": "dB SNR", "blur": "px sigma", "down": "x", "drop": "%"}


class CorruptionError(ValueError):
    """A level that is not `KIND:LEVEL` of a known kind in its range."""


@dataclass(frozen=True, order=True)
class Corruption:
    """One corruption at one level, e.g. Corruption("noise", 10.0): white noise at 10 dB SNR."""

    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in _LIMITS:
            raise CorruptionError(
                f"unknown corruption {self.kind!r}; choose one of {', '.join(_LIMITS)} "
                f"(written KIND:LEVEL, e.g. noise:10)"
            )
        lo, hi = _LIMITS[self.kind]
        if self.kind == "down" and not _power_of_two(self.level):
            raise CorruptionError(
                f"down:{self.level:g} is not a power of two; down takes 2, 4, 8, 16 or 32 (the "
                "frame goes log2(LEVEL) times down and back up its Gaussian pyramid)"
            )
        if not lo <= self.level <= hi:
            raise CorruptionError(
                f"{self.kind}:{self.level:g} is out of range; {self.kind} takes {lo:g}..{hi:g} "
                f"({_UNITS[self.kind]})"
            )

    @property
    def modality(self) -> str:
        """What the corruption touches: `audio` or `video`."""
        return "audio" if self.kind in AUDIO_KINDS else "video"

    @property
    def name(self) -> str:
        """As written on the command line: `noise:10`."""
        return f"{self.kind}:{self.level:g}"

    @property
    def id(self) -> str:
        """The part of an extractor id it adds: `corrupt-noise10-v1`."""
        return f"corrupt-{self.kind}{self.level:g}-v{CORRUPTION_VERSION}"

    @property
    def label(self) -> str:
        """For tables and plots: `noise 10 dB SNR`."""
        return f"{self.kind} {self.level:g} {_UNITS[self.kind]}"

    def rng(self, key: str) -> np.random.Generator:
        """The generator of one video's noise or dropped frames, from `key` (its artifact's
        name: the video's id and bytes' hash): the same on every rerun."""
        seed = hashlib.sha256(f"{key}/{self.id}".encode()).digest()[:8]
        return np.random.default_rng(int.from_bytes(seed, "little"))


def _power_of_two(x: float) -> bool:
    return float(x).is_integer() and x >= 1 and not int(x) & (int(x) - 1)


def parse_level(text: str) -> Corruption:
    """`noise:10` -> Corruption("noise", 10.0); the error says what is accepted."""
    kind, sep, level = text.strip().partition(":")
    try:
        value = float(level)
    except ValueError:
        value = None
    if not sep or value is None or not np.isfinite(value):
        raise CorruptionError(
            f"level {text!r} is not KIND:LEVEL; write e.g. noise:10 (dB SNR), blur:2 (pixels), "
            f"down:4, drop:25 (percent); kinds: {', '.join(_LIMITS)}"
        )
    return Corruption(kind.strip().lower(), value)


def parse_levels(texts: Iterable[str]) -> list[Corruption]:
    """Levels from the command line or a deployment's form: each item `KIND:LEVEL` or several
    levels of one kind `KIND:L1,L2,...` (`default`: DEFAULT_LEVELS); sorted by kind then
    severity, duplicates once."""
    out: set[Corruption] = set()
    kind = ""
    for text in texts:
        for item in str(text).replace(" ", ",").split(","):
            if not item:
                continue
            if item == "default":
                out.update(parse_level(d) for d in DEFAULT_LEVELS)
                continue
            if ":" not in item and kind:  # `noise:20,10`: 10 continues the previous kind
                item = f"{kind}:{item}"
            c = parse_level(item)
            kind = c.kind
            out.add(c)
    if not out:
        raise CorruptionError("no corruption level given; e.g. --levels noise:20,10,5,0 blur:2")
    return sorted(out, key=severity_order)


def severity_order(c: Corruption) -> tuple[str, float]:
    """Kind, then from mild to severe (a lower SNR is more severe)."""
    return c.kind, -c.level if c.modality == "audio" else c.level


# -- audio ----------------------------------------------------------------------------------------
def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Pink (1/f power) noise: white noise shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(f), n)


def add_noise(x: np.ndarray, c: Corruption, rng: np.random.Generator) -> np.ndarray:
    """`x` (float mono samples in [-1, 1]) with noise at `c.level` dB SNR: the noise's power is
    the clip's mean power (speech and pauses alike) over 10^(SNR/10). A mix that would clip is
    scaled down as a whole, which keeps the SNR. A silent clip stays silent (no signal to
    measure the noise against)."""
    x = np.asarray(x, np.float64)
    power = float(np.mean(x**2)) if x.size else 0.0
    if power == 0.0:
        return x.astype(np.float32)
    noise = rng.standard_normal(x.size) if c.kind == "noise" else _pink(x.size, rng)
    # Without its chance correlation with the clip (about 1/sqrt(n) of it), so that the SNR is
    # exact however it is measured, with or without a gain.
    noise -= (noise @ x) / (x @ x) * x
    noise *= np.sqrt(power / 10 ** (c.level / 10) / np.mean(noise**2))
    mix = x + noise
    peak = float(np.abs(mix).max())
    if peak > 0.999:
        mix *= 0.999 / peak
    return mix.astype(np.float32)


# -- video ----------------------------------------------------------------------------------------
class FrameCorruptor:
    """Corrupts one video's decoded frames in order (RGB uint8); None: the frame is dropped."""

    def __init__(self, c: Corruption, key: str) -> None:
        if c.modality != "video":
            raise CorruptionError(f"{c.name} corrupts audio, not frames")
        self.c, self._rng = c, c.rng(key)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        import cv2

        c = self.c
        if c.kind == "drop":
            return None if self._rng.random() < c.level / 100 else rgb
        if c.kind == "blur":
            return cv2.GaussianBlur(rgb, (0, 0), sigmaX=c.level, sigmaY=c.level)
        sizes = []
        for _ in range(int(c.level).bit_length() - 1):  # log2(level) octaves
            sizes.append((rgb.shape[1], rgb.shape[0]))
            rgb = cv2.pyrDown(rgb)
        for size in reversed(sizes):  # back up to each octave's own size
            rgb = cv2.pyrUp(rgb, dstsize=size)
        return rgb
