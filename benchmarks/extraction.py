"""Whole-extraction throughput on N demo clips: the Prefect flow vs the sum of each stage's own
compute vs a naive one-video-at-a-time loop, with the peak memory of each.

    .venv/bin/python benchmarks/extraction.py --n 96 --shard-size 32 faces.detect_every=5
    .venv/bin/python benchmarks/extraction.py --n 24 --out /tmp/bench --json /tmp/bench.json
    .venv/bin/python benchmarks/extraction.py --n 96 --profile paper models.device=cuda

Every phase runs in its own child process (so each peak RSS is that phase's alone), loads the
models and the face backend first (the pipeline also starts the faces stage's worker processes,
`faces.processes`, as a worker holds them after its first shard), reports that load time apart,
and then times its work with the same settings (the same torch threads per model stage:
`extract.model_threads`). Each phase also reports the CPU seconds it used, its faces workers and
FFmpeg children included (the Prefect server's apart):

- pipeline: `extract_flow` (scan, audio, faces, HuBERT, ASR, LLM, CLIP, health check) against a
  local Prefect server (SQLite, started under --out) into a fresh data root; wall time of the
  flow call, and per stage the seconds its shards worked (their share of the wall time; their
  sum over the wall time is the overlap achieved: 1.0 is none).
- pure: each stage alone, one after another, on every video: the FFmpeg audio split, face
  decode + detection + alignment, then each model on those outputs in the stage's own groups
  and batch budgets. The sum is what the work costs with no overlap and no orchestration: a
  pipeline that overlaps its stages beats it, one that does not cannot.
- naive: one video at a time through every step, the way the challenge baseline's scripts
  work: ffmpeg audio, face crops, CLIP on that video's crops, HuBERT on its clip, ASR on it, the
  LLM on its text, one .npy per video and modality; no batching across videos, no store, no
  Prefect.

By default every video is transcribed by the ASR model (`extract.prefer_official_transcripts=
false`) so that all four models run; --official-transcripts keeps the corpus's transcripts
instead, and then no phase runs ASR. Extra `key=value` arguments are settings overrides.
Figures depend on what else the machine runs: note the load average beside them. They also
depend on whether the machine's CPUs are cores of their own: on a 2-vCPU VM whose vCPUs behaved
as one core's two hardware threads, two processes of scalar Python ran at ~0.6 of their speed
alone (matrix products at ~0.97), so the faces (dlib) gain ~1.2x from their second worker there.
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

from tasks.dag import STAGES  # noqa: E402  (the names every phase reports its time under)

PHASES = ("pipeline", "pure", "naive")
MODEL_KINDS = ("visual", "acoustic", "asr", "text")
DEFAULT_OUT = Path(tempfile.gettempdir()) / "merflow-bench-extraction"


# -- shared helpers ----------------------------------------------------------------------------
def peak_rss_mib() -> dict[str, float]:
    """Peak RSS of this process and of its largest waited-for child (ffmpeg), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own, 1), "children_peak_rss_mib": round(kids, 1)}


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) this process, its live children (the faces workers) and its
    waited-for children (ffmpeg) have used so far."""
    return tree_cpu_seconds(os.getpid()) or 0.0


def process_tree(pid: int) -> list[Any] | None:
    """A process and its children (psutil), None when it is gone."""
    import psutil

    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return None


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process and its children (live and waited-for) have used so far, None when
    unreadable."""
    import psutil

    procs = process_tree(pid)
    if procs is None:
        return None
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


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
    from tasks.demo.corpus import TRUTH_CSV, make_demo_corpus

    folder = corpus_path(out, n, seed)
    # The truth CSV is written last: its presence means the generation finished.
    if (folder / TRUTH_CSV).exists() and len(list(folder.rglob("*.mp4"))) == n:
        return folder, None
    t0 = time.perf_counter()
    made = make_demo_corpus(folder, n_labelled=n, n_unlabelled=0, seed=seed, overwrite=True)
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


def load_models(plan: Any, need_asr: bool = True) -> tuple[dict[str, Any], Any, dict[str, float]]:
    """The models and the face backend, loaded once (as a worker process holds them), timed."""
    from tasks.faces.backends import backend_for

    loads: dict[str, float] = {}
    encoders: dict[str, Any] = {}
    for kind in MODEL_KINDS:
        if kind == "asr" and not need_asr:
            continue
        t0 = time.perf_counter()
        encoders[kind] = plan.models[kind].load()
        loads[kind] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    backend = backend_for(plan.faces)
    loads["faces"] = round(time.perf_counter() - t0, 2)
    return encoders, backend, loads


