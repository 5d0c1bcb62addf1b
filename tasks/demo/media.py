"""Render and encode one demo clip (tasks/demo/corpus.py plans them): espeak-ng Mandarin speech in
a voice of the clip's arousal, the astronaut's real face with the clip's expression, muxed into
an H.264 + AAC mp4 by ffmpeg. Nothing here knows the clip's class, only its cues."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.signal import lfilter

from tasks.engine.errors import MerflowError

SPEECH_RATE_HZ = 22050  # espeak-ng's output rate
AUDIO_OUT_RATE_HZ = 16000  # the mp4's AAC stream, MER-like and what the pipeline extracts
MAX_ESPEAK_RATE = 450
# The astronaut's face in skimage's 512x512 photo: dlib HOG box (179, 83)-(266, 170).
FACE_CENTER_XY = (222.5, 126.5)
FACE_BOX_PX = 87.0
EXPRESSIONS: tuple[str, ...] = ("none", "smile", "frown", "open")


class MissingToolError(MerflowError):
    """A system tool the demo corpus needs (espeak-ng, ffmpeg) is missing or broken."""


class DemoCorpusError(MerflowError):
    """Generating the demo corpus failed (bad parameters, an existing corpus, an encoder error)."""


@dataclass(frozen=True)
class Rendering:
    """How one clip looks and sounds: every random choice, drawn up front (by
    tasks/demo/corpus.py) so that the result is order-independent."""

    sentence: str
    # The voice: espeak-ng pitch (0-99) and rate (words/min), spectral tilt (vocal effort: > 0
    # brighter, < 0 duller) and peak level of the speech.
    pitch: int
    rate: int
    effort: float
    speech_peak: float
    expression: str  # one of EXPRESSIONS
    intensity: float  # how far the face goes from "none" towards its expression, 0..1
    lead_s: float
    tail_s: float
    face_frac: float  # face box width / frame width
    offset_xy: tuple[float, float]  # face centre offset from frame centre, fraction of width
    drift_xy: tuple[float, float]  # face centre drift over the clip, pixels
    angle_deg: float
    gains: tuple[float, float, float]  # per-clip white balance, the same for every class
    brightness: float
    phase: float
    noise_seed: int


@dataclass(frozen=True)
class ClipFormat:
    """Frame size, frame rate and the duration range shared by every clip of a corpus."""

    size: int = 256
    fps: int = 12
    min_seconds: float = 2.0
    max_seconds: float = 4.0


def require_tools() -> tuple[str, str]:
    """Paths of espeak-ng and ffmpeg; a missing one is named with how to install it."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise MissingToolError(
            "espeak-ng is not installed (the demo corpus speaks its sentences with it); "
            "install the Debian/Ubuntu package with `apt-get install espeak-ng`"
        )
    try:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise MissingToolError(
            f"no ffmpeg binary ({e}); install it with `pip install imageio-ffmpeg`"
        ) from e
    return espeak, ffmpeg


def speak(espeak: str, text: str, pitch: int, rate: int) -> np.ndarray:
    """Mandarin speech from espeak-ng (voice `cmn`), float32 mono at 22.05 kHz, silence trimmed."""
    cmd = [espeak, "-v", "cmn", "-p", str(pitch), "-s", str(rate), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise MissingToolError(
            f"espeak-ng failed for voice cmn ({proc.stderr.decode(errors='replace').strip()}); "
            "the Mandarin voice ships with the full package: `apt-get install espeak-ng`"
        )
    # --stdout writes a streaming WAV whose size fields are bogus: skip the 44-byte header.
    x = np.frombuffer(proc.stdout[44:], dtype="<i2").astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.005)
    return x[loud[0] : loud[-1] + 1] if loud.size else x


