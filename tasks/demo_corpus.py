"""Generate a small MER2024-shaped demo corpus: real face, real Chinese speech, transcripts.

The emotion label is learnable from every modality, even through tiny random networks
(see docs/dependencies.md §7): the face gets a class tint and a mouth/brow change, the audio
a faint class-specific tone under espeak-ng speech whose pitch and rate depend on the class, and
the transcript uses class-specific wording. A scrambled join of features and labels therefore
drops accuracy to chance, which is what the end-to-end tests rely on.

Besides MER's files (`video-labeled/`, `video-unlabeled/`, `label-disdim.csv`,
`label-transcription.csv`) it writes `demo-truth.csv` (`name`, `discrete`, `pool`): the hidden
class of every clip, unlabelled ones included, so tests can score pseudo-labels. It is demo-only;
MER has no such file.
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
import subprocess
import tempfile
import time
import wave
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.labels import CLASSES
from tasks.errors import MerflowError

LABELED_DIR = "video-labeled"
UNLABELED_DIR = "video-unlabeled"
LABELS_CSV = "label-disdim.csv"
TRANSCRIPTS_CSV = "label-transcription.csv"
TRUTH_CSV = "demo-truth.csv"

# MER2024 Train&Val class counts (docs/method.md §1): the demo keeps their proportions.
MER_TRAIN_COUNTS: dict[str, int] = {
    "neutral": 1248,
    "angry": 1208,
    "happy": 1038,
    "sad": 730,
    "worried": 616,
    "surprise": 190,
}

# Class-specific wording; the prefixes are class-neutral and only add variety.
SENTENCES: dict[str, tuple[str, ...]] = {
    "neutral": (
        "今天下午三点开会。",
        "文件放在桌子上了。",
        "明天是星期三。",
        "我们坐地铁去吧。",
        "这个报告写完了。",
    ),
    "angry": (
        "你太过分了！",
        "别再烦我了！",
        "我真的很生气！",
        "你怎么又迟到了！",
        "气死我了！",
    ),
    "happy": (
        "太好了，真开心！",
        "我好高兴啊！",
        "哈哈，太棒了！",
        "今天真快乐！",
        "我们赢了，太好了！",
    ),
    "sad": (
        "我好难过。",
        "他走了，我很伤心。",
        "我心里好痛苦。",
        "我真的想哭。",
        "一切都失去了。",
    ),
    "worried": (
        "我很担心他。",
        "怎么办，来不及了。",
        "我有点不安。",
        "万一出事了怎么办？",
        "我害怕考不过。",
    ),
    "surprise": (
        "天哪，真的吗？",
        "哇，没想到！",
        "什么？这不可能！",
        "居然是你！",
        "真让人吃惊！",
    ),
}
PREFIXES: tuple[str, ...] = ("", "", "小王，", "老师，", "妈，", "你听我说，")

# espeak-ng pitch (0-99) and rate (words per minute) per class; jittered per clip.
VOICE: dict[str, tuple[int, int]] = {
    "neutral": (45, 230),
    "angry": (62, 290),
    "happy": (72, 270),
    "sad": (28, 200),
    "worried": (40, 215),
    "surprise": (85, 260),
}
# The faint tone under the speech, one frequency per class (Hz); survives random convolutions.
# Above speech's strong low harmonics (a 440 Hz tone drowned in a high voice), below 8 kHz.
TONE_HZ: dict[str, float] = {
    "neutral": 1500.0,
    "angry": 2100.0,
    "happy": 2900.0,
    "sad": 3900.0,
    "worried": 5000.0,
    "surprise": 6300.0,
}
# Per-class RGB gain on the whole frame; per-clip colour jitter stays well below these offsets.
TINT: dict[str, tuple[float, float, float]] = {
    "neutral": (1.0, 1.0, 1.0),
    "angry": (1.16, 0.88, 0.88),
    "happy": (1.10, 1.06, 0.80),
    "sad": (0.84, 0.92, 1.18),
    "worried": (0.90, 1.12, 0.94),
    "surprise": (1.10, 0.86, 1.12),
}

SPEECH_RATE_HZ = 22050  # espeak-ng's output rate
AUDIO_OUT_RATE_HZ = 16000  # the mp4's AAC stream, MER-like and what the pipeline extracts
MAX_ESPEAK_RATE = 450
# The astronaut's face in skimage's 512x512 photo: dlib HOG box (179, 83)-(266, 170).
FACE_CENTER_XY = (222.5, 126.5)
FACE_BOX_PX = 87.0


class MissingToolError(MerflowError):
    """A system tool the demo corpus needs (espeak-ng, ffmpeg) is missing or broken."""


class DemoCorpusError(MerflowError):
    """Generating the demo corpus failed (bad parameters, an existing corpus, an encoder error)."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything random about one clip, drawn up front so the result is order-independent."""

    name: str
    pool: str  # "labeled" or "unlabeled"
    label: str
    sentence: str
    pitch: int
    rate: int
    tone_hz: float
    tone_amp: float
    speech_peak: float
    lead_s: float
    tail_s: float
    face_frac: float  # face box width / frame width
    offset_xy: tuple[float, float]  # face centre offset from frame centre, fraction of width
    drift_xy: tuple[float, float]  # face centre drift over the clip, pixels
    angle_deg: float
    flip: bool
    gains: tuple[float, float, float]
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


