"""Generate a small MER2024-shaped demo corpus: real face, real Chinese speech, transcripts.

As in real emotion data, each modality carries part of the emotion and the modalities
complement each other (docs/demo.md): the voice carries arousal, the words valence, the face
some classes and not others. `CUE_TABLE` says which; no modality alone separates the six
classes, and per clip a cue may be missing (a calm voice, a neutral sentence, a still face) or
conflict with the class, so fusion beats every single modality and still does not reach 100 %.
The pictures and sounds are rendered by tasks/demo/media.py, which sees cues, never classes.

Besides MER's files (`video-labeled/`, `video-unlabeled/`, `label-disdim.csv`,
`label-transcription.csv`) it writes `demo-truth.csv` (`name`, `discrete`, `pool`): the hidden
class of every clip, unlabelled ones included, so tests can score pseudo-labels. It is demo-only;
MER has no such file.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.labels import CLASSES, MER2024_TRAIN_COUNTS
from tasks.corpus.layout import LABELLED_DIR, LABELS_CSV, TRANSCRIPTS_CSV, UNLABELLED_DIR
from tasks.demo.media import (
    EXPRESSIONS,
    ClipFormat,
    DemoCorpusError,
    MissingToolError,
    Rendering,
    render_clip,
    require_tools,
)

__all__ = ["CUE_TABLE", "DemoCorpusError", "MissingToolError", "class_counts", "make_demo_corpus"]

TRUTH_CSV = "demo-truth.csv"


@dataclass(frozen=True)
class Cues:
    """What each modality shows of a clip's emotion: one state per modality."""

    voice: str  # arousal: "low", "mid" or "high" (VOICES)
    words: str  # "neutral", "negative", "worry" or "positive" (WORDING)
    face: str  # "none", "smile", "frown" or "open" (tasks/demo/media.py EXPRESSIONS)


# The design (docs/demo.md): each modality merges some classes, and each pair of classes is
# told apart by at least one modality. Arousal has three levels (sad lowest): with two, the
# voice alone could reach a WAF of ~32 at best on MER's class mix, barely above guessing (20).
CUE_TABLE: dict[str, Cues] = {
    "neutral": Cues(voice="mid", words="neutral", face="none"),
    "angry": Cues(voice="high", words="negative", face="none"),
    "happy": Cues(voice="high", words="positive", face="smile"),
    "sad": Cues(voice="low", words="negative", face="frown"),
    "worried": Cues(voice="mid", words="worry", face="frown"),
    "surprise": Cues(voice="high", words="positive", face="open"),
}
# What a modality shows when a clip lacks its cue: a calm voice, a neutral sentence, a still face.
NO_CUE = Cues(voice="mid", words="neutral", face="none")
# Per modality, the chance that a clip shows its class's cue; otherwise it shows another state
# (a conflicting cue) with chance CUE_CONFLICT, else NO_CUE's.
CUE_KEEP: dict[str, float] = {"voice": 0.9, "words": 0.8, "face": 0.9}
CUE_CONFLICT = 0.02

# One arousal level's voice, (espeak-ng pitch 0-99, rate in words/min, vocal effort, speech
# peak); each clip jitters all four.
VOICES: dict[str, tuple[int, int, float, float]] = {
    "low": (22, 170, -0.8, 0.40),
    "mid": (48, 225, 0.0, 0.55),
    "high": (78, 290, 0.8, 0.75),
}

# Sentences by what they say, not by class: a group is shared by the classes CUE_TABLE gives it
# (anger and sadness both complain; joy and surprise both exclaim). Each group's sentences share
# key words, as real sentiment does; the prefixes are neutral and only add variety.
WORDING: dict[str, tuple[str, ...]] = {
    "neutral": (
        "今天下午三点开会。",
        "文件放在桌子上了。",
        "明天是星期三。",
        "我们坐地铁去上班吧。",
        "晚饭七点开始。",
    ),
    "negative": (
        "我真的受不了了。",
        "太糟糕了，我受不了。",
        "这件事太糟糕了。",
        "受不了，一切都太糟糕了。",
        "我不想再说了，太糟糕了。",
    ),
    "worry": (
        "我很担心，怎么办？",
        "万一出事了怎么办？",
        "这件事让我很担心。",
        "怎么办，我有点担心。",
        "我担心来不及，怎么办？",
    ),
    "positive": (
        "太好了，真没想到！",
        "真的吗？太好了！",
        "哇，太好了！",
        "没想到这么好，太开心了！",
        "太好了，我们赢了！",
    ),
}
PREFIXES: tuple[str, ...] = ("", "", "", "小王，", "妈，")


@dataclass(frozen=True)
class ClipSpec:
    """One planned clip: its name, pool, class, the cues it shows and how it is rendered."""

    name: str
    pool: str  # "labeled" or "unlabeled"
    label: str
    cues: Cues
    look: Rendering


