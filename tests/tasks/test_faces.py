"""Face crops: frame sampling, the three backends, the crops file, shards and the local command."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image
from typer.testing import CliRunner

from data_contracts import tables
from data_contracts.store import Store
from flows.task_cli import task_app
from tasks.faces import backends as face_backends
from tasks.faces import openface as face_openface
from tasks.faces.backends import load_backend
from tasks.faces.crop import NoFaceError, crop_faces, crop_faces_shard
from tasks.faces.crop_files import (
    CHOSEN_COLOUR,
    OTHER_COLOUR,
    CropWriter,
    load_crops,
    load_tracks,
    track_sheet,
)
from tasks.faces.frames import BackendUnavailableError, Face, FrameSampler
from tasks.faces.openface import OpenFaceBackend, parse_openface_output
from tasks.faces.settings import THRESHOLDS, FaceSettings, faces_extractor_id
from tasks.media import NoVideoStreamError, TruncatedMediaError, UnreadableMediaError
from tasks.raw_video_tasks import crop_faces_task
from tests.tasks import badmedia

# Where dlib's HOG detector puts the astronaut's face in the 512 x 512 photo.
ASTRONAUT_BOX = (179, 83, 266, 170)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Face and no-face clips, generated once for the module."""
    d = tmp_path_factory.mktemp("faces")
    face = badmedia.face_clip(d / "face clip ü 视频.mp4", seconds=1.0, rate=5)
    seekable = badmedia.testsrc_clip(d / "fast.mp4", seconds=2.0, faststart=True)
    out = {
        "face": face,
        "rotated": badmedia.face_clip(d / "rotated.mp4", seconds=0.4, rate=5, angle=20),
        "small_face": badmedia.face_clip(d / "small.mp4", seconds=0.4, rate=5, size=256),
        "face_then_blank": badmedia.face_then_blank_clip(d / "face_then_blank.mp4", rate=5),
        "one_frame_face": badmedia.face_clip(d / "one.mp4", seconds=1.0, rate=1),
        "no_face": badmedia.testsrc_clip(d / "no_face.mp4", seconds=1.0),
        "one_frame": badmedia.one_frame(d / "one_frame.mp4"),
        "audio_only": badmedia.audio_only(d / "audio_only.mp4"),
        "zero_byte": badmedia.zero_byte(d / "zero_byte.mp4"),
        "text": badmedia.text_as_mp4(d / "text.mp4"),
        "truncated": badmedia.truncated(seekable, d / "truncated.mp4", 0.6),
    }
    out["symlink"] = badmedia.symlink(face, d / "link to face.mp4")
    return out


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return w * h / (area - w * h)


# -- sampling ------------------------------------------------------------------------------------
def sample(sampler: FrameSampler, n: int, rate: float, plan: bool = True) -> list[int]:
    if plan:
        sampler.plan(n, rate)
    kept = []
    for i in range(n):
        if sampler.accept(i / rate):
            kept.append(i)
        if sampler.full:
            break
    return kept


def test_sampler_keeps_every_frame_by_default():
    s = FrameSampler()
    assert sample(s, 50, 25) == list(range(50))
    assert (s.n_decoded, s.n_sampled) == (50, 50)


def test_sampler_fps_keeps_frames_by_timestamp():
    s = FrameSampler(fps=5)
    assert sample(s, 50, 25) == list(range(0, 50, 5))
    assert sample(FrameSampler(fps=50), 10, 25) == list(range(10))  # never more than there are


def test_sampler_max_frames_spreads_over_the_video_and_stops_early():
    s = FrameSampler(max_frames=4)
    assert sample(s, 100, 25) == [0, 25, 50, 75]
    unknown_length = FrameSampler(max_frames=4)
    assert sample(unknown_length, 100, 25, plan=False) == [0, 1, 2, 3]
    assert unknown_length.n_decoded == 4  # decoding stopped once enough frames were kept
    both = FrameSampler(fps=5, max_frames=3)
    assert sample(both, 100, 25) == [0, 35, 70]


