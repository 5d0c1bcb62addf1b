"""Whole-extraction throughput on N demo clips: the Prefect flow vs pure model compute vs a
naive one-video-at-a-time loop, with the peak memory of each.

    .venv/bin/python benchmarks/extraction.py --n 48
    .venv/bin/python benchmarks/extraction.py --n 24 --out /tmp/bench --json /tmp/bench.json
    .venv/bin/python benchmarks/extraction.py --n 48 --profile paper models.device=cuda

Phases, each in its own child process so that each peak RSS is that phase's alone:

- pipeline: `extract_flow` (scan, audio, faces, HuBERT, ASR, LLM, CLIP, health check) against a
  local Prefect server (SQLite, started under --out) into a fresh data root. Wall time of the
  flow call; model checkpoints are built or found before the clock starts.
- pure: each model's forward alone on the inputs the pipeline produced (its face crops, wavs
  and transcripts, read from its stores), every input in one call with the profile's batch
  budgets, after a one-input warm-up. The sum of the four times is what the models alone need
  one after another; it excludes ffmpeg and face detection, which the other two include.
- naive: one video at a time, the way the challenge baseline's scripts work: ffmpeg audio,
  face crops, CLIP on that video's crops, HuBERT on its clip, ASR on it, the LLM on its text,
  one .npy per video and modality. Models load once (load time reported apart); no batching
  across videos, no store, no Prefect.

By default every video is transcribed by the ASR model (`extract.prefer_official_transcripts=
false`) so that all four models run; --official-transcripts keeps the corpus's transcripts
instead, and then no phase runs ASR. Extra `key=value` arguments are settings overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

PHASES = ("pipeline", "pure", "naive")
MODEL_KINDS = ("visual", "acoustic", "asr", "text")
DEFAULT_OUT = Path(tempfile.gettempdir()) / "merflow-bench-extraction"


# -- shared helpers ----------------------------------------------------------------------------
def peak_rss_mib() -> dict[str, float]:
    """Peak RSS of this process and of its largest waited-for child (ffmpeg), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own, 1), "children_peak_rss_mib": round(kids, 1)}


def gpu_peak_mib() -> float | None:
    """Peak CUDA memory allocated by torch in this process, None without a GPU."""
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def corpus_path(out: Path, n: int, seed: int) -> Path:
    """Where the demo corpus of n clips and this seed lives under the output folder."""
    return out / f"corpus-n{n}-seed{seed}"


def ensure_corpus(out: Path, n: int, seed: int) -> tuple[Path, float | None]:
    """The demo corpus of n labelled clips, generated unless a complete one is there."""
    from tasks.demo_corpus import TRUTH_CSV, make_demo_corpus

    folder = corpus_path(out, n, seed)
    # The truth CSV is written last: its presence means the generation finished.
    if (folder / TRUTH_CSV).exists() and len(list(folder.rglob("*.mp4"))) == n:
        return folder, None
    t0 = time.perf_counter()
    made = make_demo_corpus(folder, n_labeled=n, n_unlabeled=0, seed=seed, overwrite=True)
    return made.root, time.perf_counter() - t0


