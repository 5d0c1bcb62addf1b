"""Face crops with tracking vs detection on every frame: speed and crop agreement.

    .venv/bin/python benchmarks/faces_track.py VIDEO_OR_FOLDER... [--every 1,3,5,10] [--fps 4]

For each `detect_every` k, every video is cropped by the dlib backend (k = 1 is today's
detection on every sampled frame) in this process, one core's work; prints sampled frames per
second of CPU time (decode, detection, landmarks, alignment; no file written) and, against
k = 1 on the same frames, the agreement of the crops: box IoU, the 5 landmarks' mean distance
(pixels, and as a share of the inter-ocular distance) and the aligned crops' mean absolute
pixel difference, plus faces found by one and not the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


def run(video: Path, every: int, fps: float | None, size: int) -> tuple[dict, float, int]:
    """frame -> (box, 5 landmarks, crop) with `detect_every` = every; CPU seconds; frames."""
    from tasks.faces import backends as fb
    from tasks.faces import frames as face_frames
    from tasks.faces import track as face_track

    backend = fb.DlibBackend(detect_every=every)
    used: dict[int, np.ndarray] = {}  # id(crop) -> the landmarks that aligned it
    chip, align, landmarks = backend.chip, backend.align, backend.landmarks

    def chip_spy(rgb, shape, size):
        crop = chip(rgb, shape, size)
        used[id(crop)] = face_track._points(shape)
        return crop

    def align_spy(rgb, size):
        found = align(rgb, size)
        if found is not None:  # detection path: the same fit again, for the record
            used[id(found[0])] = face_track._points(landmarks(rgb, found[1]))
        return found

    sampler = face_frames.FrameSampler(fps, None)
    t0 = time.process_time()  # timed without the record keeping below
    n = sum(1 for _ in backend.faces(video, sampler, size))
    cpu = time.process_time() - t0
    backend.chip, backend.align = chip_spy, align_spy
    faces = list(backend.faces(video, face_frames.FrameSampler(fps, None), size))
    assert len(faces) == n
    return {f.frame_idx: (f.box, used[id(f.crop)], f.crop) for f in faces}, cpu, sampler.n_sampled


def main() -> None:
    """Run every k on every video; print one JSON line per k."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--every", default="1,3,5,10")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default every frame)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--limit", type=int, default=None, help="at most this many videos")
    args = p.parse_args()
    from tasks.faces import track as face_track

    videos = sorted(v for p_ in args.paths for v in ([p_] if p_.is_file() else p_.rglob("*.mp4")))
    videos = videos[: args.limit]
    ks = [int(k) for k in args.every.split(",")]
    ref: dict[Path, dict] = {}
    for k in ks:
        cpu, n, iou, nme, px, pix, only_ref, only_k = 0.0, 0, [], [], [], [], 0, 0
        for v in videos:
            got, c, s = run(v, k, args.fps, args.size)
            cpu, n = cpu + c, n + s
            if k == ks[0]:
                ref[v] = got
            r = ref[v]
            only_ref += len(set(r) - set(got))
            only_k += len(set(got) - set(r))
            for i in sorted(set(r) & set(got)):
                iou.append(face_track.box_iou(r[i][0], got[i][0]))
                a, b = r[i][1], got[i][1]
                d = np.linalg.norm(a - b, axis=1).mean()
                ocular = np.linalg.norm(a[[0, 1]].mean(0) - a[[2, 3]].mean(0))
                px.append(d)
                nme.append(d / ocular)
                pix.append(np.abs(r[i][2].astype(np.int16) - got[i][2].astype(np.int16)).mean())
        row = {
            "detect_every": k,
            "videos": len(videos),
            "frames": n,
            "cpu_s": round(cpu, 2),
            "frames_per_cpu_s": round(n / cpu, 1) if cpu else None,
            "faces_only_k1": only_ref,
            "faces_only_this": only_k,
            "box_iou_mean": round(float(np.mean(iou)), 3) if iou else None,
            "box_iou_min": round(float(np.min(iou)), 3) if iou else None,
            "landmark_px_mean": round(float(np.mean(px)), 2) if px else None,
            "landmark_nme_mean": round(float(np.mean(nme)), 4) if nme else None,
            "crop_abs_diff_mean": round(float(np.mean(pix)), 2) if pix else None,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
