"""The mertools visual recipe computes the challenge baseline's feature (docs/method.md §2).

The baseline (MERTools' extract_openface.py and extract_vision_huggingface.py) reads every
image of OpenFace's `<video>_aligned/` folder in sorted order with cv2 (BGR), turns each into an
RGB PIL image, runs transformers' CLIP image processor and `CLIPModel.get_image_features` in
batches of 32, in fp32, and averages over the frames. `baseline_feature` restates that with
plain transformers, open_clip, cv2 and numpy calls, and no merflow code; merflow's stored
feature of the same OpenFace output, through its real faces and visual stages, must equal it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from data_contracts.store import Store
from models.extractors import load_extractor, planned_extractor_id
from models.registry import CheckpointMismatchError, get_spec
from models.visual import RecipeDtypeError
from tasks.embed import ModelChoice, visual_stage
from tasks.engine.stage import run_stage
from tasks.faces.crop import faces_stage
from tasks.faces.settings import FaceSettings
from tests.tasks import badmedia
from tests.tasks.test_openface_reader import BLACK, face_crop, write_openface_output

pytestmark = pytest.mark.usefixtures("one_thread")

# openai/clip-vit-large-patch14's preprocessor_config.json (the baseline's processor), with the
# sizes of the tiny model's 64 px input in place of 224, as its own checkpoint would ship it.
TINY_PREPROCESSOR = {
    "crop_size": {"height": 64, "width": 64},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 64},
}

# OpenFace's output for one video as its defaults leave it: masked and unmasked faces, and frames
# where tracking failed, written as black images (every frame has one).
FRAMES = [
    (1, True, face_crop(11)),
    (2, True, face_crop(12, masked=True)),
    (3, False, BLACK),
    (4, True, face_crop(14)),
    (5, True, face_crop(15, masked=True)),
    (6, False, BLACK),
    (7, True, face_crop(17, masked=True)),
]


def baseline_feature(aligned: Path, model_dir: Path, processor_config: dict) -> np.ndarray:
    """The baseline's utterance feature of one OpenFace `_aligned` folder, restated."""
    import open_clip
    from transformers import CLIPImageProcessorPil

    frames = [cv2.imread(str(path)) for path in sorted(aligned.iterdir())]
    images = [Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)) for frame in frames]
    # transformers 4.28's CLIPImageProcessor, the baseline's, resized with PIL: in 5.x that is
    # CLIPImageProcessorPil (CLIPImageProcessor now resizes with torchvision).
    processor = CLIPImageProcessorPil(**processor_config)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    with torch.no_grad():
        features = torch.cat([model.encode_image(batch) for batch in pixels.split(32)])
    return features.numpy().mean(axis=0)


@pytest.fixture(scope="module")
def openface_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A prepared OpenFace output, a fake FeatureExtraction that leaves it in -out_dir and
    records its arguments, and a real clip to run it on: (output, binary, clip). Run with
    merflow's flags (-nomask ... -nobadaligned) it leaves PNGs of the tracked frames instead."""
    root = tmp_path_factory.mktemp("openface")
    prepared = write_openface_output(root / "prepared", FRAMES, "bmp")
    tracked = [(f, ok, image if ok else None) for f, ok, image in FRAMES]
    merflow = write_openface_output(root / "prepared-merflow", tracked, "png")
    binary = root / "FeatureExtraction"
    binary.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{root}/args"\n'
        f'case " $* " in *" -nomask "*) src="{merflow}" ;; *) src="{prepared}" ;; esac\n'
        'while [ $# -gt 0 ]; do [ "$1" = "-out_dir" ] && out="$2"; shift; done\n'
        'mkdir -p "$out" && cp -R "$src/." "$out/"\n'
    )
    binary.chmod(0o755)
    clip = badmedia.face_clip(root / "clip.mp4", seconds=0.4, rate=5, size=128, audio=False)
    return prepared, binary, clip


def _stored_features(openface_run, tiny_models: Path, root: Path, recipe: str) -> pd.DataFrame:
    """The faces stage (OpenFace, `recipe`) then the visual stage (tiny CLIP, `recipe`) into a
    store at `root`; the visual table."""
    _, binary, clip = openface_run
    videos = pd.DataFrame([{"video_id": "clip", "sha256": "0" * 64, "path": str(clip)}])
    faces = FaceSettings(backend="openface", openface_bin=str(binary), recipe=recipe, processes=0)
    store = Store(root)
    assert run_stage(faces_stage(faces), videos, store).processed == 1
    model = ModelChoice("tiny-clip-vit", models_dir=str(tiny_models), device="cpu", recipe=recipe)
    stage = visual_stage(model, faces)
    assert run_stage(stage, videos, store).processed == 1
    return store.read(stage.table)