def test_frames_stream_in_bounded_memory(tmp_path):
    # 600 frames of 640x480 RGB are 550 MB as arrays; streaming holds about one at a time.
    long = badmedia.testsrc_clip(tmp_path / "long.mp4", seconds=24, size="640x480", audio=False)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, count, sampler = base, 0, FrameSampler()
    for idx, rgb in sampler.frames(long):
        assert rgb.shape == (480, 640, 3) and idx == count
        count += 1
        if count % 25 == 0:
            peak = max(peak, proc.memory_info().rss)
    assert count == sampler.n_decoded == 600
    assert peak - base < 150 * 2**20


def test_frames_are_the_pixels_ffmpeg_converts(tmp_path):
    # The sampler converts every frame with one converter for the stream; the pixels are those
    # of PyAV's own per-frame conversion, colour matrix and rounding included.
    import av

    clip = badmedia.testsrc_clip(tmp_path / "t.mp4", seconds=1, size="320x240", audio=False)
    with av.open(str(clip)) as container:
        expected = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    got = [rgb for _, rgb in FrameSampler().frames(clip)]
    assert len(got) == len(expected) > 5
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


# -- backends ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["dlib", "opencv"])
def test_backend_crops_the_face_of_every_frame(clips, tmp_path, backend):
    result = crop_faces(clips["face"], tmp_path / "f.npz", FaceSettings(backend=backend))
    assert (result.n_frames_decoded, result.n_frames_sampled, result.n_faces) == (5, 5, 5)
    assert result.face_ratio == 1.0 and result.backend == backend
    crops = load_crops(result.path)
    assert crops.crops.shape == (5, 112, 112, 3) and crops.crops.dtype == np.uint8
    assert list(crops.frame_idx) == [0, 1, 2, 3, 4]
    assert min(iou(box, ASTRONAUT_BOX) for box in crops.boxes) > 0.6
    assert np.isfinite(crops.confidence).all()
    assert result.mean_confidence == pytest.approx(float(crops.confidence.mean()), rel=1e-5)
    # A face, not background: skin tones dominate the centre of the crop.
    centre = crops.crops[:, 40:80, 36:76].astype(float).mean(axis=(0, 1, 2))
    assert centre[0] > centre[2] + 20  # red over blue


@pytest.mark.parametrize("backend", ["dlib", "opencv"])
def test_alignment_undoes_a_head_tilt(clips, tmp_path, backend):
    settings = FaceSettings(backend=backend)
    upright = load_crops(crop_faces(clips["face"], tmp_path / "u.npz", settings).path).crops
    tilted = load_crops(crop_faces(clips["rotated"], tmp_path / "r.npz", settings).path).crops
    aligned_gap = np.abs(upright[0].astype(float) - tilted[0].astype(float)).mean()
    # The same tilted face cut out without alignment differs far more from the upright crop.
    unaligned = np.asarray(Image.fromarray(upright[0]).rotate(20, Image.Resampling.BILINEAR))
    unaligned_gap = np.abs(upright[0].astype(float) - unaligned.astype(float)).mean()
    assert aligned_gap < 0.5 * unaligned_gap


def test_dlib_finds_small_faces_by_looking_closer(clips, tmp_path):
    result = crop_faces(clips["small_face"], tmp_path / "s.npz")
    assert result.n_faces == result.n_frames_sampled == 2


def test_frames_without_a_face_are_skipped_and_counted(clips, tmp_path):
    result = crop_faces(clips["face_then_blank"], tmp_path / "fb.npz")
    assert (result.n_frames_sampled, result.n_faces, result.face_ratio) == (10, 5, 0.5)
    assert list(load_crops(result.path).frame_idx) == [0, 1, 2, 3, 4]


def test_sampling_settings_reach_the_backend(clips, tmp_path):
    result = crop_faces(clips["face_then_blank"], tmp_path / "x.npz", FaceSettings(max_frames=4))
    # Frames 0, 3, 6, 9 of 10: spread over the clip; 6 and 9 show no face.
    assert (result.n_frames_decoded, result.n_frames_sampled, result.n_faces) == (10, 4, 2)
    assert list(load_crops(result.path).frame_idx) == [0, 3]
    early = crop_faces(clips["face_then_blank"], tmp_path / "y.npz", FaceSettings(fps=1))
    assert (early.n_frames_sampled, early.n_faces) == (2, 1)


