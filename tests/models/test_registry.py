"""Registry of extractor specs: names, extractor ids, checkpoint resolution and its errors."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

# No test may reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from flows.config import list_profiles
from models.registry import (
    KINDS,
    SPECS,
    TINY_MARKER,
    ExtractorSpec,
    ModelNotFoundError,
    UnknownExtractorError,
    canonical_dtype,
    checkpoint_problems,
    checkpoint_revision,
    extractor_id,
    get_spec,
    list_specs,
    resolve_model_path,
    specs_of,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_unknown_spec_lists_valid_names() -> None:
    with pytest.raises(UnknownExtractorError) as info:
        get_spec("clip-vit-huge")
    message = str(info.value)
    assert "'clip-vit-huge'" in message
    for name in list_specs():
        assert name in message


def test_list_specs_is_sorted_and_complete() -> None:
    names = list_specs()
    assert names == sorted(SPECS)
    for name in ("clip-vit-large-patch14", "chinese-hubert-large", "baichuan2-13b-base"):
        assert name in names
    assert get_spec("tiny-hubert").kind == "acoustic"


def profile_specs(profile: str):
    """What a profile runs, as the flows load it (configs/<profile>.yaml, no environment)."""
    from flows.config import load_settings

    return specs_of(load_settings(profile, env={}).models)


@pytest.mark.parametrize("profile", list_profiles())
def test_profiles_cover_every_kind(profile: str) -> None:
    # configs/<profile>.yaml is the one source: what the flows load is what this checks.
    specs = profile_specs(profile)
    assert set(specs) == set(KINDS)
    assert all(spec.kind == kind for kind, spec in specs.items())
    assert all(spec.tiny == (profile == "demo") for spec in specs.values())


def test_settings_refuse_an_extractor_of_the_wrong_kind_or_an_unknown_one(tmp_path: Path) -> None:
    from flows.config import SettingsError, load_settings

    custom = tmp_path / "mixed.yaml"
    custom.write_text("models: {visual: tiny-clip-vit, acoustic: tiny-hubert}\n")
    specs = profile_specs(str(custom))  # unnamed kinds: the settings' defaults (the paper's)
    assert specs["visual"].name == "tiny-clip-vit" and specs["text"].name == "baichuan2-13b-base"
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text("models: {visual: tiny-hubert}\n")
    with pytest.raises(SettingsError, match=r"models\.visual: tiny-hubert is kind 'acoustic'"):
        load_settings(str(swapped))
    with pytest.raises(SettingsError, match="unknown extractor 'clip-b'; valid extractors are"):
        load_settings("demo", ["models.visual=clip-b"])


def test_paper_and_demo_profiles_exist() -> None:
    assert {"demo", "paper"} <= set(list_profiles())


def test_tiny_specs_mirror_the_paper_ones() -> None:
    paper, demo = profile_specs("paper"), profile_specs("demo")
    for kind in KINDS:
        assert paper[kind].loader == demo[kind].loader
        assert paper[kind].pooling == demo[kind].pooling
        assert paper[kind].layers == demo[kind].layers
    assert [paper[k].output_dim for k in ("visual", "acoustic", "text")] == [768, 1024, 5120]


def test_unknown_profile_lists_valid_ones() -> None:
    from flows.config import SettingsError

    with pytest.raises(SettingsError, match="demo, paper"):
        profile_specs("laptop")


def test_trust_remote_code_only_where_the_spec_says_so() -> None:
    trusted = {name for name, spec in SPECS.items() if spec.trust_remote_code}
    assert trusted == {"baichuan2-13b-base"}


def test_spec_rejects_unsafe_names_and_unknown_kinds() -> None:
    base = get_spec("tiny-hubert")
    with pytest.raises(ValueError, match="filesystem-safe"):
        dataclasses.replace(base, name="Tiny Hubert/2")
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(base, kind="video")
    with pytest.raises(ValueError, match="layers"):
        dataclasses.replace(base, layers=0)


def test_extractor_id_is_readable_stable_and_order_free() -> None:
    spec = get_spec("tiny-clip-vit")
    first = extractor_id(spec, dtype="fp32", face_crop="dlib-5pt-224", checkpoint="c1")
    again = extractor_id(spec, checkpoint="c1", face_crop="dlib-5pt-224", dtype="fp32")
    assert first == again
    assert re.fullmatch(r"tiny-clip-vit-[0-9a-f]{8}", first)
    assert extractor_id(spec) == extractor_id(spec)


@pytest.mark.parametrize(
    "change",
    [
        {"revision": "v2"},
        {"layers": 3},
        {"pooling": "max over frames"},
        {"image_size": 96},
        {"chunk_seconds": 5.0},
        {"max_tokens": 256},
        {"dtype": "bf16"},
        {"hub_repo": "someone/else"},
    ],
)
def test_extractor_id_changes_with_output_changing_spec_fields(change: dict) -> None:
    spec = get_spec("tiny-hubert")
    assert extractor_id(dataclasses.replace(spec, **change)) != extractor_id(spec)


@pytest.mark.parametrize(
    "settings",
    [
        {"dtype": "bf16"},
        {"face_crop": "opencv-haar-112"},
        {"checkpoint": "tiny-seed1-v1"},
        {"asr": "tiny-wenet-ctc-12345678"},
    ],
)
def test_extractor_id_changes_with_output_changing_settings(settings: dict) -> None:
    spec = get_spec("tiny-clip-vit")
    base = {"dtype": "fp32", "face_crop": "dlib-5pt-224", "checkpoint": "tiny-seed0-v1"}
    assert extractor_id(spec, **(base | settings)) != extractor_id(spec, **base)


def test_extractor_id_ignores_settings_and_fields_that_keep_the_output() -> None:
    spec = get_spec("tiny-llama")
    base = extractor_id(spec, dtype="fp32")
    assert extractor_id(spec, dtype="fp32", device="cuda:1", batch_size=7, num_threads=3) == base
    assert extractor_id(spec, dtype="fp32", max_batch_tokens=99, allow_download=True) == base
    assert extractor_id(spec, dtype="fp32", face_crop=None) == base
    described = dataclasses.replace(spec, description="another text", trust_remote_code=True)
    assert extractor_id(described, dtype="fp32") == base
    assert extractor_id(spec, dtype=torch.float32) == base
    assert extractor_id(spec, dtype="float32") == base


def test_extractor_id_refuses_unhashable_setting_values() -> None:
    with pytest.raises(TypeError, match="face_crop"):
        extractor_id(get_spec("tiny-clip-vit"), face_crop=object())


def test_canonical_dtype_names() -> None:
    assert canonical_dtype(torch.bfloat16) == "bf16"
    assert canonical_dtype("half") == "fp16"
    with pytest.raises(ValueError, match="fp32, bf16, fp16 or auto"):
        canonical_dtype("int8")


def _fake_asr_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "tokens.txt").write_text("<blank> 0\n", encoding="utf-8")
    return folder


def test_resolve_prefers_the_models_folder(tmp_path: Path) -> None:
    spec = get_spec("tiny-wenet-ctc")
    folder = _fake_asr_folder(tmp_path / spec.name)
    assert resolve_model_path(spec, tmp_path) == folder
    assert checkpoint_revision(spec, folder) == spec.revision


def test_incomplete_folder_names_what_is_missing(tmp_path: Path) -> None:
    spec = get_spec("tiny-llama")
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / "config.json").write_text("{}", encoding="utf-8")
    problems = checkpoint_problems(spec, tmp_path / spec.name)
    assert any("tokenizer.json is missing" in p for p in problems)
    assert any("none of the weight files" in p for p in problems)
    with pytest.raises(ModelNotFoundError, match=r"tokenizer\.json is missing"):
        resolve_model_path(spec, tmp_path)


def test_missing_tiny_checkpoint_says_how_to_build_it(tmp_path: Path) -> None:
    spec = get_spec("tiny-hubert")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(spec, tmp_path, allow_download=True)
    message = str(info.value)
    assert "tiny-hubert" in message
    assert str(tmp_path / "tiny-hubert") in message
    assert "build_tiny_models" in message
    assert "config.json" in message  # the layout expected


def test_missing_real_checkpoint_names_model_places_and_ways(tmp_path: Path) -> None:
    spec = get_spec("chinese-hubert-large")
    cache = tmp_path / "hub"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(spec, tmp_path / "models", allow_download=False, cache_dir=cache)
    message = str(info.value)
    assert "chinese-hubert-large" in message
    assert "TencentGameMate/chinese-hubert-large@main" in message
    assert str(tmp_path / "models" / "chinese-hubert-large") in message
    assert f"Hugging Face cache {cache}" in message
    assert "hf download TencentGameMate/chinese-hubert-large" in message
    assert "allow_download=true" in message


def test_download_is_not_attempted_offline(tmp_path: Path) -> None:
    spec = get_spec("baichuan2-13b-base")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_path(spec, None, allow_download=True, cache_dir=tmp_path)


def _fake_hf_cache(cache: Path, spec: ExtractorSpec, revision: str = "main") -> Path:
    assert spec.hub_repo is not None
    repo = cache / ("models--" + spec.hub_repo.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT, encoding="utf-8")
    return _fake_asr_folder(repo / "snapshots" / COMMIT)


def test_resolve_finds_a_hugging_face_cache_snapshot(tmp_path: Path) -> None:
    spec = get_spec("wenet-wenetspeech")
    snapshot = _fake_hf_cache(tmp_path / "hub", spec)
    found = resolve_model_path(spec, tmp_path / "models", cache_dir=tmp_path / "hub")
    assert found == snapshot
    assert checkpoint_revision(spec, found) == COMMIT


def test_cache_snapshot_of_another_revision_is_not_used(tmp_path: Path) -> None:
    spec = dataclasses.replace(get_spec("wenet-wenetspeech"), revision="v2")
    _fake_hf_cache(tmp_path / "hub", spec, revision="main")
    with pytest.raises(ModelNotFoundError, match="@v2"):
        resolve_model_path(spec, None, cache_dir=tmp_path / "hub")


def test_tiny_marker_sets_the_checkpoint_revision(tmp_path: Path) -> None:
    spec = get_spec("tiny-wenet-ctc")
    folder = _fake_asr_folder(tmp_path / spec.name)
    (folder / TINY_MARKER).write_text(
        '{"spec": "tiny-wenet-ctc", "seed": 7, "format": 1}', encoding="utf-8"
    )
    assert checkpoint_revision(spec, folder) == "tiny-seed7-v1"