def vocal_effort(speech: np.ndarray, effort: float, rng: np.random.Generator) -> np.ndarray:
    """The voice quality of arousal. effort > 0: a tense, pressed voice (highs boosted, peaks
    driven into soft clipping); < 0: a lax, breathy one (highs muffled, breath noise that follows
    the loudness). Pitch and rate alone barely survive a random HuBERT's convolutions and mean
    pooling; the waveform's local shape does (docs/dependencies.md §7)."""
    e = min(abs(effort), 1.0)
    if effort > 0:
        x = lfilter([1.0, -0.9 * e], [1.0], speech)
        drive = 1.0 + 6.0 * e
        return (np.tanh(drive * x / max(1e-6, np.abs(x).max())) / np.tanh(drive)).astype(np.float32)
    if effort < 0:
        pole = 0.85 * e
        x = lfilter([1.0 - pole], [1.0, -pole], speech)
        x = x / max(1e-6, np.abs(x).max())
        loudness = lfilter([0.002], [1.0, -0.998], np.abs(x))  # ~20 ms envelope
        breath = rng.normal(0.0, 1.0, len(x)) * loudness / max(1e-6, loudness.max())
        return (x + 0.6 * e * breath).astype(np.float32)
    return speech


def render_audio(espeak: str, spec: Rendering, fmt: ClipFormat) -> np.ndarray:
    """Speech over a faint noise floor; length is a whole number of frames."""
    speech = speak(espeak, spec.sentence, spec.pitch, spec.rate)
    room = fmt.max_seconds - spec.lead_s - spec.tail_s
    if len(speech) > room * SPEECH_RATE_HZ:
        # Speak faster rather than cut the sentence, so the transcript stays true.
        rate = min(MAX_ESPEAK_RATE, int(spec.rate * len(speech) / (room * SPEECH_RATE_HZ) * 1.05))
        speech = speak(espeak, spec.sentence, spec.pitch, rate)
    rng = np.random.default_rng(spec.noise_seed)
    speech = vocal_effort(speech, spec.effort, rng)
    total_s = spec.lead_s + len(speech) / SPEECH_RATE_HZ + spec.tail_s
    total_s = float(np.clip(total_s, fmt.min_seconds, fmt.max_seconds))
    n_frames = max(1, round(total_s * fmt.fps))
    n = round(n_frames / fmt.fps * SPEECH_RATE_HZ)
    start = round(spec.lead_s * SPEECH_RATE_HZ)
    speech = speech[: max(0, n - start)] * (spec.speech_peak / max(1e-6, np.abs(speech).max()))
    fade = min(len(speech), SPEECH_RATE_HZ // 50)  # 20 ms, in case the speech was still cut
    speech[len(speech) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    out = rng.normal(0.0, 0.002, n)
    out[start : start + len(speech)] += speech
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@functools.cache
def face_template(expression: str) -> np.ndarray:
    """The astronaut photo (RGB, 512x512) showing `expression`: her own open smile for "smile";
    for the others the smile is painted out (inpainted skin) and a mouth and brows drawn."""
    from skimage import data

    if expression not in EXPRESSIONS:
        raise DemoCorpusError(f"unknown expression {expression!r}; valid: {EXPRESSIONS}")
    im = np.ascontiguousarray(data.astronaut())
    if expression != "smile":
        mask = np.zeros(im.shape[:2], np.uint8)
        cv2.ellipse(mask, (223, 146), (27, 12), 0, 0, 360, 255, -1)
        im = cv2.inpaint(im, mask, 5, cv2.INPAINT_TELEA)
    aa, lip, dark, brow = cv2.LINE_AA, (165, 95, 95), (95, 45, 45), (80, 55, 40)
    if expression == "none":  # closed, relaxed lips
        cv2.ellipse(im, (223, 149), (15, 4), 0, 0, 180, lip, -1, aa)
        cv2.line(im, (207, 146), (239, 146), dark, 2, aa)
    elif expression == "frown":  # corners pulled down, inner brows raised and drawn together
        cv2.ellipse(im, (223, 153), (19, 8), 0, 180, 360, dark, 4, aa)
        cv2.line(im, (191, 92), (214, 84), brow, 2, aa)
        cv2.line(im, (259, 94), (237, 85), brow, 2, aa)
    elif expression == "open":  # the jaw dropped: a round, dark mouth
        # (Brows drawn lifted as well made OpenCV's Haar detector miss most of these faces.)
        cv2.ellipse(im, (223, 149), (9, 12), 0, 0, 360, (70, 25, 25), -1, aa)
        cv2.ellipse(im, (223, 149), (9, 12), 0, 0, 360, lip, 3, aa)
    im.setflags(write=False)
    return im


def face_image(expression: str, intensity: float) -> np.ndarray:
    """The template at `intensity`: a blend of the expressionless face and `expression`."""
    if expression == "none" or intensity >= 1.0:
        return face_template(expression)
    return cv2.addWeighted(
        face_template(expression), intensity, face_template("none"), 1.0 - intensity, 0.0
    )


def render_frames(spec: Rendering, n_frames: int, size: int, fps: int) -> Iterator[np.ndarray]:
    """The clip's RGB frames (size x size): the face cropped, scaled, drifting and wobbling."""
    src = face_image(spec.expression, spec.intensity)
    colour = np.array(spec.gains) * spec.brightness
    centre_out = np.array([0.5 + spec.offset_xy[0], 0.5 + spec.offset_xy[1]]) * size
    for i in range(n_frames):
        progress = i / max(1, n_frames - 1)
        wobble = np.sin(2 * np.pi * i / (1.7 * fps) + spec.phase)
        scale = spec.face_frac * size / FACE_BOX_PX * (1.0 + 0.015 * wobble)
        m = cv2.getRotationMatrix2D(FACE_CENTER_XY, spec.angle_deg + 0.8 * wobble, scale)
        m[:, 2] += centre_out + progress * np.array(spec.drift_xy) - np.array(FACE_CENTER_XY)
        frame = cv2.warpAffine(
            src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        yield np.clip(frame * colour, 0, 255).astype(np.uint8)


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """16-bit mono WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((audio * 32767.0).round().astype("<i2").tobytes())


def encode_clip(ffmpeg: str, frames: bytes, wav: Path, out: Path, size: int, fps: int) -> None:
    """Mux raw RGB frames and a wav into H.264 yuv420p + AAC mp4, reproducibly."""
    tmp = out.with_name(out.name + ".partial")
    cmd = [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}", "-r", str(fps), "-i", "-",
        "-i", str(wav),
        "-map", "0:v", "-map", "1:a", "-map_metadata", "-1",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
        "-threads", "1",  # one encoder thread: clips run in parallel, and output stays bit-exact
        "-c:a", "aac", "-b:a", "48k", "-ar", str(AUDIO_OUT_RATE_HZ), "-ac", "1",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
        "-f", "mp4", str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, input=frames, capture_output=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise DemoCorpusError(
            f"ffmpeg failed to encode {out.name} (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()[-800:]}"
        )
    tmp.replace(out)


def render_clip(spec: Rendering, out: Path, tools: tuple[str, str], fmt: ClipFormat) -> float:
    """Render and encode one clip to `out`; returns its duration in seconds."""
    espeak, ffmpeg = tools
    audio = render_audio(espeak, spec, fmt)
    n_frames = round(len(audio) / SPEECH_RATE_HZ * fmt.fps)
    frames = b"".join(f.tobytes() for f in render_frames(spec, n_frames, fmt.size, fmt.fps))
    with tempfile.TemporaryDirectory(prefix="merflow-demo-") as tmp:
        wav = Path(tmp) / f"{out.stem}.wav"
        write_wav(wav, audio, SPEECH_RATE_HZ)
        encode_clip(ffmpeg, frames, wav, out, fmt.size, fmt.fps)
    return n_frames / fmt.fps