def test_a_one_frame_video_gives_one_crop(clips, tmp_path):
    result = crop_faces(clips["one_frame_face"], tmp_path / "one.npz")
    assert (result.n_frames_decoded, result.n_faces) == (1, 1)


@pytest.mark.parametrize(
    ("name", "error", "says"),
    [
        ("no_face", NoFaceError, "no face in any of the 25 sampled frames"),
        ("one_frame", NoFaceError, "no face in any of the 1 sampled frames"),
        ("audio_only", NoVideoStreamError, "no video stream"),
        ("zero_byte", UnreadableMediaError, "empty"),
        ("text", UnreadableMediaError, "not a video"),
        ("truncated", TruncatedMediaError, "truncated"),
    ],
)
def test_bad_videos_write_no_crops(clips, tmp_path, name, error, says):
    with pytest.raises(error, match=says) as e:
        crop_faces(clips[name], tmp_path / "x.npz")
    assert clips[name].name in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither an empty crops file nor a scratch file


def test_backends_load_once_per_process():
    assert load_backend("dlib") is load_backend("dlib")
    assert face_backends.backend_for(FaceSettings()) is load_backend("dlib")
    with pytest.raises(ValueError, match="choose one of dlib, opencv, openface"):
        load_backend("mediapipe")


# -- OpenFace ------------------------------------------------------------------------------------
def test_openface_without_a_binary_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(face_openface.OPENFACE_ENV, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackendUnavailableError, match=r"no binary is configured.*openface_bin"):
        OpenFaceBackend()
    with pytest.raises(BackendUnavailableError, match="'/opt/OpenFace/FeatureExtraction'"):
        OpenFaceBackend("/opt/OpenFace/FeatureExtraction")


def fake_openface_output(folder: Path, stem: str = "input") -> Path:
    """What FeatureExtraction leaves: a CSV with spaced headers and aligned PNGs per frame."""
    aligned = folder / f"{stem}_aligned"
    aligned.mkdir(parents=True)
    xs = [f"x_{i}" for i in range(5)]
    ys = [f"y_{i}" for i in range(5)]
    header = ["frame", "face_id", "timestamp", "confidence", "success", *xs, *ys]
    rows = [
        [1, 0, 0.0, 0.98, 1, 200, 210, 220, 230, 240, 90, 95, 100, 150, 160],
        [2, 0, 0.04, 0.10, 0, *[0] * 10],  # tracking lost: no image
        [3, 0, 0.08, 0.95, 1, *[0] * 10],  # -nobadaligned dropped its image
        [4, 0, 0.12, 0.90, 1, 190, 200, 210, 220, 250, 80, 85, 90, 140, 170],
    ]
    lines = [", ".join(header)] + [", ".join(str(v) for v in r) for r in rows]
    (folder / f"{stem}.csv").write_text("\n".join(lines) + "\n")
    face = badmedia.face_image()[83:170, 179:266]
    Image.fromarray(face).resize((112, 112)).save(aligned / "frame_det_00_000001.png")
    Image.fromarray(face).resize((96, 96)).save(aligned / "frame_det_00_000004.png")
    return folder


def test_openface_output_is_parsed(tmp_path):
    out = fake_openface_output(tmp_path / "out")
    sampler = FrameSampler()
    faces = list(parse_openface_output(out, "input", sampler, 112))
    assert [f.frame_idx for f in faces] == [0, 3]  # OpenFace counts frames from 1
    assert [f.confidence for f in faces] == pytest.approx([0.98, 0.90])
    assert faces[0].box == (200, 90, 240, 160) and faces[1].box == (190, 80, 250, 170)
    assert all(f.crop.shape == (112, 112, 3) for f in faces)  # the 96 px image is resized
    assert (sampler.n_decoded, sampler.n_sampled) == (4, 4)
    with pytest.raises(UnreadableMediaError, match=r"wrote no other\.csv"):
        list(parse_openface_output(out, "other", FrameSampler(), 112))


def test_openface_command_asks_for_aligned_unmasked_png_faces(tmp_path):
    binary = tmp_path / "FeatureExtraction"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    cmd = OpenFaceBackend(str(binary)).command(Path("v.mp4"), Path("out"), 112)
    assert cmd[:5] == [str(binary), "-f", "v.mp4", "-out_dir", "out"]
    for flag in ["-simalign", "-nomask", "-nobadaligned"]:
        assert flag in cmd
    assert (
        cmd[cmd.index("-simsize") + 1] == "112" and cmd[cmd.index("-format_aligned") + 1] == "png"
    )


