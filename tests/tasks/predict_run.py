"""A finished training run on the session's small demo corpus, made once per test session by
the real extract and train flows, and new demo clips it never saw: the predict tests share them
(training more than once would cost minutes on two cores)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

FAST = [
    "train.n_splits=2",
    "train.max_epochs=2",
    "train.final_epochs=2",
    "train.pretrain_epochs=1",
]
_MADE: dict[str, PredictRun] = {}


@dataclass
class PredictRun:
    """The corpus, data root and settings of the run, its report, and clips it never saw."""

    corpus: Path
    root: Path
    overrides: list[str]  # the run's settings (tiny models + FAST)
    report: dict
    run_dir: Path
    new_clips: list[Path]  # generated with another seed, named new_clip_<i>.mp4


def predict_run(small_corpus: Path, tiny_models: Path, tmp_path_factory) -> PredictRun:
    """The session's trained run (made on first use; needs the session's Prefect server)."""
    if "run" in _MADE:
        return _MADE["run"]
    from flows.extract import extract_flow
    from flows.train import train_flow
    from tasks.demo.corpus import make_demo_corpus

    base = tmp_path_factory.mktemp("predict")
    root = base / "root"
    overrides = [f"models.models_dir={tiny_models}", "models.build_tiny=false", *FAST]
    extract_flow(str(small_corpus), profile="demo", data_root=str(root), overrides=overrides)
    report = train_flow(str(small_corpus), "demo", str(root), overrides)
    fresh = base / "fresh-corpus"
    make_demo_corpus(fresh, n_labelled=0, n_unlabelled=3, seed=23)
    clips = sorted((fresh / "video-unlabeled").glob("*.mp4"))
    new = base / "new-clips"
    new.mkdir()
    copies = [shutil.copy(c, new / f"new_clip_{i}.mp4") for i, c in enumerate(clips)]
    made = PredictRun(
        small_corpus, root, overrides, report, Path(report["run_dir"]), [Path(c) for c in copies]
    )
    _MADE["run"] = made
    return made