# -- phase: pipeline ---------------------------------------------------------------------------
def phase_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """The extraction flow on the corpus into a fresh data root, timed end to end."""
    from flows.extract import extract_flow
    from tasks.faces.crop import start_workers

    root = Path(args.data_root)
    _, plan = load_plan(args, root)  # checkpoints built or found before the clock starts
    # Loaded in this process before the clock, as the other phases do: the flow's tasks (threads
    # of this process) find them loaded. Dask workers would load their own: pass a
    # runner override and the load is in the wall time.
    _, _, loads = load_models(plan, not plan.official_transcripts)
    started = time.perf_counter()
    if start_workers(plan.faces):  # the faces stage's worker processes, backends loaded
        loads["faces_workers"] = round(time.perf_counter() - started, 2)
    t0, c0 = time.perf_counter(), own_cpu_seconds()
    summary = extract_flow(
        str(args.corpus), profile=args.profile, data_root=str(root), overrides=args.overrides
    )
    seconds, cpu = time.perf_counter() - t0, own_cpu_seconds() - c0
    stages = summary["stages"]
    return {
        "phase": "pipeline",
        "videos": summary["videos"],
        "shards": summary["shards"],
        "ok": min(s["processed"] for s in stages.values()),
        "failed": len(summary["failures"]),
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "stage_s": {k: v["seconds"] for k, v in stages.items()},
        "load_s": loads,
        "gpu_peak_mib": gpu_peak_mib(),
        **peak_rss_mib(),
    }


# -- phase: pure per-stage compute ---------------------------------------------------------------
def _groups(items: list[Any], stage: str) -> list[list[Any]]:
    from tasks.embed import VIDEOS_PER_GROUP

    size = VIDEOS_PER_GROUP[stage]
    return [items[i : i + size] for i in range(0, len(items), size)]