@dataclass(frozen=True)
class DemoClip:
    """One generated clip: its file, pool, true class, the cues it shows and its transcript."""

    name: str
    pool: str
    label: str
    transcript: str
    path: Path
    duration_s: float
    cues: Cues


@dataclass(frozen=True)
class DemoCorpus:
    """Paths and counts of a generated demo corpus."""

    root: Path
    labelled_dir: Path
    unlabelled_dir: Path
    labels_csv: Path
    transcripts_csv: Path
    truth_csv: Path
    n_labelled: int
    n_unlabelled: int
    labelled_counts: dict[str, int]
    unlabelled_counts: dict[str, int]
    clips: tuple[DemoClip, ...] = field(repr=False)  # one line per clip: too long to print
    seed: int
    seconds: float


def class_counts(n: int, weights: dict[str, int] | None = None) -> dict[str, int]:
    """Split n clips over CLASSES in MER's proportions and order; none empty once n >= 6."""
    if n < 0:
        raise DemoCorpusError(f"clip count must be >= 0, got {n}")
    w = np.array([(weights or MER2024_TRAIN_COUNTS)[c] for c in CLASSES], dtype=float)
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


CUE_STATES: dict[str, tuple[str, ...]] = {
    "voice": tuple(VOICES),
    "words": tuple(WORDING),
    "face": EXPRESSIONS,
}


def draw_cues(label: str, rng: np.random.Generator) -> Cues:
    """The cues one clip of class `label` shows: per modality its class's state (CUE_KEEP),
    a conflicting one (CUE_CONFLICT) or NO_CUE's."""
    shown = {}
    for modality, states in CUE_STATES.items():
        own = getattr(CUE_TABLE[label], modality)
        u = rng.random()
        if u < CUE_KEEP[modality]:
            shown[modality] = own
        elif u < CUE_KEEP[modality] + CUE_CONFLICT:
            others = [s for s in states if s != own]
            shown[modality] = others[rng.integers(len(others))]
        else:
            shown[modality] = getattr(NO_CUE, modality)
    return Cues(**shown)


def plan_corpus(n_labelled: int, n_unlabelled: int, seed: int) -> list[ClipSpec]:
    """Draw every clip's class, cues and variation from one seeded generator."""
    rng = np.random.default_rng(seed)
    labels = {}
    for pool, n in (("labeled", n_labelled), ("unlabeled", n_unlabelled)):
        pool_labels = [c for c, k in class_counts(n).items() for _ in range(k)]
        labels[pool] = [pool_labels[i] for i in rng.permutation(n)]
    # MER ids interleave the pools; so do ours, so that no code may assume contiguous ranges.
    ids = rng.permutation(n_labelled + n_unlabelled) + 1
    pools = ["labeled"] * n_labelled + ["unlabeled"] * n_unlabelled
    classes = labels["labeled"] + labels["unlabeled"]
    specs = []
    for sample_id, pool, label in zip(ids, pools, classes, strict=True):
        cues = draw_cues(label, rng)
        pitch, rate, effort, peak = VOICES[cues.voice]
        sentences = WORDING[cues.words]
        specs.append(
            ClipSpec(
                name=f"sample_{int(sample_id):08d}",
                pool=pool,
                label=label,
                cues=cues,
                look=Rendering(
                    sentence=PREFIXES[rng.integers(len(PREFIXES))]
                    + sentences[rng.integers(len(sentences))],
                    pitch=int(np.clip(pitch + rng.integers(-8, 9), 0, 99)),
                    rate=int(rate * rng.uniform(0.9, 1.1)),
                    effort=float(np.clip(effort + rng.uniform(-0.2, 0.2), -1.0, 1.0)),
                    speech_peak=peak * rng.uniform(0.85, 1.15),
                    expression=cues.face,
                    intensity=1.0 if cues.face == "none" else rng.uniform(0.75, 1.0),
                    lead_s=rng.uniform(0.1, 0.35),
                    tail_s=rng.uniform(0.15, 0.4),
                    face_frac=rng.uniform(0.45, 0.58),
                    offset_xy=(rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.05)),
                    drift_xy=(rng.uniform(-8, 8), rng.uniform(-6, 6)),
                    angle_deg=rng.uniform(-5, 5),
                    # Mild lighting changes only: through a random CLIP, brightness (and a
                    # mirrored face) move the face features far more than an expression does.
                    gains=tuple(float(g) for g in rng.uniform(0.99, 1.01, 3)),
                    brightness=rng.uniform(0.97, 1.03),
                    phase=rng.uniform(0, 2 * np.pi),
                    noise_seed=int(rng.integers(2**31)),
                ),
            )
        )
    return specs