@dataclass(frozen=True)
class DemoClip:
    """One generated clip: its file, pool, true class and transcript."""

    name: str
    pool: str
    label: str
    transcript: str
    path: Path
    duration_s: float


@dataclass(frozen=True)
class DemoCorpus:
    """Paths and counts of a generated demo corpus."""

    root: Path
    labeled_dir: Path
    unlabeled_dir: Path
    labels_csv: Path
    transcripts_csv: Path
    truth_csv: Path
    n_labeled: int
    n_unlabeled: int
    labeled_counts: dict[str, int]
    unlabeled_counts: dict[str, int]
    clips: tuple[DemoClip, ...]
    seed: int
    seconds: float


def class_counts(n: int, weights: dict[str, int] | None = None) -> dict[str, int]:
    """Split n clips over CLASSES in MER's proportions and order; none empty once n >= 6."""
    if n < 0:
        raise DemoCorpusError(f"clip count must be >= 0, got {n}")
    w = np.array([(weights or MER_TRAIN_COUNTS)[c] for c in CLASSES], dtype=float)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    # Largest remainder; ties go to the earlier (bigger) class.
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= len(CLASSES):
        while (counts == 0).any():
            counts[int(np.argmax(counts))] -= 1
            counts[int(np.argmin(counts))] += 1
    # MER's order: neutral > angry > happy > sad > worried > surprise.
    counts = np.sort(counts)[::-1]
    if n >= 21:  # enough clips for a strict order (6+5+...+1): break rounding ties downwards
        while ties := [i for i in range(len(CLASSES) - 1) if counts[i] <= counts[i + 1]]:
            counts[ties[0]] += 1
            counts[ties[0] + 1] -= 1
    return {c: int(k) for c, k in zip(CLASSES, counts, strict=True)}


def plan_corpus(n_labeled: int, n_unlabeled: int, seed: int) -> list[ClipSpec]:
    """Draw every clip's class and variation from one seeded generator."""
    rng = np.random.default_rng(seed)
    labels = {}
    for pool, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled)):
        pool_labels = [c for c, k in class_counts(n).items() for _ in range(k)]
        labels[pool] = [pool_labels[i] for i in rng.permutation(n)]
    # MER ids interleave the pools; so do ours, so that no code may assume contiguous ranges.
    ids = rng.permutation(n_labeled + n_unlabeled) + 1
    pools = ["labeled"] * n_labeled + ["unlabeled"] * n_unlabeled
    classes = labels["labeled"] + labels["unlabeled"]
    specs = []
    for sample_id, pool, label in zip(ids, pools, classes, strict=True):
        pitch, rate = VOICE[label]
        sentence = (
            PREFIXES[rng.integers(len(PREFIXES))]
            + SENTENCES[label][rng.integers(len(SENTENCES[label]))]
        )
        specs.append(
            ClipSpec(
                name=f"sample_{int(sample_id):08d}",
                pool=pool,
                label=label,
                sentence=sentence,
                pitch=int(np.clip(pitch + rng.integers(-6, 7), 0, 99)),
                rate=int(rate * rng.uniform(0.92, 1.08)),
                tone_hz=TONE_HZ[label] * rng.uniform(0.985, 1.015),
                tone_amp=0.04 * rng.uniform(0.8, 1.2),
                speech_peak=rng.uniform(0.45, 0.7),
                lead_s=rng.uniform(0.1, 0.35),
                tail_s=rng.uniform(0.15, 0.4),
                face_frac=rng.uniform(0.45, 0.58),
                offset_xy=(rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.05)),
                drift_xy=(rng.uniform(-8, 8), rng.uniform(-6, 6)),
                angle_deg=rng.uniform(-5, 5),
                flip=bool(rng.integers(2)),
                gains=tuple(float(g) for g in rng.uniform(0.96, 1.04, 3)),
                brightness=rng.uniform(0.85, 1.12),
                phase=rng.uniform(0, 2 * np.pi),
                noise_seed=int(rng.integers(2**31)),
            )
        )
    return specs


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