def _clock(spent: dict[str, float], stage: str, fn: Any, *args: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        spent[stage] += time.perf_counter() - t0


def phase_pure(args: argparse.Namespace) -> dict[str, Any]:
    """Each stage alone on every video, one stage after another; the sum of their times."""
    from tasks.embed import read_wav
    from tasks.engine.errors import BadInputError
    from tasks.faces.crop import crop_faces
    from tasks.faces.crop_files import load_crops
    from tasks.media import AUDIO_GROUP, extract_audio_many, find_ffmpeg

    scratch = Path(args.data_root)
    settings, plan = load_plan(args, scratch)
    videos, official = corpus_videos(args, settings, plan)
    need_asr = not all(v.stem in official for v in videos)
    enc, backend, loads = load_models(plan, need_asr)
    m = plan.models
    spent = dict.fromkeys(STAGES, 0.0)
    exe, sr = find_ffmpeg(settings.audio.ffmpeg_bin), settings.audio.sample_rate
    wavs: dict[str, Any] = {}
    crops: dict[str, Any] = {}
    n_crops = 0
    c0 = own_cpu_seconds()
    # The raw-video stages as their stages run them: the audio split AUDIO_GROUP videos per
    # ffmpeg process, the faces one video at a time.
    for i in range(0, len(videos), AUDIO_GROUP):
        jobs = [(v, scratch / v.stem / "a.wav") for v in videos[i : i + AUDIO_GROUP]]
        split = _clock(spent, "audio", extract_audio_many, jobs, exe, sr, plan.ffmpeg_threads)
        for (v, wav), result in zip(jobs, split, strict=True):
            if not isinstance(result, Exception):
                wavs[v.stem] = read_wav(wav, m["acoustic"].spec.sample_rate)
    for v in videos:
        out = scratch / v.stem
        out.mkdir(parents=True, exist_ok=True)
        try:
            _clock(spent, "faces", crop_faces, v, out / "f.npz", plan.faces, backend)
            crops[v.stem] = list(load_crops(out / "f.npz").crops)
            n_crops += len(crops[v.stem])
        except BadInputError:
            pass
    for kind in ("visual", "acoustic", "asr", "text"):
        m[kind].use_threads()
    ids = sorted(wavs)
    for group in _groups(sorted(crops), "visual"):
        flat = [c for k in group for c in crops[k]]
        _clock(spent, "visual", enc["visual"].embed, flat, m["visual"].budget)
    for group in _groups(ids, "acoustic"):
        _clock(
            spent, "acoustic", enc["acoustic"].embed, [wavs[k] for k in group], m["acoustic"].budget
        )
    texts = {k: official[k] for k in ids if k in official}
    for group in _groups([k for k in ids if k not in official], "transcribe"):
        heard = _clock(spent, "transcribe", enc["asr"].transcribe, [wavs[k] for k in group])
        texts.update({k: h.text.strip() for k, h in zip(group, heard, strict=True)})
    for group in _groups(sorted(texts), "text"):
        _clock(spent, "text", enc["text"].embed, [texts[k] for k in group], m["text"].budget)
    return {
        "phase": "pure",
        "videos": len(videos),
        "ok": min(len(wavs), len(crops)),
        "failed": len(videos) - min(len(wavs), len(crops)),
        "seconds": round(sum(spent.values()), 2),
        "cpu_s": round(own_cpu_seconds() - c0, 2),
        "stage_s": {k: round(v, 3) for k, v in spent.items()},
        "load_s": loads,
        "inputs": {
            "faces": f"{n_crops} crops",
            "acoustic": f"{sum(map(len, wavs.values())) / m['acoustic'].spec.sample_rate:.1f} s",
            "transcribe": f"{len(ids) - len(official)} clips",
            "text": f"{len(texts)} texts",
        },
        "gpu_peak_mib": gpu_peak_mib(),
        **peak_rss_mib(),
    }


def corpus_videos(args: argparse.Namespace, settings: Any, plan: Any) -> tuple[list[Path], dict]:
    """The corpus's video files, sorted, and the official transcripts the plan uses (if any)."""
    from tasks.corpus.labels import load_transcripts
    from tasks.corpus.layout import corpus_layout

    c = settings.corpus
    dirs = corpus_layout(
        Path(args.corpus).resolve(), c.labelled_dir, c.unlabelled_dir, c.video_extensions
    ).video_dirs
    exts = set(settings.corpus.video_extensions)
    videos = sorted(p for d in dirs for p in d.iterdir() if p.suffix.lower() in exts)
    official: dict[str, str] = {}
    if plan.official_transcripts:
        t = load_transcripts(Path(args.corpus) / settings.corpus.transcripts_csv)
        official = dict(zip(t.video_id, t.text, strict=True))
    return videos, official


# -- phase: naive sequential loop --------------------------------------------------------------
class StepTimer:
    """Time spent and deterministic failures per step of the naive loop."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.failed: dict[str, int] = {}

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        """fn(*args) timed under `name`; None where the input is bad (a missing modality)."""
        from tasks.engine.errors import BadInputError

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

    from tasks.embed import read_wav
    from tasks.faces.crop import crop_faces
    from tasks.faces.crop_files import load_crops
    from tasks.media import extract_audio

    scratch = Path(args.data_root)
    settings, plan = load_plan(args, scratch)
    videos, official = corpus_videos(args, settings, plan)
    m = plan.models
    enc, backend, loads = load_models(plan, not all(v.stem in official for v in videos))
    for kind in MODEL_KINDS:
        m[kind].use_threads()

    steps = StepTimer()
    sr, ffmpeg_bin = settings.audio.sample_rate, settings.audio.ffmpeg_bin
    ok = 0
    t0, c0 = time.perf_counter(), own_cpu_seconds()
    for video in videos:
        out = scratch / video.stem
        out.mkdir(parents=True, exist_ok=True)
        vectors: dict[str, Any] = {}
        wav_path, npz_path = out / "audio.wav", out / "faces.npz"
        args_ = (video, wav_path, ffmpeg_bin, sr, None, plan.ffmpeg_threads)
        if steps.run("audio", extract_audio, *args_):
            wav = read_wav(wav_path, m["acoustic"].spec.sample_rate)
            feats = steps.run("acoustic", enc["acoustic"].embed, [wav], m["acoustic"].budget)
            vectors["acoustic"] = None if feats is None else feats[0]
            text = official.get(video.stem)
            if text is None:
                result = steps.run("transcribe", enc["asr"].transcribe, [wav])
                text = result[0].text.strip() if result else ""
            feats = steps.run("text", enc["text"].embed, [text], m["text"].budget)
            vectors["text"] = None if feats is None else feats[0]
            if feats is not None and feats[0] is None:  # empty text: a missing modality
                steps.failed["text"] = steps.failed.get("text", 0) + 1
        if steps.run("faces", crop_faces, video, npz_path, plan.faces, backend):
            crops = list(load_crops(npz_path).crops)
            feats = steps.run("visual", enc["visual"].embed, crops, m["visual"].budget)
            vectors["visual"] = None if feats is None else feats.mean(0)
        for kind, vec in vectors.items():
            if vec is not None:
                np.save(out / f"{kind}.npy", vec)
        ok += all(vectors.get(k) is not None for k in ("visual", "acoustic", "text"))
    seconds, cpu = time.perf_counter() - t0, own_cpu_seconds() - c0
    return {
        "phase": "naive",
        "videos": len(videos),
        "ok": ok,
        "failed": sum(steps.failed.values()),
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "stage_s": {k: round(v, 3) for k, v in steps.spent.items()},
        "failed_steps": steps.failed,
        "load_s": loads,
        "gpu_peak_mib": gpu_peak_mib(),
        **peak_rss_mib(),
    }


# -- driver ------------------------------------------------------------------------------------
def server_peak_mib(pid: int) -> float | None:
    """Sum of the peak RSS (VmHWM) of the Prefect server's processes, None when unreadable."""
    total = 0
    for p in process_tree(pid) or []:
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
    """The three phases side by side, then per stage: seconds in each phase, the pipeline's
    share of its wall time, and the overlap it achieved."""
    by = {r["phase"]: r for r in rows}
    print(f"\n{'phase':<10}{'videos':>7}{'ok':>5}{'seconds':>9}{'videos/s':>10}"
          f"{'pure/phase':>11}{'peak RSS MiB':>14}{'GPU MiB':>9}   load s (apart)")  # fmt: skip
    pure = by.get("pure")
    for r in rows:
        ratio = f"{pure['seconds'] / r['seconds']:.2f}" if pure and r["seconds"] else "-"
        gpu = r.get("gpu_peak_mib") or "-"
        loads = sum(r.get("load_s", {}).values())
        print(
            f"{r['phase']:<10}{r['videos']:>7}{r['ok']:>5}{r['seconds']:>9}"
            f"{r['videos_per_s']:>10}{ratio:>11}{r['peak_rss_mib']:>14}{gpu:>9}   {loads:.1f}"
        )
    print("pure/phase: the pure sum of the stages' own seconds over the phase's seconds")
    for r in rows:
        if r.get("cpu_s") is not None and r["seconds"]:
            server = r.get("server_cpu_s")
            extra = f" + Prefect server {server} s" if server else ""
            print(
                f"{r['phase']}: {r['cpu_s']} CPU s in the phase's process and its ffmpeg children"
                f"{extra}; {r['cpu_s'] / r['seconds']:.2f} cores busy on average"
            )
    if "pipeline" in by and "naive" in by:
        print(f"pipeline vs naive loop: {by['naive']['seconds'] / by['pipeline']['seconds']:.2f}x")
    if server_mib is not None:
        print(f"(Prefect server, separate processes: peak RSS {server_mib} MiB)")
    pipe = by.get("pipeline")
    print(
        f"\n{'stage':<12}"
        + "".join(f"{ph + ' s':>12}" for ph in by)
        + f"{'share of pipeline wall':>24}"
    )
    for st in STAGES:
        cells = "".join(f"{by[ph]['stage_s'].get(st, 0.0):>12.2f}" for ph in by)
        share = f"{pipe['stage_s'][st] / pipe['seconds']:.0%}" if pipe and pipe["seconds"] else "-"
        print(f"{st:<12}{cells}{share:>24}")
    if pipe and pipe["seconds"]:
        busy = sum(pipe["stage_s"].values())
        print(
            f"overlap achieved: the stages worked {busy:.1f} s in {pipe['seconds']:.1f} s of wall "
            f"time = {busy / pipe['seconds']:.2f} (1.00: one stage at a time; {pipe['shards']} "
            "shards); the rest of the wall is scan, orchestration and the health check"
        )
    for r in rows:
        if r.get("inputs"):
            print(f"pure inputs: {r['inputs']}")
        if r.get("failed_steps"):
            print(f"naive failed steps: {r['failed_steps']}")


def main() -> None:
    """Make or reuse the corpus, start a Prefect server, run the three phases, print figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="number of demo clips")
    p.add_argument(
        "--shard-size", type=int, default=None, help="videos per shard (extract.shard_size)"
    )
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
    if args.shard_size:
        args.overrides.append(f"extract.shard_size={args.shard_size}")
    args.overrides = effective_overrides(args, out)
    args.corpus, made_s = ensure_corpus(out, args.n, args.seed)
    print(
        f"corpus {args.corpus}: {args.n} clips "
        + (f"generated in {made_s:.1f} s" if made_s is not None else "reused")
    )
    roots = {ph: out / ph for ph in PHASES}
    server_root = out / "server"
    # Fresh stores and a fresh server database: nothing may come from an earlier run's caches.
    for folder in (p for p in (*roots.values(), server_root) if p.exists()):
        shutil.rmtree(folder)
    info = server.start(server_root, port=server.free_port(), timeout=180.0)
    env = server.client_env(server_root, info.api_url)
    print(f"Prefect server {info.api_url} (pid {info.pid})")
    rows: list[dict] = []
    server_mib = None
    try:
        for phase in phases:
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"running {phase} ... (load average {load} on {os.cpu_count()} cores)", flush=True
            )
            server_cpu = tree_cpu_seconds(info.pid)
            r = run_child(phase, args, roots[phase], env)
            if r is None:
                continue
            after = tree_cpu_seconds(info.pid)
            if server_cpu is not None and after is not None:
                r["server_cpu_s"] = round(after - server_cpu, 2)
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
            "load_average": os.getloadavg(),
            "server_peak_rss_mib": server_mib,
            "phases": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