def test_openface_backend_runs_the_binary_on_any_file_name(clips, tmp_path):
    # A stand-in FeatureExtraction that writes the files the real one would, so the run,
    # the ASCII-named link and the parse are exercised end to end.
    fixture = fake_openface_output(tmp_path / "fixture")
    binary = tmp_path / "FeatureExtraction"
    binary.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do case "$1" in -f) f="$2"; shift;; -out_dir) o="$2"; shift;; '
        "esac; shift; done\n"
        'test -r "$f" || exit 3\n'
        's=$(basename "$f"); s="${s%.*}"; mkdir -p "$o"\n'
        f'cp "{fixture}/input.csv" "$o/$s.csv"\n'
        f'cp -r "{fixture}/input_aligned" "$o/${{s}}_aligned"\n'
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    settings = FaceSettings(backend="openface", openface_bin=str(binary))
    result = crop_faces(clips["face"], tmp_path / "o.npz", settings)
    assert (result.backend, result.n_faces, result.n_frames_sampled) == ("openface", 2, 4)
    assert result.mean_confidence == pytest.approx(0.94)


# -- crops file and preview ----------------------------------------------------------------------
def test_crop_writer_spills_to_disk_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    with CropWriter(tmp_path / "c.npz", 32, chunk=3) as writer:
        for i, crop in enumerate(frames):
            writer.add(Face(i * 2, crop, (i, i, i + 5, i + 5), i / 10))
        writer.commit()
    crops = load_crops(tmp_path / "c.npz")
    assert np.array_equal(crops.crops, frames)
    assert list(crops.frame_idx) == list(range(0, 20, 2)) and crops.frame_idx.dtype == np.int32
    assert crops.boxes.shape == (10, 4) and crops.confidence[3] == pytest.approx(0.3)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]
    with pytest.raises(ValueError, match=r"expected \(32, 32, 3\) uint8"):
        CropWriter(tmp_path / "d.npz", 32).add(Face(0, frames[0][:16], (0, 0, 1, 1), 1.0))


def test_crops_archive_is_plain_deflate_that_any_zip_reader_checks(tmp_path):
    # ISA-L deflates the archive in zipfile's place: the members are standard deflate with the
    # right CRCs, smaller than the raw arrays when the crops are compressible (a smooth face).
    import zipfile

    face = badmedia.face_image(0.0, 64)
    crops = np.stack([np.roll(face, i, axis=1) for i in range(40)])
    with CropWriter(tmp_path / "c.npz", 64) as writer:
        for i, crop in enumerate(crops):
            writer.add(Face(i, crop, (0, 0, 10, 10), 1.0))
        writer.commit()
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert z.testzip() is None  # every member's CRC checks
        member = z.getinfo("crops.npy")
        assert member.compress_type == zipfile.ZIP_DEFLATED
        assert member.compress_size < 0.9 * member.file_size
    assert np.array_equal(load_crops(tmp_path / "c.npz").crops, crops)


def test_crop_writer_memory_stays_bounded(tmp_path):
    import tracemalloc

    # 1,500 crops of 112 x 112 are 56 MiB; the writer holds one chunk plus the archive buffer.
    crop = np.tile(np.arange(112, dtype=np.uint8)[:, None, None], (1, 112, 3))
    tracemalloc.start()
    try:
        with CropWriter(tmp_path / "big.npz", 112, chunk=64) as writer:
            for i in range(1500):
                writer.add(Face(i, crop, (0, 0, 1, 1), 1.0))
            writer.commit()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20
    assert load_crops(tmp_path / "big.npz").crops.shape == (1500, 112, 112, 3)