def test_stored_mertools_feature_equals_the_baselines(openface_run, tiny_models, tmp_path):
    prepared, _, _ = openface_run
    table = _stored_features(openface_run, tiny_models, tmp_path / "root", "mertools")
    assert len(table) == 1 and table.n_items.iloc[0] == len(FRAMES)  # the black frames count
    ours = np.asarray(table.embedding.iloc[0])
    model_dir = tiny_models / "tiny-clip-vit"
    expected = baseline_feature(prepared / "input_aligned", model_dir, TINY_PREPROCESSOR)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # The control: merflow's recipe drops the failed frames, and that changes the feature.
    merflow = _stored_features(openface_run, tiny_models, tmp_path / "merflow", "merflow")
    assert merflow.n_items.iloc[0] == len(FRAMES) - 2
    assert not np.allclose(np.asarray(merflow.embedding.iloc[0]), expected, atol=1e-3)


def test_openface_ran_with_the_baselines_defaults(openface_run, tiny_models, tmp_path):
    _stored_features(openface_run, tiny_models, tmp_path / "root", "mertools")
    args = (openface_run[1].parent / "args").read_text().split()
    assert args[0] == "-f" and args[2] == "-out_dir"
    assert args[4:] == ["-simalign", "-2Dfp", "-q"]


def test_a_folders_preprocessor_config_is_the_one_used(tiny_models, tmp_path):
    # A checkpoint that ships preprocessor_config.json: its values, not OpenAI's, are used
    # (here a larger resize before the centre crop, which changes every feature).
    folder = tmp_path / "tiny-clip-vit"
    shutil.copytree(tiny_models / "tiny-clip-vit", folder)
    config = TINY_PREPROCESSOR | {"size": {"shortest_edge": 80}}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    spec = dataclasses.replace(get_spec("tiny-clip-vit"), recipe="mertools")
    encoder = load_extractor(spec, folder, "cpu")
    aligned = tmp_path / "out" / "input_aligned"
    write_openface_output(tmp_path / "out", FRAMES, "bmp")
    crops = [image for _, _, image in FRAMES]
    ours = encoder.embed(crops).mean(axis=0)
    np.testing.assert_allclose(
        ours, baseline_feature(aligned, folder, config), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(ours, baseline_feature(aligned, folder, TINY_PREPROCESSOR), atol=1e-3)


def test_a_preprocessor_config_for_another_size_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "tiny-clip-vit"
    shutil.copytree(tiny_models / "tiny-clip-vit", folder)
    config = TINY_PREPROCESSOR | {"crop_size": {"height": 224, "width": 224}}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    spec = dataclasses.replace(get_spec("tiny-clip-vit"), recipe="mertools")
    with pytest.raises(CheckpointMismatchError, match=r"224x224 but the model .* takes 64px"):
        load_extractor(spec, folder, "cpu")


def test_mertools_computes_in_fp32_only(tiny_models):
    spec = dataclasses.replace(get_spec("tiny-clip-vit"), recipe="mertools")
    # Asked for bf16 (as auto is on a GPU), the recipe still computes, and is keyed, in fp32.
    encoder = load_extractor(spec, tiny_models / spec.name, "cpu", dtype="bf16")
    assert encoder.dtype_name == "fp32"
    assert encoder.extractor_id() == planned_extractor_id(spec, tiny_models / spec.name, "cpu")
    assert planned_extractor_id(spec, tiny_models / spec.name, "cuda") == encoder.extractor_id()
    # The loader itself refuses any other dtype, so no stored id can name the wrong one.
    from models.visual import load_visual

    with pytest.raises(RecipeDtypeError, match=r"recipe mertools computes in fp32.*bf16"):
        load_visual(spec, tiny_models / spec.name, torch.device("cpu"), torch.bfloat16)


def test_a_quickgelu_architecture_gets_quickgelu_without_its_config_flag(
    tiny_models, tmp_path, caplog
):
    import open_clip

    folder = tmp_path / "no-flag"
    shutil.copytree(tiny_models / "tiny-clip-vit", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    del config["model_cfg"]["quick_gelu"]  # as an exported folder may lack it
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    spec = get_spec("tiny-clip-vit")
    assert spec.architecture.endswith("-quickgelu")
    crops = [image for _, _, image in FRAMES]
    reference = load_extractor(spec, tiny_models / spec.name, "cpu").embed(crops)
    with caplog.at_level(logging.WARNING, logger="models.visual"):
        flagless = load_extractor(spec, folder, "cpu")
    assert "no quick_gelu: true" in caplog.text and str(folder) in caplog.text
    np.testing.assert_allclose(flagless.embed(crops), reference, rtol=1e-5, atol=1e-6)
    # The control: open_clip alone builds GELU from that folder, and the features move.
    gelu, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    pixels = torch.stack([preprocess(Image.fromarray(c)) for c in crops])
    with torch.no_grad():
        plain = gelu.eval().encode_image(pixels).numpy()
    assert not np.allclose(plain, reference, atol=1e-3)