def generate_clip(spec: ClipSpec, out: Path, tools: tuple[str, str], fmt: ClipFormat) -> DemoClip:
    """Render and encode one clip."""
    duration = render_clip(spec.look, out, tools, fmt)
    return DemoClip(spec.name, spec.pool, spec.label, spec.look.sentence, out, duration, spec.cues)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def _check_params(n_labelled: int, n_unlabelled: int, fmt: ClipFormat) -> None:
    size, fps, min_s, max_s = fmt.size, fmt.fps, fmt.min_seconds, fmt.max_seconds
    if n_labelled < 0 or n_unlabelled < 0 or n_labelled + n_unlabelled == 0:
        raise DemoCorpusError(
            f"need a positive number of clips, got labeled={n_labelled} unlabeled={n_unlabelled}"
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
    names = (LABELLED_DIR, UNLABELLED_DIR, LABELS_CSV, TRANSCRIPTS_CSV, TRUTH_CSV)
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
    n_labelled: int = 60,
    n_unlabelled: int = 120,
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
    _check_params(n_labelled, n_unlabelled, fmt)
    tools = require_tools()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clear_outputs(root, overwrite)
    dirs = {"labeled": root / LABELLED_DIR, "unlabeled": root / UNLABELLED_DIR}
    for d in dirs.values():
        d.mkdir()
    specs = plan_corpus(n_labelled, n_unlabelled, seed)
    workers = workers or min(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(generate_clip, s, dirs[s.pool] / f"{s.name}.mp4", tools, fmt) for s in specs
        ]
        clips = sorted((f.result() for f in futures), key=lambda c: c.name)
    # CSVs last: a crash leaves videos without labels, never labels without videos.
    labelled = [c for c in clips if c.pool == "labeled"]
    _write_csv(root / LABELS_CSV, ["name", "discrete"], [[c.name, c.label] for c in labelled])
    _write_csv(root / TRANSCRIPTS_CSV, ["name", "chinese"], [[c.name, c.transcript] for c in clips])
    _write_csv(
        root / TRUTH_CSV, ["name", "discrete", "pool"], [[c.name, c.label, c.pool] for c in clips]
    )

    def counts(pool: str) -> dict[str, int]:
        seen = Counter(c.label for c in clips if c.pool == pool)
        return {c: seen[c] for c in CLASSES}

    return DemoCorpus(
        root=root,
        labelled_dir=dirs["labeled"],
        unlabelled_dir=dirs["unlabeled"],
        labels_csv=root / LABELS_CSV,
        transcripts_csv=root / TRANSCRIPTS_CSV,
        truth_csv=root / TRUTH_CSV,
        n_labelled=n_labelled,
        n_unlabelled=n_unlabelled,
        labelled_counts=counts("labeled"),
        unlabelled_counts=counts("unlabeled"),
        clips=tuple(clips),
        seed=seed,
        seconds=time.perf_counter() - started,
    )


# Deterministic work that writes files: never retried, never cached (the folder may be deleted).
generate_demo_corpus = task(name="generate-demo-corpus", cache_policy=NO_CACHE)(make_demo_corpus)


def score_against_truth(corpus_dir: Path, run_dir: Path) -> list[str]:
    """What only a generated corpus can tell: how a finished run's pseudo labels and its
    submission (the unlabelled clips' voted labels) agree with the hidden classes in
    demo-truth.csv. Lines to print; none when the corpus has no truth file."""
    from sklearn.metrics import f1_score

    from tasks.training.steps import load_fold

    truth_csv = Path(corpus_dir) / TRUTH_CSV
    submission = Path(run_dir) / "report" / "submission.csv"
    if not truth_csv.is_file() or not submission.is_file():
        return []
    with truth_csv.open(newline="") as f:
        truth = {row["name"]: row["discrete"] for row in csv.DictReader(f)}
    with submission.open(newline="") as f:
        sub = [(row["name"], row["discrete"]) for row in csv.DictReader(f)]
    scored = [(truth[name], label) for name, label in sub if name in truth]
    if not scored:
        return []
    names = [name for name, _ in sub]  # the run's unlabelled rows, in its order
    hits, chosen = 0, 0
    for fold in sorted(Path(run_dir).glob("fold-*")):
        if not (fold / "outputs.npz").is_file():
            continue
        _, arrays = load_fold(fold)
        for i, c in zip(arrays["pseudo_index"], arrays["pseudo_label"], strict=True):
            chosen += 1
            hits += truth.get(names[int(i)]) == CLASSES[int(c)]
    true, pred = zip(*scored, strict=True)
    test_waf = 100 * f1_score(true, pred, labels=list(CLASSES), average="weighted", zero_division=0)
    lines = [
        f"hidden classes ({TRUTH_CSV}, the demo's own answer key): the submission's labels for "
        f"the {len(scored)} unlabelled clips score WAF {test_waf:.2f}"
    ]
    if chosen:
        lines.append(
            f"pseudo labels: {hits} of {chosen} ({100 * hits / chosen:.0f} %) are the clip's "
            "hidden class"
        )
    return lines