def test_contact_sheet_has_a_row_per_track_and_frames_the_chosen_faces(tmp_path):
    # Two tracks over 10 frames: track 0 chosen (grey level = frame), track 1 not (white).
    with CropWriter(tmp_path / "c.npz", 20) as writer:
        for i in range(10):
            writer.add(Face(i, np.full((20, 20, 3), 10 * i, np.uint8), (0, 0, 9, 9), 1.0))
            writer.add(Face(i, np.full((20, 20, 3), 250, np.uint8), (50, 0, 59, 9), 1.0, 1))
        writer.commit(np.arange(20) % 2 == 0, np.arange(20) % 2)
    tracks = load_tracks(tmp_path / "c.npz")
    sheet = np.asarray(Image.open(track_sheet(tracks, tmp_path / "s.png", cols=4)))
    cell, label, head, row_h = 28, 150, 30, 48
    assert sheet.shape == (head + 2 * row_h + 4, label + 4 * cell + 4, 3)
    # Row 0: frames 0, 3, 6, 9 of track 0 in green frames; row 1: white crops in grey frames.
    assert [sheet[head + 10, label + c * cell + 10, 0] for c in range(4)] == [0, 30, 60, 90]
    assert tuple(sheet[head + 1, label + 1]) == CHOSEN_COLOUR
    assert tuple(sheet[head + row_h + 1, label + 1]) == OTHER_COLOUR
    assert sheet[head + row_h + 10, label + 10, 0] == 250


# -- settings ------------------------------------------------------------------------------------
def test_extractor_id_names_the_settings_and_hashes_them():
    base = faces_extractor_id("dlib", 112)
    assert base.startswith("faces-dlib-112-all-") and base == FaceSettings().extractor_id
    assert faces_extractor_id("dlib", 112, fps=5, max_frames=30).startswith(
        "faces-dlib-112-5fps-max30-"
    )
    assert faces_extractor_id("dlib", 112, padding=0.3) != base
    assert faces_extractor_id("dlib", 224) != base
    # OpenFace frames faces itself: the light backends' knobs do not change its crops.
    assert faces_extractor_id("openface", padding=0.3) == faces_extractor_id("openface")


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"backend": "mtcnn"}, "choose one of dlib, opencv, openface"),
        ({"size": 8}, "crop size 8"),
        ({"fps": 0}, "fps must be positive"),
        ({"max_frames": 0}, "max_frames must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, says):
    with pytest.raises(ValueError, match=says):
        FaceSettings(**kwargs)


# -- shards --------------------------------------------------------------------------------------
SHARD = ["face", "no_face", "symlink", "audio_only", "zero_byte", "text", "face_then_blank"]


def manifest(clips: dict[str, Path], names: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "video_id": [f"sample_{i:08d}" for i in range(len(names))],
            "path": [str(clips[n]) for n in names],
            "sha256": [f"{i:064x}" for i in range(len(names))],
        }
    )


def test_shard_writes_crops_and_failures(clips, tmp_path):
    store = Store(tmp_path / "data")
    settings = FaceSettings(fps=5)
    report = crop_faces_shard(manifest(clips, SHARD), store, settings)
    assert (report.processed, report.failed) == (3, 4)
    assert report.reasons == {
        "NoFaceError": 1,
        "NoVideoStreamError": 1,
        "UnreadableMediaError": 2,
    }
    faces = store.read(tables.FACES).set_index("video_id")
    assert list(faces.index) == ["sample_00000000", "sample_00000002", "sample_00000006"]
    assert set(faces.extractor_id) == {settings.extractor_id}
    assert faces.loc["sample_00000006", "face_ratio"] == pytest.approx(0.5)
    for row in faces.itertuples():
        assert load_crops(store.root / row.path).crops.shape[1:] == (112, 112, 3)
    failures = store.read(tables.FAILURES).set_index("video_id")
    assert failures.loc["sample_00000001", "error_type"] == "NoFaceError"
    assert "no_face.mp4" in failures.loc["sample_00000001", "message"]
    again = crop_faces_shard(manifest(clips, SHARD), store, settings)
    assert (again.processed, again.skipped, again.failed) == (0, 7, 0)


def test_demo_corpus_clips_all_give_faces(small_corpus, tmp_path):
    paths = sorted(small_corpus.rglob("*.mp4"))
    videos = pd.DataFrame(
        {
            "video_id": [p.stem for p in paths],
            "path": [str(p) for p in paths],
            "sha256": [f"{i:064x}" for i in range(len(paths))],
        }
    )
    store = Store(tmp_path / "data")
    report = crop_faces_shard(videos, store, FaceSettings(max_frames=4))
    assert (report.processed, report.failed) == (len(paths), 0)
    faces = store.read(tables.FACES)
    assert (faces.n_frames_sampled == 4).all() and faces.face_ratio.mean() >= 0.9