def effective_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The user's overrides plus the benchmark's: shared model folder, transcript source."""
    overrides = list(args.overrides)
    keys = {o.split("=", 1)[0] for o in overrides}
    if "models.models_dir" not in keys:
        # One checkpoint folder for all phases, outside the pipeline's fresh data root.
        overrides.append(f"models.models_dir={out / 'models'}")
    if "extract.prefer_official_transcripts" not in keys:
        official = str(args.official_transcripts).lower()
        overrides.append(f"extract.prefer_official_transcripts={official}")
    return overrides


def load_plan(args: argparse.Namespace, data_root: Path) -> tuple[Any, Any]:
    """Settings and extraction plan (builds the tiny checkpoints when the profile says so)."""
    from flows.config import load_settings
    from flows.plan import plan_extraction

    settings = load_settings(args.profile, args.overrides)
    return settings, plan_extraction(settings, data_root, Path(args.corpus))


def _batch(choice: Any) -> int | None:
    return int(choice.batch) if choice.batch else None


# -- phase: pipeline ---------------------------------------------------------------------------
def phase_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """The extraction flow on the corpus into a fresh data root, timed end to end."""
    from flows.extract import extract_flow

    root = Path(args.data_root)
    load_plan(args, root)  # checkpoints built or found before the clock starts
    t0 = time.perf_counter()
    summary = extract_flow(
        str(args.corpus), profile=args.profile, data_root=str(root), overrides=args.overrides
    )
    seconds = time.perf_counter() - t0
    stages = summary["stages"]
    return {
        "phase": "pipeline",
        "videos": summary["videos"],
        "ok": min(s["processed"] for s in stages.values()),
        "failed": len(summary["failures"]),
        "seconds": round(seconds, 2),
        "stages": {
            k: {"processed": v["processed"], "failed": v["failed"]} for k, v in stages.items()
        },
        "gpu_peak_mib": gpu_peak_mib(),
        **peak_rss_mib(),
    }


# -- phase: pure model compute -----------------------------------------------------------------
def _timed(fn: Any, warm: Any, inputs: list[Any]) -> float:
    if not inputs:
        return 0.0
    fn(warm)  # first-call costs (allocator, kernel selection) are not forward time
    t0 = time.perf_counter()
    fn(inputs)
    return time.perf_counter() - t0


def phase_pure(args: argparse.Namespace) -> dict[str, Any]:
    """Each model alone on all of the pipeline's inputs of its kind; the sum of the four times."""
    import pandas as pd

    from data_contracts import tables
    from data_contracts.store import Store
    from tasks.embed import read_wav
    from tasks.faces import load_crops

    root = Path(args.data_root)
    settings, plan = load_plan(args, root)
    store = Store(root)

    def rows(table: Any, extractor_id: str) -> pd.DataFrame:
        df = store.read(table)
        return df[df.extractor_id == extractor_id].sort_values("video_id")

    faces = rows(tables.FACES, plan.faces.extractor_id)
    audio = rows(tables.AUDIO, plan.audio_id)
    transcripts = rows(tables.TRANSCRIPTS, plan.transcripts_id)
    if audio.empty and faces.empty:
        raise SystemExit(f"no pipeline artifacts under {root}; run the pipeline phase first")
    crops = [c for p in faces.path for c in load_crops(store.absolute(p)).crops]
    wavs = dict(zip(audio.video_id, (read_wav(store.absolute(p)) for p in audio.path), strict=True))
    # ASR ran on the videos whose transcript came from it, nothing else.
    asr_ids = set(transcripts.video_id[transcripts.source == "asr"])
    asr_wavs = [w for v, w in wavs.items() if v in asr_ids]
    texts = [str(t) for t in transcripts.text]

    m = plan.models
    loads: dict[str, float] = {}
    encoders: dict[str, Any] = {}
    for kind in MODEL_KINDS:
        if kind == "asr" and not asr_wavs:
            continue
        t0 = time.perf_counter()
        encoders[kind] = m[kind].load()
        loads[kind] = round(time.perf_counter() - t0, 2)
    times = {
        "visual": _timed(
            lambda x: encoders["visual"].embed(x, batch_size=_batch(m["visual"])),
            crops[:1],
            crops,
        ),
        "acoustic": _timed(
            lambda x: encoders["acoustic"].embed(x, max_batch_samples=_batch(m["acoustic"])),
            list(wavs.values())[:1],
            list(wavs.values()),
        ),
        "asr": _timed(lambda x: encoders["asr"].transcribe(x), asr_wavs[:1], asr_wavs),
        "text": _timed(
            lambda x: encoders["text"].embed(x, max_batch_tokens=_batch(m["text"])),
            texts[:1],
            texts,
        ),
    }
    n = len(set(audio.video_id) | set(faces.video_id))
    return {
        "phase": "pure",
        "videos": n,
        "ok": n,
        "failed": 0,
        "seconds": round(sum(times.values()), 2),
        "model_s": {k: round(v, 3) for k, v in times.items()},
        "load_s": loads,
        "inputs": {
            "visual": f"{len(crops)} crops",
            "acoustic": f"{sum(map(len, wavs.values())) / settings.audio.sample_rate:.1f} s audio",
            "asr": f"{len(asr_wavs)} clips",
            "text": f"{len(texts)} texts",
        },
        "gpu_peak_mib": gpu_peak_mib(),
        **peak_rss_mib(),
    }