def render_audio(espeak: str, spec: ClipSpec, fmt: ClipFormat) -> np.ndarray:
    """Speech + the class tone + a faint noise floor; length is a whole number of frames."""
    speech = speak(espeak, spec.sentence, spec.pitch, spec.rate)
    room = fmt.max_seconds - spec.lead_s - spec.tail_s
    if len(speech) > room * SPEECH_RATE_HZ:
        # Speak faster rather than cut the sentence, so the transcript stays true.
        rate = min(MAX_ESPEAK_RATE, int(spec.rate * len(speech) / (room * SPEECH_RATE_HZ) * 1.05))
        speech = speak(espeak, spec.sentence, spec.pitch, rate)
    total_s = spec.lead_s + len(speech) / SPEECH_RATE_HZ + spec.tail_s
    total_s = float(np.clip(total_s, fmt.min_seconds, fmt.max_seconds))
    n_frames = max(1, round(total_s * fmt.fps))
    n = round(n_frames / fmt.fps * SPEECH_RATE_HZ)
    start = round(spec.lead_s * SPEECH_RATE_HZ)
    speech = speech[: max(0, n - start)] * (spec.speech_peak / max(1e-6, np.abs(speech).max()))
    fade = min(len(speech), SPEECH_RATE_HZ // 50)  # 20 ms, in case the speech was still cut
    speech[len(speech) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    t = np.arange(n) / SPEECH_RATE_HZ
    out = spec.tone_amp * np.sin(2 * np.pi * spec.tone_hz * t)
    out += np.random.default_rng(spec.noise_seed).normal(0.0, 0.002, n)
    out[start : start + len(speech)] += speech
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@functools.cache
def face_template(label: str) -> np.ndarray:
    """The astronaut photo (RGB, 512x512) with the class's mouth and brow change drawn on it."""
    from skimage import data

    im = np.ascontiguousarray(data.astronaut())
    aa, dark, brow = cv2.LINE_AA, (70, 35, 30), (55, 38, 30)
    if label == "angry":  # lowered, frowning brows and a pressed mouth
        cv2.line(im, (186, 86), (214, 97), brow, 5, aa)
        cv2.line(im, (262, 86), (234, 97), brow, 5, aa)
        cv2.line(im, (205, 146), (241, 146), dark, 4, aa)
    elif label == "happy":  # a wide open smile
        cv2.ellipse(im, (223, 143), (22, 11), 0, 0, 180, (245, 240, 230), -1, aa)
        cv2.ellipse(im, (223, 143), (22, 11), 0, 0, 180, dark, 3, aa)
    elif label == "sad":  # turned-down mouth, brows rising inwards
        cv2.ellipse(im, (223, 156), (19, 9), 0, 180, 360, dark, 4, aa)
        cv2.line(im, (190, 88), (214, 84), brow, 4, aa)
        cv2.line(im, (258, 88), (234, 84), brow, 4, aa)
    elif label == "worried":  # wavering mouth, brows raised inwards
        pts = np.array([[204, 148], [212, 144], [220, 149], [228, 144], [236, 149], [243, 145]])
        cv2.polylines(im, [pts.astype(np.int32)], False, dark, 3, aa)
        cv2.line(im, (190, 92), (214, 83), brow, 4, aa)
        cv2.line(im, (258, 92), (234, 83), brow, 4, aa)
    elif label == "surprise":  # an open, round mouth
        cv2.ellipse(im, (223, 149), (10, 13), 0, 0, 360, (40, 15, 15), -1, aa)
        cv2.ellipse(im, (223, 149), (10, 13), 0, 0, 360, (150, 70, 70), 2, aa)
    im.setflags(write=False)
    return im


def render_frames(spec: ClipSpec, n_frames: int, size: int, fps: int) -> Iterator[np.ndarray]:
    """The clip's RGB frames (size x size): cropped, scaled, drifting, tinted face."""
    src = face_template(spec.label)
    colour = np.array(TINT[spec.label]) * np.array(spec.gains) * spec.brightness
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
        if spec.flip:
            frame = frame[:, ::-1]
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


def generate_clip(spec: ClipSpec, out: Path, tools: tuple[str, str], fmt: ClipFormat) -> DemoClip:
    """Render and encode one clip."""
    espeak, ffmpeg = tools
    audio = render_audio(espeak, spec, fmt)
    n_frames = round(len(audio) / SPEECH_RATE_HZ * fmt.fps)
    frames = b"".join(f.tobytes() for f in render_frames(spec, n_frames, fmt.size, fmt.fps))
    with tempfile.TemporaryDirectory(prefix="merflow-demo-") as tmp:
        wav = Path(tmp) / f"{spec.name}.wav"
        write_wav(wav, audio, SPEECH_RATE_HZ)
        encode_clip(ffmpeg, frames, wav, out, fmt.size, fmt.fps)
    return DemoClip(spec.name, spec.pool, spec.label, spec.sentence, out, n_frames / fmt.fps)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def _check_params(n_labeled: int, n_unlabeled: int, fmt: ClipFormat) -> None:
    size, fps, min_s, max_s = fmt.size, fmt.fps, fmt.min_seconds, fmt.max_seconds
    if n_labeled < 0 or n_unlabeled < 0 or n_labeled + n_unlabeled == 0:
        raise DemoCorpusError(
            f"need a positive number of clips, got labeled={n_labeled} unlabeled={n_unlabeled}"
        )
    if not 224 <= size <= 320 or size % 2:
        # Below 224 px the face drops under ~100 px and dlib's HOG detector starts missing it.
        raise DemoCorpusError(f"frame size must be even and within 224..320 px, got {size}")
    if not 5 <= fps <= 30:
        raise DemoCorpusError(f"fps must be within 5..30, got {fps}")
    if not 1.0 <= min_s <= max_s <= 20.0:
        raise DemoCorpusError(
            f"need 1 <= min_seconds <= max_seconds <= 20, got {min_s} and {max_s}"
        )


def _clear_outputs(root: Path, overwrite: bool) -> None:
    names = (LABELED_DIR, UNLABELED_DIR, LABELS_CSV, TRANSCRIPTS_CSV, TRUTH_CSV)
    existing = [root / n for n in names if (root / n).exists()]
    if existing and not overwrite:
        raise DemoCorpusError(
            f"{root} already holds a corpus ({', '.join(p.name for p in existing)}); "
            "pass overwrite=True (CLI: --overwrite) or choose an empty folder"
        )
    for p in existing:  # only what this generator writes; anything else in root is left alone
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def make_demo_corpus(
    out_dir: Path,
    n_labeled: int = 60,
    n_unlabeled: int = 120,
    seed: int = 0,
    *,
    size: int = 256,
    fps: int = 12,
    min_seconds: float = 2.0,
    max_seconds: float = 4.0,
    workers: int | None = None,
    overwrite: bool = False,
) -> DemoCorpus:
    """Write a MER2024-shaped corpus of generated clips under out_dir; same seed, same corpus."""
    started = time.perf_counter()
    fmt = ClipFormat(size, fps, min_seconds, max_seconds)
    _check_params(n_labeled, n_unlabeled, fmt)
    tools = require_tools()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clear_outputs(root, overwrite)
    dirs = {"labeled": root / LABELED_DIR, "unlabeled": root / UNLABELED_DIR}
    for d in dirs.values():
        d.mkdir()
    specs = plan_corpus(n_labeled, n_unlabeled, seed)
    workers = workers or min(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(generate_clip, s, dirs[s.pool] / f"{s.name}.mp4", tools, fmt) for s in specs
        ]
        clips = sorted((f.result() for f in futures), key=lambda c: c.name)
    # CSVs last: a crash leaves videos without labels, never labels without videos.
    labeled = [c for c in clips if c.pool == "labeled"]
    _write_csv(root / LABELS_CSV, ["name", "discrete"], [[c.name, c.label] for c in labeled])
    _write_csv(root / TRANSCRIPTS_CSV, ["name", "chinese"], [[c.name, c.transcript] for c in clips])
    _write_csv(
        root / TRUTH_CSV, ["name", "discrete", "pool"], [[c.name, c.label, c.pool] for c in clips]
    )

    def counts(pool: str) -> dict[str, int]:
        seen = Counter(c.label for c in clips if c.pool == pool)
        return {c: seen[c] for c in CLASSES}

    return DemoCorpus(
        root=root,
        labeled_dir=dirs["labeled"],
        unlabeled_dir=dirs["unlabeled"],
        labels_csv=root / LABELS_CSV,
        transcripts_csv=root / TRANSCRIPTS_CSV,
        truth_csv=root / TRUTH_CSV,
        n_labeled=n_labeled,
        n_unlabeled=n_unlabeled,
        labeled_counts=counts("labeled"),
        unlabeled_counts=counts("unlabeled"),
        clips=tuple(clips),
        seed=seed,
        seconds=time.perf_counter() - started,
    )


# Deterministic work that writes files: never retried, never cached (the folder may be deleted).
generate_demo_corpus = task(name="generate-demo-corpus", cache_policy=NO_CACHE)(make_demo_corpus)