def test_a_shard_without_the_openface_binary_stops_before_any_video(clips, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    store = Store(tmp_path / "data")
    with pytest.raises(BackendUnavailableError):
        crop_faces_shard(manifest(clips, ["face"]), store, FaceSettings(backend="openface"))
    assert store.read(tables.FAILURES).empty  # a setup problem, not the video's fault


def test_the_prefect_task_wraps_the_plain_function(clips, tmp_path):
    videos = manifest(clips, ["face", "no_face"])
    report = crop_faces_task.fn(videos, str(tmp_path / "data"), FaceSettings(max_frames=2))
    assert (report.processed, report.failed) == (1, 1)
    assert crop_faces_task.name == "crop-faces" and crop_faces_task.retries == 2


# -- local command -------------------------------------------------------------------------------
def test_cli_crop_faces_writes_crops_and_a_preview(clips, tmp_path):
    preview = tmp_path / "sheet.png"
    # The demo profile samples 4 frames/s at 64 px; every frame at 112 px here.
    args = ["crop-faces", str(clips["symlink"]), "faces.fps=null", "faces.size=112"]
    result = CliRunner().invoke(
        task_app, [*args, "--out", str(tmp_path), "--preview", str(preview)]
    )
    assert result.exit_code == 0, result.output
    assert "5 decoded, 5 sampled, a chosen face in 100% of them, any face in 100%" in result.output
    assert (tmp_path / "link to face.faces.npz").is_file()
    assert "tracks   1 (0 faces not chosen), 0 cuts" in result.output
    # One track of 5 faces: a label column and 5 of 8 cells of (112 + 8) px, one row.
    assert Image.open(preview).size == (150 + 8 * 120 + 4, 30 + 120 + 4)


def test_cli_crop_faces_runs_the_profiles_face_settings(clips, tmp_path):
    """`--profile paper` crops as the paper profile's flow does: its backend (OpenFace, dlib where
    the binary is missing), 112 px, the speaking face, detection every 10th frame; the extractor id
    is the flow's."""
    from flows.config import load_settings
    from flows.plan import face_settings

    args = ["crop-faces", str(clips["face"]), "--profile", "paper", "--out", str(tmp_path)]
    result = CliRunner().invoke(task_app, args)
    assert result.exit_code == 0, result.output
    paper = face_settings(load_settings("paper"))
    assert (paper.select, paper.detect_every, paper.size) == ("speaking", 10, 112)
    line = f"faces    {paper.backend}, 112 px, select speaking, detect every 10 (profile paper; "
    assert f"{line}{paper.extractor_id})" in result.output
    assert "x 112x112 RGB crops" in result.output
    # An option given on the command line replaces the profile's value, and only that one.
    again = CliRunner().invoke(task_app, [*args, "--select", "largest"])
    assert again.exit_code == 0, again.output
    assert "select largest, detect every 10 (profile paper;" in again.output


def test_cli_crop_faces_reports_no_face(clips, tmp_path):
    result = CliRunner().invoke(
        task_app, ["crop-faces", str(clips["no_face"]), "faces.fps=null", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1 and "no face in any of the 25 sampled frames" in result.output


def test_provenance_is_the_structured_settings_not_a_parsed_id():
    settings = FaceSettings(backend="opencv", size=96, fps=2, max_frames=7, padding=0.3)
    prov = settings.provenance()
    assert prov["faces_extractor_id"] == settings.extractor_id
    # What the id only hashes is spelled out: detect_max_side, padding, the thresholds.
    assert prov["faces_settings"]["padding"] == 0.3
    assert prov["faces_settings"]["detect_max_side"] == 640
    assert prov["face_thresholds"] == THRESHOLDS["opencv"]
    assert (prov["face_backend"], prov["crop_size"], prov["frame_rate"]) == ("opencv", 96, 2)
    assert prov["max_frames"] == 7 and prov["frame_sampling"] == "2fps-max7"
