"""The speaking face: which face track's mouth opens and closes with the speech.

Per track, the mouth opening of each of its faces (inner-lip gap over the inter-ocular distance,
from 68-point landmarks) is correlated with the audio's loudness (log RMS) around that frame's
time. The speaker is the track whose correlation is the strongest evidence (Fisher's z, which
grows with the independent frames it covers); when none reaches SPEAKING_MIN_Z, or the video has
no audio, the longest track (ties: the larger faces) is chosen instead, and the reason says why.

Neighbouring frames are not independent: a smile that widens over a second while music swells
correlates at r ~ 0.4 over 70 frames of a real clip, which naive z calls certain. The z counts
the effective frames instead, n (1 - a b) / (1 + a b) with a, b the two series' lag-1
autocorrelations (Bartlett's correction), so slow trends count as few observations.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.media import UnreadableMediaError, audio_command, find_ffmpeg, load_wav, run_ffmpeg

# A change that can alter the choice for the same faces and audio bumps SPEAKING_RULE_VERSION
# (tasks/faces/settings.py): it keys the faces extractor id.
AUDIO_RATE = 8000  # Hz: plenty for a loudness envelope, and a small decode
SPEAKING_MIN_FRAMES = 8  # a track shorter than this is not scored (its correlation is noise)
SPEAKING_MIN_Z = 2.5  # Fisher z = atanh(r) * sqrt(n_eff - 3); 2.5: one-sided p ~ 0.006
MOUTH_STILL = 0.01  # std of the opening (inter-ocular units) below which a mouth is still
ENVELOPE_WINDOW_S = (0.04, 0.25)  # loudness window: the sampled frame period, within these


@dataclass(frozen=True)
class Selection:
    """Which faces a video keeps, and why."""

    rule: str  # "largest" or "speaking"
    chosen: np.ndarray  # (n,) bool over the video's faces
    chosen_track: int  # -1: none
    score: float  # the chosen track's speaking score (correlation r); NaN: not scored
    reason: str
    track_score: np.ndarray  # (T,) float32 r per track; NaN: not scored


# -- the two signals -----------------------------------------------------------------------------
def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(n,) inner-lip gap over the inter-ocular distance of (n, 68, 2) landmarks; NaN for
    faces without 68 points."""
    n = len(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1] != 68:
        return np.full(n, np.nan)
    p = landmarks.astype(np.float64)
    gap = np.stack([np.linalg.norm(p[:, a] - p[:, b], axis=1) for a, b in _INNER_LIPS]).mean(0)
    ocular = np.linalg.norm(p[:, 36:42].mean(1) - p[:, 42:48].mean(1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ocular > 0, gap / ocular, np.nan)


_INNER_LIPS = ((61, 67), (62, 66), (63, 65))  # upper and lower inner lip, 0-based (dlib, OpenFace)


def read_audio(video: str | os.PathLike[str], ffmpeg_bin: str | None = None) -> np.ndarray:
    """`video`'s first audio stream, mono float32 at AUDIO_RATE, decoded by ffmpeg here (so the
    faces stage needs no other stage's output)."""
    video = Path(video)
    with tempfile.TemporaryDirectory(prefix="merflow-speaker-") as tmp:
        wav = Path(tmp) / "audio.wav"
        cmd = audio_command(video.resolve(), wav, find_ffmpeg(ffmpeg_bin), AUDIO_RATE)
        run_ffmpeg(cmd, video, timeout=300.0)
        x, _ = load_wav(wav)
    return x


def loudness_at(audio: np.ndarray, times: np.ndarray, rate: int = AUDIO_RATE) -> np.ndarray:
    """(n,) log RMS (dB) of `audio` in a window centred on each of `times` (seconds), the
    window as long as the sampled frame period."""
    steps = np.diff(np.unique(times))
    width = float(np.clip(np.median(steps) if steps.size else 0.1, *ENVELOPE_WINDOW_S))
    half = max(1, round(width * rate / 2))
    squares = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    centre = np.round(np.asarray(times, np.float64) * rate).astype(np.int64)
    lo = np.clip(centre - half, 0, len(audio))
    hi = np.clip(centre + half, 0, len(audio))
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = np.sqrt((squares[hi] - squares[lo]) / np.maximum(hi - lo, 1))
    out = 20 * np.log10(rms + 1e-4)  # -80 dB floor: digital silence is not minus infinity
    return np.where(hi > lo, out, np.nan)


# -- scores and the choice -----------------------------------------------------------------------
def lag1(x: np.ndarray) -> float:
    """The lag-1 autocorrelation of a series (0 for a constant one)."""
    d = x - x.mean()
    power = float((d * d).sum())
    return float((d[1:] * d[:-1]).sum() / power) if power > 0 else 0.0


def track_scores(
    track_id: np.ndarray, mouth: np.ndarray, loudness: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per track: the correlation r of mouth opening with loudness (NaN: too few frames), the
    number of frames it was computed over, and how many independent frames they are worth."""
    n_tracks = int(track_id.max()) + 1 if track_id.size else 0
    r = np.full(n_tracks, np.nan, np.float32)
    count = np.zeros(n_tracks, np.int32)
    n_eff = np.zeros(n_tracks, np.float64)
    for t in range(n_tracks):
        m, e = mouth[track_id == t], loudness[track_id == t]
        ok = np.isfinite(m) & np.isfinite(e)
        m, e = m[ok], e[ok]
        count[t] = n_eff[t] = len(m)
        if len(m) < SPEAKING_MIN_FRAMES:
            continue
        if m.std() < MOUTH_STILL or e.std() == 0:
            r[t] = 0.0  # a still mouth (or a flat sound) moves with nothing
            continue
        r[t] = float(np.corrcoef(m, e)[0, 1])
        ab = lag1(m) * lag1(e)
        n_eff[t] = len(m) * min(1.0, (1 - ab) / (1 + ab))  # never more frames than there are
    return r, count, n_eff


def _longest(track_id: np.ndarray, boxes: np.ndarray) -> int:
    """The track with the most faces; ties: the larger mean box area."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = np.where(np.isfinite(area), area, 0.0)
    n_tracks = int(track_id.max()) + 1
    keys = [((track_id == t).sum(), area[track_id == t].mean()) for t in range(n_tracks)]
    return max(range(n_tracks), key=lambda t: keys[t])


def choose_largest(track_id: np.ndarray, rank: np.ndarray) -> Selection:
    """Today's rule: the face each backend ranks first (the largest) in every frame."""
    chosen = rank == 0
    n_tracks = int(track_id.max()) + 1 if track_id.size else 0
    picked = track_id[chosen]
    if picked.size == 0:
        return Selection("largest", chosen, -1, float("nan"), "no largest face", _nan(n_tracks))
    major = int(np.bincount(picked).argmax())
    share = float((picked == major).mean())
    reason = (
        f"largest face of each frame: {share:.0%} of the crops from track {major} of {n_tracks}"
    )
    return Selection("largest", chosen, major, float("nan"), reason, _nan(n_tracks))


def choose_speaking(
    track_id: np.ndarray,
    boxes: np.ndarray,
    mouth: np.ndarray,
    loudness: np.ndarray | None,
    no_audio: str = "",
) -> Selection:
    """The track whose mouth follows the speech; else the longest, with the reason.
    `loudness` None: no audio (`no_audio` says why)."""
    n_tracks = int(track_id.max()) + 1
    longest = _longest(track_id, boxes)

    def fallback(why: str, scores: np.ndarray) -> Selection:
        score = float(scores[longest])
        return Selection(
            "speaking", track_id == longest, longest, score, f"longest track: {why}", scores
        )

    if loudness is None:
        return fallback(no_audio or "no audio", _nan(n_tracks))
    if not np.isfinite(mouth).any():
        return fallback("no mouth landmarks (68 points) for any face", _nan(n_tracks))
    heard = loudness[np.isfinite(loudness)]
    if heard.size and heard.min() == heard.max():
        return fallback("its audio is silent (no change in loudness)", _nan(n_tracks))
    r, count, n_eff = track_scores(track_id, mouth, loudness)
    z = np.arctanh(np.clip(np.nan_to_num(r, nan=0.0), -0.999, 0.999)) * np.sqrt(
        np.maximum(n_eff - 3, 0)
    )
    best = int(np.argmax(z))
    if z[best] < SPEAKING_MIN_Z:
        if np.isfinite(r).any():
            b = int(np.nanargmax(r))
            why = (
                f"no track's mouth moves with the speech (best r={r[b]:.2f} over {count[b]} "
                f"frames, {n_eff[b]:.0f} independent, track {b})"
            )
        else:
            why = f"no track is long enough to tell (fewer than {SPEAKING_MIN_FRAMES} frames)"
        return fallback(why, r)
    others = np.delete(r, best)
    runner = f"; next best r={np.nanmax(others):.2f}" if np.isfinite(others).any() else ""
    reason = (
        f"speaking: track {best}'s mouth follows the speech (r={r[best]:.2f} over "
        f"{count[best]} frames, {n_eff[best]:.0f} independent{runner})"
    )
    return Selection("speaking", track_id == best, best, float(r[best]), reason, r)


def speaking_inputs(
    video: Path, has_audio: bool, landmarks: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Mouth opening per face, loudness at each face's time (None: no audio), and why not."""
    mouth = mouth_opening(landmarks)
    if not has_audio:
        return mouth, None, "the video has no audio stream"
    try:
        audio = read_audio(video)
    except UnreadableMediaError as e:
        return mouth, None, f"its audio is unreadable ({str(e)[:160]})"
    if audio.size == 0:
        return mouth, None, "its audio stream is empty"
    return mouth, loudness_at(audio, times), ""


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan, np.float32)
