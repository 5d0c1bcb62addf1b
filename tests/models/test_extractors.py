"""Extractors on tiny seeded checkpoints, loaded through the same code path as the real ones."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# No test may reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from models.acoustic import AcousticEncoder, conv_output_length
from models.asr import AsrModel, Transcript
from models.encoders import Extractor, pack_batches
from models.extractors import (
    clear_extractor_cache,
    effective_dtype,
    load_extractor,
    planned_extractor_id,
)
from models.registry import (
    CheckpointMismatchError,
    ExtractorInputError,
    ModelNotFoundError,
    RemoteCodeRefusedError,
    get_spec,
    id_settings,
    list_specs,
    resolve_model_path,
)
from models.text import TextEncoder
from models.tiny import TINY_FORMAT, build_tiny_models, causal_lm_config, random_encoder
from models.visual import VisualEncoder

TINY_NAMES = ("tiny-clip-vit", "tiny-hubert", "tiny-wenet-ctc", "tiny-llama")
SHORT_TEXT = "今天天气很好，我很开心。"
LONG_TEXT = "你为什么这么生气？我不想再说了！别担心，一切都会好起来的。我们明天一起去上班。"


@pytest.fixture(scope="session")
def tiny_dir(tiny_models: Path) -> Path:
    """The session's tiny checkpoints (tests/conftest.py builds them with seed 0)."""
    return tiny_models


def _load(tiny_dir: Path, name: str, **kwargs) -> Extractor:
    spec = get_spec(name)
    return load_extractor(spec, resolve_model_path(spec, tiny_dir), "cpu", **kwargs)


@pytest.fixture(scope="session")
def visual(tiny_dir: Path) -> VisualEncoder:
    return _load(tiny_dir, "tiny-clip-vit")  # type: ignore[return-value]


@pytest.fixture(scope="session")
def acoustic(tiny_dir: Path) -> AcousticEncoder:
    return _load(tiny_dir, "tiny-hubert")  # type: ignore[return-value]


@pytest.fixture(scope="session")
def asr(tiny_dir: Path) -> AsrModel:
    return _load(tiny_dir, "tiny-wenet-ctc", num_threads=1)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def text(tiny_dir: Path) -> TextEncoder:
    return _load(tiny_dir, "tiny-llama")  # type: ignore[return-value]


def _crops(n: int, seed: int = 0, size: int = 112) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# Building and loading


def test_tiny_checkpoints_use_the_real_layouts(tiny_dir: Path) -> None:
    expected = {
        "tiny-clip-vit": ("open_clip_config.json", "open_clip_model.safetensors"),
        "tiny-hubert": ("config.json", "preprocessor_config.json", "model.safetensors"),
        "tiny-wenet-ctc": ("model.onnx", "tokens.txt"),
        "tiny-llama": ("config.json", "model.safetensors", "tokenizer.json"),
    }
    for name, files in expected.items():
        for file in files:
            assert (tiny_dir / name / file).is_file(), f"{name}/{file}"
    hubert = json.loads((tiny_dir / "tiny-hubert" / "config.json").read_text())
    layout = (hubert["feat_extract_norm"], hubert["do_stable_layer_norm"], hubert["conv_bias"])
    assert layout == ("layer", True, True)  # chinese-hubert-large's feature encoder
    assert (hubert["num_hidden_layers"], hubert["hidden_size"]) == (2, 32)


def test_build_is_idempotent_and_seeded(tiny_dir: Path, tmp_path: Path) -> None:
    markers = {n: (tiny_dir / n / "merflow_tiny.json").stat().st_mtime_ns for n in TINY_NAMES}
    again = build_tiny_models(tiny_dir, seed=0)
    assert set(again) == set(TINY_NAMES)
    assert {
        n: (tiny_dir / n / "merflow_tiny.json").stat().st_mtime_ns for n in TINY_NAMES
    } == markers

    shutil.copytree(tiny_dir, tmp_path / "copy")
    build_tiny_models(tmp_path / "copy", seed=1)  # another seed replaces the folders
    spec = get_spec("tiny-llama")
    same = planned_extractor_id(spec, tiny_dir / spec.name, "cpu")
    other = planned_extractor_id(spec, tmp_path / "copy" / spec.name, "cpu")
    assert same != other
    assert not list((tmp_path / "copy").glob(".tiny-*"))  # no scratch folders left behind


