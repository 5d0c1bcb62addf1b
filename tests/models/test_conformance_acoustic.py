"""HuBERT features conform to the challenge baseline's recipe (MERTools' extraction script).

The baseline's recipe is restated below from reading its code, with plain transformers and torch
calls and no merflow code, and run on the same seeded tiny weights and the same stored audio as
merflow's acoustic stage, which runs through the engine into a store. The tiny HuBERT is rebuilt
with 5 layers (6 hidden states) so that the baseline's fixed indices -4..-1 pick a strict subset.
"""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_contracts.store import Store
from flows.config import load_settings
from flows.plan import plan_extraction
from models.tiny import build_tiny_models, hubert_config
from tasks.engine.stage import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

RATE = 16_000
SECONDS = {"long": 23.7, "short": 4.3}  # three 10 s chunks, the last mostly padding; one


def _deepen_hubert(folder: Path, layers: int = 5, seed: int = 11) -> None:
    """Replace a tiny HuBERT's weights by a deeper one of the same layout (marker kept)."""
    from transformers import HubertModel

    config = hubert_config(tiny=True)
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        HubertModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conformance-models")
    build_tiny_models(out, seed=3)
    _deepen_hubert(out / "tiny-hubert")
    return out


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Tones with a syllable-rate envelope over noise, 16-bit range, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.3 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / RATE) / k for k in (1, 2, 3))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    x = 0.3 * voice * envelope + 0.02 * rng.normal(size=len(t))
    return np.clip(x / np.abs(x).max() * 0.8, -1, 1).astype(np.float32)


def _write_wav(path: Path, x: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((x * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> pd.DataFrame:
    """Manifest rows of two audio files, one longer than 10 s, one shorter."""
    folder = tmp_path_factory.mktemp("conformance-audio")
    rows = []
    for i, (name, seconds) in enumerate(SECONDS.items()):
        path = folder / f"{name}.wav"
        _write_wav(path, _speechlike(seconds, seed=i))
        rows.append({"video_id": name, "sha256": f"{i:064x}", "path": str(path)})
    return pd.DataFrame(rows)


def _stored(models_dir: Path, videos: pd.DataFrame, root: Path, recipe: str):
    """merflow's stored acoustic features per video id, and the wav files they were made from."""
    overrides = [
        f"models.models_dir={models_dir}",
        "models.build_tiny=false",
        f"models.acoustic_recipe={recipe}",
        "models.audio_batch_seconds=15",  # mertools: a long clip's chunks in groups, as stored
    ]
    plan = plan_extraction(load_settings("demo", overrides), root, None)
    store = Store(root)
    assert run_stage(plan.stage("audio"), videos, store).processed == len(videos)
    assert run_stage(plan.stage("acoustic"), videos, store).processed == len(videos)
    features = store.read(plan.stage("acoustic").table).set_index("video_id")
    wavs = store.read(plan.stage("audio").table).set_index("video_id")
    vectors = {v: np.asarray(features.loc[v].embedding) for v in videos.video_id}
    for v in videos.video_id:  # each row says which recipe made it
        assert json.loads(features.loc[v].provenance)["recipe"] == recipe
    paths = {v: store.local_file(wavs.loc[v].path) for v in videos.video_id}
    return vectors, paths, plan.stage("acoustic").extractor_id


# -- the baseline's recipe, restated (MERTools feature_extraction/audio/extract_audio_huggingface)
def _read_16k(path: Path) -> np.ndarray:
    """The wav's samples as float64 in [-1, 1), as soundfile.read gives them."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32768.0


def baseline_hubert(model_dir: Path, wav: Path) -> np.ndarray:
    """The baseline's utterance feature of one wav file."""
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    model = HubertModel.from_pretrained(model_dir, dtype=torch.float32).eval()  # fp32, always
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    samples = _read_16k(wav)
    values = feature_extractor(samples, sampling_rate=RATE, return_tensors="pt").input_values
    chunk = 10 * RATE
    if values.shape[1] > chunk:  # cut in fixed 10 s rows, the last zero-padded
        padded = torch.zeros(1, math.ceil(values.shape[1] / chunk) * chunk)
        padded[:, : values.shape[1]] = values
        values = padded.view(-1, chunk)
    with torch.no_grad():
        out = model(values, output_hidden_states=True)  # one batch, no attention mask
    # transformers 4.x (the baseline's) returned the encoder output after its final LayerNorm as
    # hidden_states[-1]; transformers 5 returns the raw last layer there for this
    # stable-layer-norm model, so the 4.x tuple is rebuilt with last_hidden_state.
    hidden = (*out.hidden_states[:-1], out.last_hidden_state)
    summed = torch.stack(hidden)[[-4, -3, -2, -1]].sum(dim=0)  # (B, T, D)
    frames = summed.reshape(-1, summed.shape[-1]).numpy()  # every frame, the padding's too
    return frames.mean(axis=0)


# -- the tests
def test_transformers_5_returns_the_raw_last_layer_for_stable_layer_norm(models_dir):
    """If a future transformers returns the normalised state again, this says so: the
    substitution of last_hidden_state (models.extractors.final_hidden_states) is then a no-op."""
    from transformers import HubertConfig, HubertModel

    model = HubertModel.from_pretrained(models_dir / "tiny-hubert").eval()
    assert model.config.do_stable_layer_norm
    x = torch.from_numpy(_speechlike(1.0, seed=5))[None]
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert (out.hidden_states[-1] - out.last_hidden_state).abs().max() > 0.1
    final_norm = model.encoder.layer_norm(out.hidden_states[-1])
    torch.testing.assert_close(final_norm, out.last_hidden_state)
    # A post-norm HuBERT returns the same tensor in both places.
    config = hubert_config(tiny=True)
    config.do_stable_layer_norm, config.feat_extract_norm = False, "group"
    post = HubertModel(HubertConfig.from_dict(config.to_dict())).eval()
    with torch.no_grad():
        out = post(x, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_mertools_recipe_equals_the_baseline(models_dir, videos, tmp_path):
    stored, wavs, ext_id = _stored(models_dir, videos, tmp_path / "root", "mertools")
    for video_id in SECONDS:
        reference = baseline_hubert(models_dir / "tiny-hubert", wavs[video_id])
        scale = np.abs(reference).max()
        np.testing.assert_allclose(stored[video_id], reference, rtol=1e-4, atol=1e-5 * scale)
    _, _, default_id = _stored(models_dir, videos, tmp_path / "default", "merflow")
    assert ext_id != default_id


def test_default_recipe_is_the_baseline_mean_on_a_short_clip(models_dir, videos, tmp_path):
    """The default averages the last 4 states where the baseline sums them (x4); on a clip of at
    most 10 s nothing else differs. Longer clips differ by the padding the baseline averages in."""
    stored, wavs, _ = _stored(models_dir, videos, tmp_path / "root", "merflow")
    short = baseline_hubert(models_dir / "tiny-hubert", wavs["short"])
    scale = np.abs(short).max()
    np.testing.assert_allclose(4 * stored["short"], short, rtol=1e-4, atol=1e-5 * scale)
    long = baseline_hubert(models_dir / "tiny-hubert", wavs["long"])
    assert np.abs(4 * stored["long"] - long).max() > 1e-2 * np.abs(long).max()
