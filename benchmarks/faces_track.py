"""Face crops: speed per core, and agreement with detection on every frame.

    .venv/bin/python benchmarks/faces_track.py VIDEO_OR_FOLDER... [--every 1,3,5,10] [--fps 4]
        [--mouth] [--save FILE] [--reference FILE]
    .venv/bin/python benchmarks/faces_track.py VIDEO_OR_FOLDER... --stage [--select speaking]
        [--repeats N]

Backend mode (default): for each `detect_every` k, every video is cropped by the dlib backend
(k = 1: detection on every sampled frame) in this process, one core's work; prints sampled frames
per second of CPU time (decode, detection, landmarks, alignment; no file written) and, against
the reference on the same frames, the agreement of the largest face's crop: box IoU, the 5
landmarks' mean distance (pixels, and as a share of the inter-ocular distance) and the aligned
crops' mean absolute pixel difference, plus frames with a face in one and not the other. The
reference is this run's first k, or `--reference FILE`: the first k of another run saved with
`--save FILE` (another checkout's code, to compare crops before and after a change).

`--stage`: the faces stage itself, `crop_faces` as a worker runs it (crops file written, one
decoder thread, every frame and the paper profile's detect_every unless told), per video and in
all: sampled frames per CPU second; with `--repeats N` each video's least CPU time of N runs.

Real footage is not shipped with merflow; docs/sizing.md names the clips its figures come from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm"}


def run(video: Path, every: int, fps: float | None, size: int, mouth: bool):
    """frame -> (box, 5 landmarks, crop) of the largest face with `detect_every` = every; CPU
    seconds; sampled frames."""
    from tasks.faces import backends as fb
    from tasks.faces import frames as face_frames
    from tasks.faces import track as face_track

    backend = fb.DlibBackend(detect_every=every, mouth=mouth)
    used: dict[int, np.ndarray] = {}  # id(crop) -> the 5 landmarks that aligned it
    chip, align_all, landmarks = backend.chip, backend.align_all, backend.landmarks

    def chip_spy(rgb, shape, size):
        crop = chip(rgb, shape, size)
        used[id(crop)] = face_track._points(shape)
        return crop

    def align_all_spy(rgb, size):
        found = align_all(rgb, size)
        for crop, box, *_ in found:  # detection path: the same fit again, for the record
            used[id(crop)] = face_track._points(landmarks(rgb, box))
        return found

    sampler = face_frames.FrameSampler(fps, None, threads=1)
    t0 = time.process_time()  # timed without the record keeping below
    n = sum(1 for _ in backend.faces(video, sampler, size))
    cpu = time.process_time() - t0
    backend.chip, backend.align_all = chip_spy, align_all_spy
    faces = list(backend.faces(video, face_frames.FrameSampler(fps, None, threads=1), size))
    assert len(faces) == n
    largest = {f.frame_idx: (f.box, used[id(f.crop)], f.crop) for f in faces if f.rank == 0}
    return largest, cpu, sampler.n_sampled


def save(path: Path, results: dict[str, dict]) -> None:
    """Each video's largest faces (frame -> box, landmarks, crop) into one .npz."""
    arrays = {}
    for name, got in results.items():
        frames = sorted(got)
        arrays[f"{name}|frames"] = np.asarray(frames, np.int64)
        arrays[f"{name}|boxes"] = np.asarray([got[i][0] for i in frames], np.float64).reshape(-1, 4)
        arrays[f"{name}|points"] = np.asarray([got[i][1] for i in frames], np.float64)
        arrays[f"{name}|crops"] = np.asarray([got[i][2] for i in frames], np.uint8)
    np.savez(path, **arrays)


def load(path: Path) -> dict[str, dict]:
    """What `save` wrote."""
    with np.load(path) as z:
        names = {k.split("|")[0] for k in z.files}
        out = {}
        for name in names:
            fr, bx, pt, cr = (z[f"{name}|{k}"] for k in ("frames", "boxes", "points", "crops"))
            out[name] = {int(i): (tuple(bx[j]), pt[j], cr[j]) for j, i in enumerate(fr)}
        return out


def agreement(ref: dict, got: dict) -> dict:
    """How far `got`'s largest faces are from `ref`'s on the frames both have."""
    from tasks.faces import track as face_track

    iou, nme, px, pix = [], [], [], []
    for i in sorted(set(ref) & set(got)):
        iou.append(face_track.box_iou(ref[i][0], got[i][0]))
        a, b = ref[i][1], got[i][1]
        d = np.linalg.norm(a - b, axis=1).mean()
        ocular = np.linalg.norm(a[[0, 1]].mean(0) - a[[2, 3]].mean(0))
        px.append(d)
        nme.append(d / ocular)
        pix.append(np.abs(ref[i][2].astype(np.int16) - got[i][2].astype(np.int16)).mean())
    return {
        "only_ref": len(set(ref) - set(got)),
        "only_this": len(set(got) - set(ref)),
        "iou": iou,
        "nme": nme,
        "px": px,
        "pix": pix,
    }