def test_same_seed_gives_the_same_weights(tiny_dir: Path, tmp_path: Path, visual) -> None:
    build_tiny_models(tmp_path, seed=0)
    spec = get_spec("tiny-clip-vit")
    twin = load_extractor(spec, tmp_path / spec.name, "cpu")
    assert twin is not visual
    crops = _crops(3)
    np.testing.assert_array_equal(twin.embed(crops), visual.embed(crops))


def test_models_load_once_per_process(tiny_dir: Path) -> None:
    first = _load(tiny_dir, "tiny-llama")
    assert _load(tiny_dir, "tiny-llama") is first
    assert _load(tiny_dir, "tiny-llama", dtype="bf16") is not first
    assert _load(tiny_dir, "tiny-clip-vit") is _load(tiny_dir, "tiny-clip-vit")


def test_encoder_reports_the_planned_id(tiny_dir: Path, acoustic) -> None:
    spec = get_spec("tiny-hubert")
    assert acoustic.extractor_id() == planned_extractor_id(spec, tiny_dir / spec.name, "cpu")
    assert acoustic.extractor_id() != planned_extractor_id(
        spec, tiny_dir / spec.name, "cpu", "bf16"
    )
    assert acoustic.dtype_name == "fp32" and acoustic.revision == f"tiny-seed0-v{TINY_FORMAT}"


def test_ids_for_gpu_workers_can_be_planned_without_a_gpu(tiny_dir: Path) -> None:
    spec = get_spec("tiny-llama")
    on_gpu = planned_extractor_id(spec, tiny_dir / spec.name, "cuda")  # "auto": bf16 on CUDA
    assert on_gpu == planned_extractor_id(spec, tiny_dir / spec.name, torch.device("cpu"), "bf16")


def test_asr_id_ignores_a_requested_dtype(tiny_dir: Path, asr) -> None:
    spec = get_spec("tiny-wenet-ctc")
    assert planned_extractor_id(spec, tiny_dir / spec.name, "cpu", "bf16") == asr.extractor_id()
    assert _load(tiny_dir, "tiny-wenet-ctc", num_threads=1, dtype="bf16") is asr


def test_mertools_recipe_puts_the_baselines_precision_in_the_id(tiny_dir: Path) -> None:
    def planned(name: str, recipe: str, device: str, dtype: str | None = None) -> str:
        spec = dataclasses.replace(get_spec(name), recipe=recipe)
        return planned_extractor_id(spec, tiny_dir / name, device, dtype)

    # HuBERT in fp32 even on a GPU; the LLM in fp16 on a GPU, fp32 on the CPU; asked or not.
    assert planned("tiny-hubert", "mertools", "cuda") == planned("tiny-hubert", "mertools", "cpu")
    assert planned("tiny-hubert", "mertools", "cpu", "bf16") == planned(
        "tiny-hubert", "mertools", "cpu", "fp32"
    )
    assert planned("tiny-llama", "mertools", "cuda", "bf16") == planned(
        "tiny-llama", "mertools", "cuda", "fp32"
    )
    assert planned("tiny-llama", "mertools", "cpu", "bf16") == planned(
        "tiny-llama", "mertools", "cpu", "fp32"
    )
    text = dataclasses.replace(get_spec("tiny-llama"), recipe="mertools")
    assert effective_dtype(text, "bf16", torch.device("cuda")) == torch.float16
    assert effective_dtype(text, "bf16", torch.device("cpu")) == torch.float32
    assert planned("tiny-hubert", "mertools", "cpu") != planned("tiny-hubert", "merflow", "cpu")
    loaded = _load(tiny_dir, "tiny-hubert", dtype="bf16")
    spec = dataclasses.replace(get_spec("tiny-hubert"), recipe="mertools")
    with pytest.raises(ValueError, match="mertools recipe runs in fp32"):
        AcousticEncoder(
            spec, loaded.model, loaded.feature_extractor, device=loaded.device, dtype=loaded.dtype
        )