# -- phase: naive sequential loop --------------------------------------------------------------
class StepTimer:
    """Time spent and deterministic failures per step of the naive loop."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = dict.fromkeys(("audio", "faces", *MODEL_KINDS), 0.0)
        self.failed: dict[str, int] = {}

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        """fn(*args) timed under `name`; None where the input is bad (a missing modality)."""
        from tasks.errors import BadInputError

        t = time.perf_counter()
        try:
            return fn(*args)
        except BadInputError:
            self.failed[name] = self.failed.get(name, 0) + 1
            return None
        finally:
            self.spent[name] += time.perf_counter() - t


def phase_naive(args: argparse.Namespace) -> dict[str, Any]:
    """One video at a time through every step, models loaded once, no cross-video batching."""
    import numpy as np

    from flows.extract import _resolve_corpus
    from tasks.embed import read_wav
    from tasks.faces import crop_faces, load_crops
    from tasks.labels import load_transcripts
    from tasks.media import extract_audio

    scratch = Path(args.data_root)
    settings, plan = load_plan(args, scratch)
    _, dirs = _resolve_corpus(str(args.corpus), settings, None)
    exts = set(settings.corpus.video_extensions)
    videos = sorted(p for d in dirs for p in d.iterdir() if p.suffix.lower() in exts)
    official: dict[str, str] = {}
    if plan.official_transcripts:
        t = load_transcripts(Path(args.corpus) / settings.corpus.transcripts_csv)
        official = dict(zip(t.video_id, t.text, strict=True))

    m = plan.models
    loads: dict[str, float] = {}
    enc: dict[str, Any] = {}
    for kind in MODEL_KINDS:
        if kind == "asr" and all(v.stem in official for v in videos):
            continue
        t0 = time.perf_counter()
        enc[kind] = m[kind].load()
        loads[kind] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    backend = plan.faces.load()
    loads["faces"] = round(time.perf_counter() - t0, 2)

    steps = StepTimer()
    sr, ffmpeg_bin = settings.audio.sample_rate, settings.audio.ffmpeg_bin
    ok = 0
    t0 = time.perf_counter()
    for video in videos:
        out = scratch / video.stem
        out.mkdir(parents=True, exist_ok=True)
        vectors: dict[str, Any] = {}
        wav_path, npz_path = out / "audio.wav", out / "faces.npz"
        if steps.run("audio", extract_audio, video, wav_path, ffmpeg_bin, sr):
            wav = read_wav(wav_path)
            feats = steps.run("acoustic", enc["acoustic"].embed, [wav], _batch(m["acoustic"]))
            vectors["acoustic"] = None if feats is None else feats[0]
            text = official.get(video.stem)
            if text is None:
                result = steps.run("asr", enc["asr"].transcribe, [wav])
                text = result[0].text if result else ""
            feats = steps.run("text", enc["text"].embed, [text], _batch(m["text"]))
            vectors["text"] = None if feats is None else feats[0]
            if feats is not None and feats[0] is None:  # empty text: a missing modality
                steps.failed["text"] = steps.failed.get("text", 0) + 1
        if steps.run("faces", crop_faces, video, npz_path, plan.faces, backend):
            crops = list(load_crops(npz_path).crops)
            feats = steps.run("visual", enc["visual"].embed, crops, _batch(m["visual"]))
            vectors["visual"] = None if feats is None else feats.mean(0)
        for kind, vec in vectors.items():
            if vec is not None:
                np.save(out / f"{kind}.npy", vec)
        ok += all(vectors.get(k) is not None for k in ("visual", "acoustic", "text"))
    seconds = time.perf_counter() - t0
    return {
        "phase": "naive",
        "videos": len(videos),
        "ok": ok,
        "failed": sum(steps.failed.values()),
        "seconds": round(seconds, 2),
        "step_s": {k: round(v, 3) for k, v in steps.spent.items()},
        "failed_steps": steps.failed,
        "load_s": loads,
        "gpu_peak_mib": gpu_peak_mib(),
        **peak_rss_mib(),
    }


# -- driver ------------------------------------------------------------------------------------
def server_peak_mib(pid: int) -> float | None:
    """Sum of the peak RSS (VmHWM) of the Prefect server's processes, None when unreadable."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
        total += int(line.split()[1]) if line else 0
    return round(total / 1024, 1) if total else None


