"""Throughput and peak memory of the raw-video stages on N demo clips.

    .venv/bin/python benchmarks/raw_video.py --n 12 --backends dlib,opencv

Generates N clips of the demo corpus (tasks/demo/corpus.py; real face, real speech), then runs
each stage (the audio split, and face crops per backend) in its own child process through the
shard function the Prefect tasks call, so each figure's peak RSS is that stage's alone. Prints
videos per second, frames per second for faces, and peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


def manifest(folder: Path):
    """Manifest-like rows (video_id, path, sha256) for every mp4 under `folder`."""
    import pandas as pd

    paths = sorted(folder.rglob("*.mp4"))
    return pd.DataFrame(
        {
            "video_id": [p.stem for p in paths],
            "path": [str(p) for p in paths],
            "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
        }
    )


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(phase: str, corpus: Path, fps: float | None, max_frames: int | None) -> dict:
    """One stage over the whole corpus, in this process; returns its figures."""
    from data_contracts import tables
    from data_contracts.store import Store
    from tasks.faces.crop import crop_faces_shard
    from tasks.faces.settings import FaceSettings
    from tasks.media import extract_audio_shard

    videos = manifest(corpus)
    with tempfile.TemporaryDirectory(prefix="merflow-bench-") as tmp:
        store = Store(tmp)
        if phase == "audio":
            before = rss_mb()
            start = time.perf_counter()
            report = extract_audio_shard(videos, store)
            seconds = time.perf_counter() - start
            audio_s = float(store.read(tables.AUDIO).duration.sum())
            extra = {"media_seconds": round(audio_s, 1)}
        else:
            settings = FaceSettings(backend=phase.split(":")[1], fps=fps, max_frames=max_frames)
            t0 = time.perf_counter()
            settings.load()  # once per process, as in a worker: reported apart from throughput
            load_s = time.perf_counter() - t0
            before = rss_mb()
            start = time.perf_counter()
            report = crop_faces_shard(videos, store, settings)
            seconds = time.perf_counter() - start
            faces = store.read(tables.FACES)
            frames = int(faces.n_frames_sampled.sum())
            extra = {
                "load_s": round(load_s, 2),
                "frames_sampled": frames,
                "frames_per_s": round(frames / seconds, 1),
                "face_ratio": round(float(faces.face_ratio.mean()), 3) if len(faces) else 0.0,
            }
    return {
        "phase": phase,
        "videos": len(videos),
        "processed": report.processed,
        "failed": report.failed,
        "seconds": round(seconds, 2),
        "videos_per_s": round(len(videos) / seconds, 2),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        **extra,
    }


def main() -> None:
    """Generate the clips, run every stage in a child process, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=12, help="number of demo clips")
    p.add_argument("--backends", default="dlib,opencv", help="face backends, comma-separated")
    p.add_argument("--size", type=int, default=256, help="frame size of the demo clips")
    p.add_argument("--clip-fps", type=int, default=12, help="frame rate of the demo clips")
    p.add_argument("--fps", type=float, default=None, help="face sampling rate (default: all)")
    p.add_argument("--max-frames", type=int, default=None, help="face frames per video cap")
    p.add_argument("--corpus", type=Path, default=None, help="reuse clips in this folder")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one stage and print JSON
    args = p.parse_args()

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.corpus, args.fps, args.max_frames)))
        return

    with tempfile.TemporaryDirectory(prefix="merflow-bench-corpus-") as tmp:
        corpus = args.corpus
        if corpus is None:
            from tasks.demo.corpus import make_demo_corpus

            t0 = time.perf_counter()
            made = make_demo_corpus(
                Path(tmp), n_labelled=args.n, n_unlabelled=0, size=args.size, fps=args.clip_fps
            )
            corpus = made.root
            print(f"generated {args.n} demo clips in {time.perf_counter() - t0:.1f} s")
        phases = ["audio"] + [f"faces:{b}" for b in args.backends.split(",") if b]
        rows = []
        for phase in phases:
            cmd = [sys.executable, __file__, "--phase", phase, "--corpus", str(corpus)]
            if args.fps:
                cmd += ["--fps", str(args.fps)]
            if args.max_frames:
                cmd += ["--max-frames", str(args.max_frames)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{phase} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'stage':<14}{'videos':>7}{'ok':>5}{'s':>8}{'videos/s':>10}{'frames/s':>10}"
          f"{'peak RSS MiB':>14}{'(at start)':>12}")  # fmt: skip
    for r in rows:
        print(
            f"{r['phase']:<14}{r['videos']:>7}{r['processed']:>5}{r['seconds']:>8}"
            f"{r['videos_per_s']:>10}{r.get('frames_per_s', '-'):>10}"
            f"{r['peak_rss_mb']:>14}{r['rss_before_mb']:>12}"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