def backend_mode(videos: list[Path], args: argparse.Namespace) -> None:
    """Every k on every video; one JSON line per k."""
    ks = [int(k) for k in (args.every or "1,3,5,10").split(",")]
    ref = load(args.reference) if args.reference else None
    for k in ks:
        cpu, n, rows = 0.0, 0, []
        results = {}
        for v in videos:
            got, c, s = run(v, k, args.fps, args.size, args.mouth)
            cpu, n = cpu + c, n + s
            results[v.name] = got
        if k == ks[0] and args.save:
            save(args.save, results)
        if ref is None:
            ref = results
        rows = [agreement(ref[v.name], results[v.name]) for v in videos if v.name in ref]
        cat = {key: [x for r in rows for x in r[key]] for key in ("iou", "nme", "px", "pix")}

        def mean(key: str, digits: int, cat: dict = cat) -> float | None:
            return round(float(np.mean(cat[key])), digits) if cat[key] else None

        print(
            json.dumps(
                {
                    "detect_every": k,
                    "videos": len(videos),
                    "frames": n,
                    "cpu_s": round(cpu, 2),
                    "frames_per_cpu_s": round(n / cpu, 1) if cpu else None,
                    "frames_face_only_in_reference": sum(r["only_ref"] for r in rows),
                    "frames_face_only_in_this": sum(r["only_this"] for r in rows),
                    "box_iou_mean": mean("iou", 3),
                    "box_iou_min": round(float(np.min(cat["iou"])), 3) if cat["iou"] else None,
                    "landmark_px_mean": mean("px", 2),
                    "landmark_nme_mean": mean("nme", 4),
                    "crop_abs_diff_mean": mean("pix", 2),
                }
            ),
            flush=True,
        )


def stage_mode(videos: list[Path], args: argparse.Namespace) -> None:
    """The faces stage's own rate: crop_faces per video (crops written), one decoder thread."""
    from tasks.faces.backends import backend_for
    from tasks.faces.crop import crop_faces
    from tasks.faces.settings import FaceSettings

    if args.every:
        every = int(args.every)
    else:  # the paper profile's
        from flows.config import load_settings
        from flows.plan import face_settings

        every = face_settings(load_settings("paper")).detect_every
    settings = FaceSettings(
        backend="dlib", size=args.size, fps=args.fps, detect_every=every, select=args.select,
        decode_threads=1, processes=0,
    )  # fmt: skip
    backend = backend_for(settings)  # loaded before the clock starts, as a worker holds it
    cpu_all, n_all = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="merflow-faces-") as tmp:
        for v in videos[:1]:  # warm-up, untimed: first calls, caches, the file system
            crop_faces(v, Path(tmp) / f"{v.stem}.npz", settings, backend)
        for v in videos:
            cpus = []
            for _ in range(args.repeats):  # the least CPU of the repeats: the others were
                t0 = time.process_time()  # slowed by something else on the machine
                result = crop_faces(v, Path(tmp) / f"{v.stem}.npz", settings, backend)
                cpus.append(time.process_time() - t0)
            cpu = min(cpus)
            cpu_all, n_all = cpu_all + cpu, n_all + result.n_frames_sampled
            row = {
                "video": v.name,
                "frames": result.n_frames_sampled,
                "faces": result.n_faces_all,
                "frames_per_cpu_s": round(result.n_frames_sampled / cpu, 1),
            }
            print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "select": args.select,
                "detect_every": every,
                "repeats": args.repeats,
                "videos": len(videos),
                "frames": n_all,
                "cpu_s": round(cpu_all, 2),
                "frames_per_cpu_s": round(n_all / cpu_all, 1),
            }
        )
    )


def main() -> None:
    """Parse the arguments and run the chosen mode."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument(
        "--every", help="detect_every values (default 1,3,5,10; --stage: one, the paper profile's)"
    )
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default every frame)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--limit", type=int, default=None, help="at most this many videos")
    p.add_argument("--mouth", action="store_true", help="fit the 68 points too (speaking face)")
    p.add_argument("--save", type=Path, help="save the first k's crops as a reference")
    p.add_argument("--reference", type=Path, help="compare against a saved reference")
    p.add_argument("--stage", action="store_true", help="time the faces stage itself")
    p.add_argument("--select", default="largest", choices=("largest", "speaking"))
    p.add_argument(
        "--repeats", type=int, default=1, help="--stage: crop each video this many times, "
        "count the least CPU (a noisy machine's steady state)",
    )  # fmt: skip
    args = p.parse_args()
    videos = sorted(
        v
        for p_ in args.paths
        for v in ([p_] if p_.is_file() else p_.rglob("*"))
        if v.suffix.lower() in VIDEO_SUFFIXES
    )[: args.limit]
    (stage_mode if args.stage else backend_mode)(videos, args)


if __name__ == "__main__":
    main()