def test_only_hubert_ids_carry_the_feature_version() -> None:
    """HuBERT's features changed (the post-LayerNorm last state): its ids did; no other did."""
    for name in list_specs():
        spec = get_spec(name)
        versioned = "feature_version" in id_settings(spec)["spec"]
        assert versioned == (spec.loader == "hf-hubert"), name


def test_loading_a_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nowhere")):
        load_extractor(get_spec("tiny-hubert"), tmp_path / "nowhere", "cpu")


def test_checkpoint_that_disagrees_with_its_spec_is_refused(tiny_dir: Path) -> None:
    spec = dataclasses.replace(get_spec("tiny-hubert"), output_dim=64)
    with pytest.raises(CheckpointMismatchError, match="64-d"):
        load_extractor(spec, tiny_dir / "tiny-hubert", "cpu")
    spec = dataclasses.replace(get_spec("tiny-clip-vit"), image_size=224)
    with pytest.raises(CheckpointMismatchError, match="224px"):
        load_extractor(spec, tiny_dir / "tiny-clip-vit", "cpu")


def test_pack_batches_respects_the_padded_budget() -> None:
    lengths = [5, 100, 30, 30, 1, 250]
    batches = pack_batches(lengths, max_padded=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than the budget: alone
    for batch in batches[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 120
    assert all(len(b) == 1 for b in pack_batches(lengths, 10_000, max_items=1))


# Visual


def test_visual_loads_a_bare_weights_file_of_a_named_architecture(
    tiny_dir: Path, tmp_path: Path, visual
) -> None:
    import open_clip

    # Register the tiny architecture under its spec name, as ViT-L-14-quickgelu is built in,
    # and ask for no config file, like the real spec.
    spec = dataclasses.replace(get_spec("tiny-clip-vit"), required_files=())
    config = json.loads((tiny_dir / spec.name / "open_clip_config.json").read_text())
    (tmp_path / f"{spec.architecture}.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / f"{spec.architecture}.json")
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(tiny_dir / spec.name / "open_clip_model.safetensors", folder)
    bare = load_extractor(spec, folder, "cpu")
    crops = _crops(3, size=80)
    np.testing.assert_allclose(bare.embed(crops), visual.embed(crops), atol=1e-6)


def test_visual_embeds_each_crop(visual) -> None:
    out = visual.embed(_crops(5) + _crops(2, seed=1, size=224))
    assert out.shape == (7, 32) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not np.allclose(out[0], out[1])
    assert visual.embed([]).shape == (0, 32)


def test_visual_crop_alone_equals_crop_in_batch(visual) -> None:
    crops = _crops(9)
    batched = visual.embed(crops, batch_size=4)
    for i in (0, 4, 8):
        np.testing.assert_allclose(visual.embed([crops[i]])[0], batched[i], atol=1e-5)


def test_visual_refuses_bad_crops_by_index(visual) -> None:
    good = _crops(1)[0]
    with pytest.raises(ExtractorInputError, match="face crop 1 is float32"):
        visual.embed([good, good.astype(np.float32)])
    with pytest.raises(ExtractorInputError, match=r"face crop 0 has shape \(112, 112\)"):
        visual.embed([good[..., 0]])


def test_visual_recipe_keys_the_id_only_when_not_merflows(tiny_dir: Path, visual) -> None:
    # merflow's recipe keeps today's ids (pinned); the baseline's recipe keys new ones.
    real = get_spec("clip-vit-large-patch14")
    where = Path("/models") / real.name
    assert planned_extractor_id(real, where, "cpu") == "clip-vit-large-patch14-c236a851"
    assert planned_extractor_id(real, where, "cuda") == "clip-vit-large-patch14-5a2e57cc"
    assert visual.extractor_id() == "tiny-clip-vit-944f2483"
    mertools = dataclasses.replace(visual.spec, recipe="mertools")
    baseline = load_extractor(mertools, tiny_dir / mertools.name, "cpu")
    assert baseline.extractor_id() != visual.extractor_id()
    assert baseline.extractor_id().startswith("tiny-clip-vit-")


def test_visual_recipes_agree_on_the_cpu(tiny_dir: Path, visual) -> None:
    # open_clip's preprocessing is the baseline's PIL-bicubic one to the bit, and the CPU runs
    # fp32 either way: on a CPU the two recipes differ only in how OpenFace crops are read.
    mertools = dataclasses.replace(visual.spec, recipe="mertools")
    baseline = load_extractor(mertools, tiny_dir / mertools.name, "cpu")
    crops = [*_crops(4), np.zeros((112, 112, 3), np.uint8)]
    np.testing.assert_allclose(baseline.embed(crops), visual.embed(crops), rtol=1e-6, atol=1e-7)


# Acoustic


def _reference_embedding(encoder: AcousticEncoder, wave: np.ndarray, pad_to: int = 0) -> np.ndarray:
    """Feature computed chunk by chunk with no batching; optional padding to show its effect."""
    values = encoder.feature_extractor(
        wave, sampling_rate=16_000, return_tensors="np"
    ).input_values[0]
    total, frames = np.zeros(encoder.output_dim), 0
    kernels, strides = encoder.model.config.conv_kernel, encoder.model.config.conv_stride
    for start, end in encoder.chunk_bounds(len(values)):
        chunk = np.zeros(max(end - start, pad_to), dtype=np.float32)
        chunk[: end - start] = values[start:end]
        with torch.inference_mode():
            out = encoder.model(torch.from_numpy(chunk)[None], output_hidden_states=True)
        # All 3 states of 2 layers, the last one after the final LayerNorm (as transformers 4.x
        # returned it; 5 returns the raw last layer for this stable-layer-norm model).
        used = (*out.hidden_states[:-1], out.last_hidden_state)
        states = torch.stack(used).mean(0)[0].numpy()
        valid = conv_output_length(len(chunk) if pad_to else end - start, kernels, strides)
        total += states[:valid].sum(0)
        frames += valid
    return (total / frames).astype(np.float32)


def test_acoustic_clip_alone_equals_clip_batched_with_longer(acoustic) -> None:
    short, long = _wave(1.3, seed=1), _wave(7.0, seed=2)
    alone = acoustic.embed([short])
    batched = acoustic.embed([long, short, _wave(3.1, seed=3)])
    assert batched.shape == (3, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)


def test_acoustic_matches_an_unbatched_reference(acoustic) -> None:
    wave = _wave(2.0, seed=4)
    np.testing.assert_allclose(
        acoustic.embed([wave])[0], _reference_embedding(acoustic, wave), atol=1e-5
    )
    # The challenge baseline's way, averaging padded frames in, gives another vector.
    padded = _reference_embedding(acoustic, wave, pad_to=10 * 16_000)
    assert np.abs(padded - acoustic.embed([wave])[0]).max() > 1e-3


def test_long_audio_runs_in_chunks(acoustic) -> None:
    wave = _wave(25.0, seed=5)
    assert [e - s for s, e in acoustic.chunk_bounds(len(wave))] == [133_333, 133_334, 133_333]
    chunked = acoustic.embed([wave])[0]
    np.testing.assert_allclose(chunked, _reference_embedding(acoustic, wave), atol=1e-5)
    one_pass = dataclasses.replace(acoustic.spec, chunk_seconds=30.0)
    whole = AcousticEncoder(
        one_pass,
        acoustic.model,
        acoustic.feature_extractor,
        device=acoustic.device,
        dtype=acoustic.dtype,
    )
    assert whole.chunk_bounds(len(wave)) == [(0, len(wave))]
    assert not np.allclose(whole.embed([wave])[0], chunked, atol=1e-5)
    # The batch budget changes speed only, never the feature.
    np.testing.assert_allclose(acoustic.embed([wave], max_batch_samples=1)[0], chunked, atol=1e-5)


def test_mertools_acoustic_cuts_fixed_chunks_and_averages_their_padding(acoustic) -> None:
    spec = dataclasses.replace(acoustic.spec, recipe="mertools")
    fixed = AcousticEncoder(
        spec,
        acoustic.model,
        acoustic.feature_extractor,
        device=acoustic.device,
        dtype=torch.float32,
    )
    assert fixed.chunk_bounds(25 * 16_000) == [(0, 160_000), (160_000, 320_000), (320_000, 400_000)]
    assert fixed.chunk_bounds(10 * 16_000) == [(0, 160_000)]
    wave = _wave(12.0, seed=9)
    one_pass = fixed.embed([wave])[0]
    np.testing.assert_allclose(fixed.embed([wave], max_batch_samples=1)[0], one_pass, rtol=1e-5)
    # Frames: every one, the padding's included, pooled to windows that average to the clip's.
    utterance, windows = fixed.embed_frames([wave], rate=10.0)
    assert windows[0].n_frames.sum() == 2 * conv_output_length(
        160_000, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    )
    pooled = (windows[0].vectors * windows[0].n_frames[:, None]).sum(0) / windows[0].n_frames.sum()
    np.testing.assert_allclose(pooled, utterance[0], rtol=1e-5, atol=1e-6)


def test_acoustic_is_deterministic(acoustic) -> None:
    waves = [_wave(1.0, seed=6), _wave(2.5, seed=7)]
    np.testing.assert_array_equal(acoustic.embed(waves), acoustic.embed(waves))


def test_acoustic_refuses_unusable_audio(acoustic) -> None:
    with pytest.raises(ExtractorInputError, match="waveform 1 has 399 samples"):
        acoustic.embed([_wave(1.0), np.zeros(399, dtype=np.float32)])
    with pytest.raises(ExtractorInputError, match="waveform 0 has shape"):
        acoustic.embed([np.zeros((2, 16_000), dtype=np.float32)])
    with pytest.raises(ExtractorInputError, match="NaN"):
        acoustic.embed([np.full(16_000, np.nan, dtype=np.float32)])
    assert acoustic.embed([]).shape == (0, 32)


# ASR


def test_asr_transcribes_in_order_with_known_tokens(tiny_dir: Path, asr) -> None:
    waves = [_wave(1.0, seed=1), _wave(0.05), _wave(2.0, seed=2), _wave(1.0, seed=1)]
    out = asr.transcribe(waves, batch_size=2)
    assert len(out) == 4 and all(isinstance(t, Transcript) for t in out)
    assert out[1] == Transcript("", None)  # under 0.1 s
    assert out[0] == out[3]
    assert all(t.confidence is None for t in out)  # CTC: no token probabilities
    vocabulary = {line.split()[0] for line in (tiny_dir / "tiny-wenet-ctc" / "tokens.txt").open()}
    assert out[0].text and set(out[0].text.replace("<unk>", "")) <= vocabulary
    assert asr.transcribe([waves[2]]) == [out[2]]
    assert asr.transcribe([]) == []


def test_asr_refuses_onnx_without_sherpa_metadata(tiny_dir: Path, tmp_path: Path) -> None:
    import onnx

    folder = shutil.copytree(tiny_dir / "tiny-wenet-ctc", tmp_path / "tiny-wenet-ctc")
    proto = onnx.load(str(folder / "model.onnx"))
    kept = [p for p in proto.metadata_props if p.key != "subsampling_factor"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(folder / "model.onnx"))
    with pytest.raises(CheckpointMismatchError, match="subsampling_factor"):
        load_extractor(get_spec("tiny-wenet-ctc"), folder, "cpu")


def test_asr_loads_from_a_hugging_face_cache_snapshot(tiny_dir: Path, tmp_path: Path, asr) -> None:
    spec = get_spec("wenet-wenetspeech")  # the real spec, served by a tiny model in the cache
    commit = "ab" * 20
    repo = tmp_path / "hub" / "models--csukuangfj--sherpa-onnx-zh-wenet-wenetspeech"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "tokens.txt"):
        shutil.copy(tiny_dir / "tiny-wenet-ctc" / name, snapshot / name)
    path = resolve_model_path(spec, tmp_path / "models", cache_dir=tmp_path / "hub")
    model = load_extractor(spec, path, "cpu", num_threads=1)
    assert model.revision == commit
    wave = _wave(1.0, seed=1)
    assert model.transcribe([wave]) == asr.transcribe([wave])


# Text


def test_empty_text_is_missing_not_zero(text) -> None:
    out = text.embed(["", "   ", SHORT_TEXT, "\n"])
    assert out[0] is None and out[1] is None and out[3] is None
    assert out[2] is not None and out[2].shape == (32,) and out[2].dtype == np.float32
    assert text.embed([]) == []


def test_text_alone_equals_text_batched_with_longer(text) -> None:
    alone = text.embed([SHORT_TEXT])[0]
    batched = text.embed([LONG_TEXT, SHORT_TEXT, "别担心。"])
    assert all(v is not None for v in batched)
    np.testing.assert_allclose(alone, batched[1], atol=1e-5)
    assert not np.allclose(batched[0], batched[1])


def test_text_averages_only_the_text_tokens(text) -> None:
    ids = text.tokenizer(SHORT_TEXT)["input_ids"]
    assert ids[0] == text.tokenizer.bos_token_id  # the tokenizer adds BOS, like Llama's
    with torch.inference_mode():
        out = text.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    states = torch.stack(out.hidden_states).mean(0)[0]  # (T, 32): all 3 states of 2 layers
    np.testing.assert_allclose(text.embed([SHORT_TEXT])[0], states[1:].mean(0).numpy(), atol=1e-5)
    assert not np.allclose(text.embed([SHORT_TEXT])[0], states.mean(0).numpy(), atol=1e-4)


def test_text_budget_and_truncation(text) -> None:
    texts = [LONG_TEXT, SHORT_TEXT, "别担心。"]
    wide = text.embed(texts)
    narrow = text.embed(texts, max_batch_tokens=1)
    for a, b in zip(wide, narrow, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    short_spec = dataclasses.replace(text.spec, max_tokens=4)
    clipped = TextEncoder(
        short_spec, text.model, text.tokenizer, device=text.device, dtype=text.dtype
    )
    assert not np.allclose(clipped.embed([LONG_TEXT])[0], wide[0])


def test_text_refuses_non_strings(text) -> None:
    with pytest.raises(ExtractorInputError, match="text 1 is NoneType"):
        text.embed([SHORT_TEXT, None])  # type: ignore[list-item]


def _remote_code_checkpoint(tiny_dir: Path, folder: Path, causal_lm_only: bool = False) -> Path:
    """The tiny LM, re-declared as a model type that only its own Python files define.

    With causal_lm_only the code maps just AutoModelForCausalLM, as Baichuan2's does.
    """
    shutil.copytree(tiny_dir / "tiny-llama", folder)
    (folder / "configuration_tinyremote.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n"
        "    model_type = 'tinyremote'\n"
    )
    (folder / "modeling_tinyremote.py").write_text(
        "from transformers import LlamaForCausalLM, LlamaModel\n\n"
        "from .configuration_tinyremote import TinyRemoteConfig\n\n\n"
        "class TinyRemoteModel(LlamaModel):\n    config_class = TinyRemoteConfig\n\n\n"
        "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_tinyremote.TinyRemoteConfig"}
    if causal_lm_only:
        auto_map["AutoModelForCausalLM"] = "modeling_tinyremote.TinyRemoteForCausalLM"
    else:
        auto_map["AutoModel"] = "modeling_tinyremote.TinyRemoteModel"
    config |= {"model_type": "tinyremote", "architectures": ["TinyRemoteModel"]}
    config["auto_map"] = auto_map
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def modules_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Remote code is copied into a session modules folder, not the user's cache.

    One folder per session: Python imports the `transformers_modules` package only once.
    """
    import transformers.dynamic_module_utils as dynamic

    folder = tmp_path_factory.mktemp("hf-modules")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(folder))
        patch.setattr(sys, "path", list(sys.path))
        yield folder


def test_trust_remote_code_is_never_implied(
    tiny_dir: Path, tmp_path: Path, modules_cache: Path, caplog, text
) -> None:
    folder = _remote_code_checkpoint(tiny_dir, tmp_path / "tiny-remote")
    spec = dataclasses.replace(get_spec("tiny-llama"), name="tiny-remote")
    assert not spec.trust_remote_code
    with pytest.raises(RemoteCodeRefusedError, match="trust_remote_code is off"):
        load_extractor(spec, folder, "cpu")

    with caplog.at_level(logging.WARNING, logger="models.text"):
        encoder = load_extractor(spec, folder, "cpu", trust_remote_code=True)
    assert type(encoder.model).__name__ == "TinyRemoteModel"
    assert "trust_remote_code is ON for extractor tiny-remote (set by a setting)" in caplog.text
    np.testing.assert_allclose(
        encoder.embed([SHORT_TEXT])[0], text.embed([SHORT_TEXT])[0], atol=1e-5
    )

    caplog.clear()
    trusting = dataclasses.replace(spec, name="tiny-remote-trusted", trust_remote_code=True)
    with caplog.at_level(logging.WARNING, logger="models.text"):
        load_extractor(trusting, folder, "cpu")
    assert "(set by the spec)" in caplog.text
    with pytest.raises(RemoteCodeRefusedError):
        load_extractor(trusting, folder, "cpu", trust_remote_code=False)


def test_causal_lm_only_code_yields_its_base_model(
    tiny_dir: Path, tmp_path: Path, modules_cache: Path, text
) -> None:
    folder = _remote_code_checkpoint(tiny_dir, tmp_path / "tiny-remote-lm", causal_lm_only=True)
    spec = dataclasses.replace(
        get_spec("tiny-llama"), name="tiny-remote-lm", trust_remote_code=True
    )
    encoder = load_extractor(spec, folder, "cpu")
    assert type(encoder.model).__name__ == "LlamaModel"  # the base inside the CausalLM class
    np.testing.assert_allclose(
        encoder.embed([SHORT_TEXT])[0], text.embed([SHORT_TEXT])[0], atol=1e-5
    )


# dtype


def test_bf16_runs_on_cpu_close_to_fp32(tiny_dir: Path, visual, acoustic, text) -> None:
    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    low = {
        n: _load(tiny_dir, n, dtype="bf16") for n in ("tiny-clip-vit", "tiny-hubert", "tiny-llama")
    }
    assert all(e.dtype_name == "bf16" for e in low.values())
    crops, waves = _crops(2), [_wave(1.0)]
    pairs = [
        (low["tiny-clip-vit"].embed(crops)[0], visual.embed(crops)[0]),
        (low["tiny-hubert"].embed(waves)[0], acoustic.embed(waves)[0]),
        (low["tiny-llama"].embed([SHORT_TEXT])[0], text.embed([SHORT_TEXT])[0]),
    ]
    for reduced, full in pairs:
        assert reduced.dtype == np.float32 and np.isfinite(reduced).all()
        assert cosine(reduced, full) > 0.98


# Full-size architectures, random weights, shapes only


def test_clip_vit_l14_gives_768_per_crop() -> None:
    encoder = random_encoder("clip-vit-large-patch14")
    assert encoder.embed(_crops(1, size=224)).shape == (1, 768)


def test_clip_preprocessing_by_batch_and_threads_is_per_crop_preprocessing() -> None:
    # open_clip's transform runs its PIL stages per crop (on threads) and to_tensor + normalize
    # as one table lookup: the same values, to the bit, as the whole transform crop by crop.
    encoder = random_encoder("clip-vit-large-patch14")
    assert encoder._split is not None and encoder._split.side == 224
    crops = _crops(3) + _crops(2, seed=1, size=224) + [np.zeros((112, 112, 3), np.uint8)]
    one_by_one = torch.stack([encoder.preprocess(Image.fromarray(c)) for c in crops])
    batched = torch.full_like(one_by_one, float("nan"))
    pixels = torch.zeros(one_by_one.shape, dtype=torch.uint8)
    for i, c in enumerate(crops):
        encoder._prepare(i, c, batched[i])  # writes row i in place
        encoder._prepare(i, c, pixels[i])  # uint8: the pixels, looked up on the device later
    assert torch.equal(batched, one_by_one)
    table = torch.from_numpy(encoder._split.table)
    assert torch.equal(encoder._split.on_device(pixels, table), one_by_one)
    # The baseline's processor is no torchvision Compose: it runs whole, per crop.
    mertools = dataclasses.replace(get_spec("tiny-clip-vit"), recipe="mertools")
    assert random_encoder(mertools)._split is None


@pytest.mark.parametrize("recipe", ["merflow", "mertools"])
def test_clip_embeds_alike_on_threads_and_prefetching(visual, tiny_dir: Path, recipe) -> None:
    # One thread, two threads, and the GPU's way (batches prepared ahead, uint8 pixels looked
    # up where the model runs) give the same features; a bad crop is named from any of them.
    spec = dataclasses.replace(visual.spec, recipe=recipe)
    encoder = load_extractor(spec, tiny_dir / spec.name, "cpu")
    crops = _crops(7) + _crops(2, seed=1, size=224)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = encoder.embed(crops, batch_size=2)
        torch.set_num_threads(2)
        pooled = encoder.embed(crops, batch_size=2)
        encoder.prefetch = True
        ahead = encoder.embed(crops, batch_size=2)
        with pytest.raises(ExtractorInputError, match="face crop 6 is float32"):
            encoder.embed([*crops[:6], crops[6].astype(np.float32), *crops[7:]], batch_size=2)
    finally:
        encoder.prefetch = False
        torch.set_num_threads(threads)
    np.testing.assert_allclose(pooled, alone, rtol=1e-6, atol=1e-7)  # the GEMMs' threads
    np.testing.assert_array_equal(ahead, pooled)


def test_chinese_hubert_large_gives_1024() -> None:
    encoder = random_encoder("chinese-hubert-large")
    assert encoder.embed([_wave(1.0)]).shape == (1, 1024)


def test_baichuan2_13b_shaped_lm_gives_5120() -> None:
    from transformers import LlamaModel

    with torch.device("meta"):  # shapes without 52 GB of weights
        model = LlamaModel(causal_lm_config(tiny=False, vocab_size=125_696))
        out = model(input_ids=torch.zeros(1, 6, dtype=torch.long), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 6, get_spec("baichuan2-13b-base").output_dim)
    assert len(out.hidden_states) == 41  # embeddings + 40 layers: the last 4 exist


def test_clear_cache_forgets_loaded_models(tiny_dir: Path) -> None:
    first = _load(tiny_dir, "tiny-wenet-ctc", num_threads=2)
    clear_extractor_cache()
    assert _load(tiny_dir, "tiny-wenet-ctc", num_threads=2) is not first