def run_child(phase: str, args: argparse.Namespace, data_root: Path, env: dict) -> dict | None:
    """One phase in a child process; its JSON result, or None (with its stderr) on failure."""
    cmd = [sys.executable, __file__, "--phase", phase, "--profile", args.profile]
    cmd += ["--corpus", str(args.corpus), "--data-root", str(data_root)]
    cmd += ["--", *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        print(f"phase {phase} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], server_mib: float | None) -> None:
    """The three figures side by side, then the per-model breakdown."""
    print(f"\n{'phase':<10}{'videos':>7}{'ok':>5}{'seconds':>9}{'videos/s':>10}"
          f"{'vs pure':>9}{'peak RSS MiB':>14}{'GPU MiB':>9}")  # fmt: skip
    pure = next((r for r in rows if r["phase"] == "pure"), None)
    for r in rows:
        ratio = f"{pure['seconds'] / r['seconds']:.2f}" if pure and r["seconds"] else "-"
        gpu = r.get("gpu_peak_mib") or "-"
        print(
            f"{r['phase']:<10}{r['videos']:>7}{r['ok']:>5}{r['seconds']:>9}"
            f"{r['videos_per_s']:>10}{ratio:>9}{r['peak_rss_mib']:>14}{gpu:>9}"
        )
    print("vs pure: the pure model-compute seconds over the phase's seconds (1.00 = model speed)")
    if server_mib is not None:
        print(f"(Prefect server, separate processes: peak RSS {server_mib} MiB)")
    for r in rows:
        if "model_s" in r:
            print(f"pure model s: {r['model_s']} on {r['inputs']}; load s: {r['load_s']}")
        if "step_s" in r:
            print(f"naive step s: {r['step_s']}; load s: {r['load_s']}")
            if r["failed_steps"]:
                print(f"naive failed steps: {r['failed_steps']}")
        if "stages" in r:
            print(f"pipeline stages: {r['stages']}")


def main() -> None:
    """Make or reuse the corpus, start a Prefect server, run the three phases, print figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="number of demo clips")
    p.add_argument("--seed", type=int, default=0, help="demo corpus seed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus, stores, server, models")
    p.add_argument("--profile", default="demo", help="settings profile (demo or paper)")
    p.add_argument(
        "--official-transcripts",
        action="store_true",
        help="use the corpus's transcripts (no ASR in any phase) instead of running ASR",
    )
    p.add_argument("--phases", default=",".join(PHASES), help="phases to run, comma-separated")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one phase
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="settings overrides, key=value")
    args = p.parse_args()

    if args.phase:
        run = {"pipeline": phase_pipeline, "pure": phase_pure, "naive": phase_naive}[args.phase]
        print(json.dumps(run(args)))
        return

    from flows import server

    phases = [ph for ph in args.phases.split(",") if ph]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.overrides = effective_overrides(args, out)
    args.corpus, made_s = ensure_corpus(out, args.n, args.seed)
    print(
        f"corpus {args.corpus}: {args.n} clips "
        + (f"generated in {made_s:.1f} s" if made_s is not None else "reused")
    )
    pipeline_root, naive_root, server_root = out / "pipeline", out / "naive", out / "server"
    # Fresh stores and a fresh server database: nothing may come from an earlier run's caches.
    for folder in (p for p in (pipeline_root, naive_root, server_root) if p.exists()):
        if "pipeline" in phases or folder != pipeline_root:
            shutil.rmtree(folder)
    info = server.start(server_root, port=server.free_port(), timeout=180.0)
    env = server.client_env(server_root, info.api_url)
    print(f"Prefect server {info.api_url} (pid {info.pid})")
    rows: list[dict] = []
    server_mib = None
    try:
        roots = {"pipeline": pipeline_root, "pure": pipeline_root, "naive": naive_root}
        for phase in phases:
            print(f"running {phase} ...", flush=True)
            r = run_child(phase, args, roots[phase], env)
            if r is None:
                continue
            r["videos_per_s"] = round(r["videos"] / r["seconds"], 2) if r["seconds"] else None
            rows.append(r)
            if phase == "pipeline":
                server_mib = server_peak_mib(info.pid)
    finally:
        server.stop(server_root)
    print_table(rows, server_mib)
    if args.json:
        payload = {
            "n": args.n,
            "profile": args.profile,
            "overrides": args.overrides,
            "cpus": os.cpu_count(),
            "server_peak_rss_mib": server_mib,
            "phases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
