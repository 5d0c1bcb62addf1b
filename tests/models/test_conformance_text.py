"""LLM text features conform to the challenge baseline's recipe (MERTools' extraction script).

The baseline's recipe is restated below from reading its code, with plain transformers and torch
calls and no merflow code, and run on the same seeded tiny weights and the same stored
transcripts as merflow's text stage, which runs through the engine into a store. The tiny Llama
is rebuilt with 5 layers (6 hidden states) so that the baseline's fixed indices -4..-1 pick a
strict subset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_contracts import tables
from data_contracts.store import Store
from flows.config import load_settings
from flows.plan import plan_extraction
from models.tiny import build_tiny_models, causal_lm_config
from tasks.engine.stage import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = {
    "calm": "今天天气很好，我很开心。",
    "angry": "你为什么这么生气？我不想再说了！",
    "mixed": "别担心，一切都会好起来的。我们明天一起去上班，然后吃饭。",
    "unseen": "考试没通过",  # characters the tiny tokenizer never merged: byte tokens
    "one": "好",
}


def _deepen_llama(folder: Path, layers: int = 5, seed: int = 12) -> None:
    """Replace a tiny Llama's weights by a deeper one of the same layout (tokenizer kept)."""
    from transformers import AutoTokenizer, LlamaModel

    vocab = len(AutoTokenizer.from_pretrained(folder))
    config = causal_lm_config(tiny=True, vocab_size=vocab)
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conformance-models")
    build_tiny_models(out, seed=3)
    _deepen_llama(out / "tiny-llama")
    return out


def _stored(models_dir: Path, root: Path, recipe: str, texts: dict[str, str]):
    """merflow's stored text features per video id (official transcripts, no ASR), the stage's
    extractor id and the failures it wrote."""
    overrides = [
        f"models.models_dir={models_dir}",
        "models.build_tiny=false",
        f"models.text_recipe={recipe}",
        "models.text_batch_tokens=64",  # merflow: several batches
    ]
    plan = plan_extraction(load_settings("demo", overrides), root, None, official=True)
    videos = pd.DataFrame(
        [
            {"video_id": v, "sha256": f"{i:064x}", "path": str(root / f"{v}.mp4")}
            for i, v in enumerate(texts)
        ]
    )
    store = Store(root)
    assert run_stage(plan.stage("transcribe", official=texts), videos, store).processed == len(
        texts
    )
    stage = plan.stage("text")
    run_stage(stage, videos, store)
    features = store.read(stage.table).set_index("video_id")
    vectors = {v: np.asarray(features.loc[v].embedding) for v in features.index}
    return vectors, stage.extractor_id, store.read(tables.FAILURES)


# -- the baseline's recipe, restated (MERTools feature_extraction/text/extract_text_huggingface)
PROBE = "今天天气真好"


def baseline_span(tokenizer) -> tuple[int, int | None]:
    """Which token positions are text: the first start in 0..2 whose decoded tail (spaces
    dropped) is the probe, or starts with it and then an end of -1 or -2 that makes it so."""
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"][0]
    start = 0
    for start in range(3):
        text = tokenizer.decode(ids[start:]).replace(" ", "")
        if text == PROBE:
            return start, None
        if text.startswith(PROBE):
            break
    end = -1
    for end in (-1, -2):
        if tokenizer.decode(ids[start:end]).replace(" ", "") == PROBE:
            break
    assert tokenizer.decode(ids[start:end]).replace(" ", "") == PROBE
    return start, end


def baseline_text(model_dir: Path, sentences: list[str]) -> list[np.ndarray]:
    """The baseline's utterance features, one sentence at a time (CPU: fp32)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    start, end = baseline_span(tokenizer)
    out = []
    for sentence in sentences:
        if len(sentence) == 0:
            out.append(np.zeros(model.config.hidden_size))  # what the baseline stores
            continue
        inputs = tokenizer(sentence, return_tensors="pt")  # its special tokens, no padding
        with torch.no_grad():
            result = model(**inputs, output_hidden_states=True)
        # transformers 4.x returned the final norm's output as hidden_states[-1]; 5 still does
        # for Llama (asserted below), and the 4.x tuple is rebuilt the same way as for HuBERT.
        assert torch.equal(result.hidden_states[-1], result.last_hidden_state)
        hidden = (*result.hidden_states[:-1], result.last_hidden_state)
        summed = torch.stack(hidden)[[-4, -3, -2, -1]].sum(dim=0)  # (1, T, D)
        out.append(summed[0, start:end].numpy().mean(axis=0))
    return out


# -- the tests
def test_the_tiny_tokenizer_adds_a_bos_the_probe_skips(models_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-llama")
    assert baseline_span(tokenizer) == (1, None)  # like a BOS-adding Llama/Baichuan tokenizer


def test_mertools_recipe_equals_the_baseline(models_dir, tmp_path):
    stored, ext_id, failures = _stored(models_dir, tmp_path / "root", "mertools", TEXTS)
    references = baseline_text(models_dir / "tiny-llama", list(TEXTS.values()))
    for video_id, reference in zip(TEXTS, references, strict=True):
        scale = np.abs(reference).max()
        np.testing.assert_allclose(stored[video_id], reference, rtol=1e-4, atol=1e-5 * scale)
    assert failures.empty
    _, default_id, _ = _stored(models_dir, tmp_path / "default", "merflow", TEXTS)
    assert ext_id != default_id


def test_empty_text_is_missing_where_the_baseline_stores_zeros(models_dir, tmp_path):
    """merflow keeps its rule in both recipes: an empty transcript is a missing modality (a
    failure row, no feature row), never the baseline's zero vector."""
    texts = {"said": TEXTS["calm"], "silent": ""}
    stored, _, failures = _stored(models_dir, tmp_path / "root", "mertools", texts)
    assert set(stored) == {"said"} and set(failures.video_id) == {"silent"}
    assert not baseline_text(models_dir / "tiny-llama", [""])[0].any()


def test_default_recipe_is_the_baseline_mean(models_dir, tmp_path):
    """The default averages the last 4 states where the baseline sums them (x4); its batching
    with right padding, masks and special-token exclusion change nothing else for these texts."""
    stored, _, _ = _stored(models_dir, tmp_path / "root", "merflow", TEXTS)
    references = baseline_text(models_dir / "tiny-llama", list(TEXTS.values()))
    for video_id, reference in zip(TEXTS, references, strict=True):
        scale = np.abs(reference).max()
        np.testing.assert_allclose(4 * stored[video_id], reference, rtol=1e-4, atol=1e-5 * scale)
