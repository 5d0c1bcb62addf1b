"""Where a corpus keeps its videos, declared once: MER2024's two pool folders with their label
CSVs, or any folder of videos, whose videos are then unlabelled.

These names are the defaults of the `corpus.*` settings (flows/config.py CorpusSettings), which
read them from here; the scan (tasks/corpus/scan.py) and the demo corpus (tasks/demo/corpus.py)
use them too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

LABELLED_DIR = "video-labeled"
UNLABELLED_DIR = "video-unlabeled"
LABELS_CSV = "label-disdim.csv"
TRANSCRIPTS_CSV = "label-transcription.csv"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv")

# The manifest's pool of a video: MER2024's folder names map to these; a plain folder's videos
# are all UNLABELED_POOL; any other folder scanned (`merflow scan DIR`) is its own pool.
LABELLED_POOL = "labeled"
UNLABELLED_POOL = "unlabeled"
POOL_OF_FOLDER = {LABELLED_DIR: LABELLED_POOL, UNLABELLED_DIR: UNLABELLED_POOL}


class CorpusError(ValueError):
    """The corpus folder cannot be used: it does not exist or holds no videos (exit 2)."""


def video_extensions(extensions: Collection[str] | None = None) -> set[str]:
    """The file name endings that count as videos (default VIDEO_EXTENSIONS, the setting
    `corpus.video_extensions`'s default); lower case with the dot."""
    extensions = VIDEO_EXTENSIONS if extensions is None else extensions
    return {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}


def is_video(path: Path, exts: Collection[str]) -> bool:
    """A file (or a link to one) whose ending is one of `exts` (from video_extensions)."""
    return path.suffix.lower() in exts and (path.is_file() or path.is_symlink())


@dataclass(frozen=True)
class CorpusLayout:
    """The video folders of a corpus and whether it is a plain folder of videos."""

    corpus: Path
    video_dirs: list[Path]
    # No pool folders: the corpus folder's own videos are scanned, all of them unlabelled.
    plain: bool = False
    n_videos: int = 0  # of a plain folder (not counted for the pool folders)

    @property
    def pool(self) -> str | None:
        """The pool of every scanned video (None: each folder's own, POOL_OF_FOLDER)."""
        return UNLABELLED_POOL if self.plain else None

    def note(self, labelled_dir: str = LABELLED_DIR, unlabelled_dir: str = UNLABELLED_DIR) -> str:
        """One line for people when the folder is plain ("" otherwise)."""
        if not self.plain:
            return ""
        return (
            f"{self.corpus} has no {labelled_dir}/ or {unlabelled_dir}/: its {self.n_videos} "
            "videos are treated as unlabelled"
        )


def corpus_layout(
    corpus_dir: str | Path,
    labelled_dir: str = LABELLED_DIR,
    unlabelled_dir: str = UNLABELLED_DIR,
    extensions: Collection[str] | None = None,
) -> CorpusLayout:
    """The corpus's video folders: those of `labelled_dir`/`unlabelled_dir` that exist, else the
    corpus folder itself when it holds videos (its videos are unlabelled).

    Reads only folder listings (no file is opened), so commands can refuse a bad folder before
    they start anything. Raises CorpusError for a missing folder or one without videos."""
    corpus = Path(corpus_dir).expanduser().resolve()
    if not corpus.is_dir():
        raise CorpusError(
            f"corpus folder {corpus_dir} does not exist; give a folder of videos or a "
            "MER2024-shaped corpus (`merflow demo-corpus DIR` creates one)"
        )
    pools = [corpus / labelled_dir, corpus / unlabelled_dir]
    present = [d for d in pools if d.is_dir()]
    if present:
        return CorpusLayout(corpus, present)
    exts = video_extensions(extensions)
    n = sum(1 for p in corpus.iterdir() if is_video(p, exts))
    if not n:
        raise CorpusError(
            f"corpus folder {corpus_dir} holds no videos ({', '.join(sorted(exts))}) and "
            f"neither {labelled_dir}/ nor {unlabelled_dir}/; give a folder of videos or a "
            "MER2024-shaped corpus (`merflow demo-corpus DIR` creates one)"
        )
    return CorpusLayout(corpus, [corpus], plain=True, n_videos=n)
