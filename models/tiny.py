"""Tiny, seeded, random-weight checkpoints with the real extractors' architectures and layouts.

`build_tiny_models(out_dir)` writes one folder per `tiny-*` spec, in the same on-disk layout as
the real checkpoint, so that tests and the demo profile load them through the same code path:
- tiny-clip-vit: open_clip_config.json + open_clip_model.safetensors (loaded via `local-dir:`);
- tiny-hubert: a transformers save_pretrained HuBERT folder + preprocessor_config.json;
- tiny-wenet-ctc: model.onnx (fbank in, CTC log-probs out, sherpa-onnx metadata) + tokens.txt;
- tiny-llama: a save_pretrained Llama folder + a byte-level BPE tokenizer trained offline.
Also here: the full-size configurations of the paper architectures, for random-weight shape
tests and benchmarks (`random_encoder`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import TINY_MARKER, ExtractorSpec, get_spec

# Bump when a builder changes what it writes: old folders are rebuilt and get a new revision.
TINY_FORMAT = 2

# Sentences the tiny tokenizer and the tiny ASR vocabulary are built from.
CORPUS: tuple[str, ...] = (
    "今天天气很好，我很开心。",
    "你为什么这么生气？我不想再说了！",
    "我真的很难过，想一个人待一会儿。",
    "这件事让我很担心，明天怎么办？",
    "哇，真没想到会这样！太意外了。",
    "我们明天一起去上班，然后吃饭。",
    "他说的话让我又生气又伤心。",
    "别担心，一切都会好起来的。",
)

_TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,  # as in OpenAI's CLIP weights
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_CLIP_PREPROCESS: dict[str, Any] = {
    "mean": [0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP's normalisation
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def hubert_config(tiny: bool) -> Any:
    """chinese-hubert-large's HuBERT configuration, or its 2-layer width-32 twin."""
    from transformers import HubertConfig

    # Layout of TencentGameMate/chinese-hubert-large's config.json (fairseq's HuBERT-large):
    # layer-norm conv feature encoder with conv bias, stable (pre-)layer norm; conv
    # kernels/strides are the default.
    common = {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}
    if tiny:
        return HubertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32,) * 7,
            **common,
        )
    return HubertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        **common,
    )


def causal_lm_config(tiny: bool, vocab_size: int) -> Any:
    """A Llama configuration: Baichuan2-13B-Base's dimensions, or a 2-layer width-32 twin.

    Baichuan2 is a Llama-style decoder (pre-RMSNorm, SwiGLU MLP, no biases). Its 13B model uses
    ALiBi instead of rotary positions, which a LlamaConfig cannot express; the extractor's
    code path (AutoModel, hidden states, masks, pooling) is the same either way.
    """
    from transformers import LlamaConfig

    if tiny:
        sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
        sizes |= {"num_attention_heads": 4, "num_key_value_heads": 4}
        positions = 512
    else:
        sizes = {"hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40}
        sizes |= {"num_attention_heads": 40, "num_key_value_heads": 40}
        positions = 4096
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=positions,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        **sizes,
    )


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained offline on CORPUS, wrapped for transformers.

    Like Llama/Baichuan tokenizers it adds a BOS token, so special-token exclusion is exercised.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, matching causal_lm_config
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


class _CtcBlock(nn.Module):
    """Pre-norm self-attention block written with plain ops so ONNX keeps batch and time free."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        head = width // self.heads
        qkv = self.qkv(self.norm1(x)).view(batch, time, 3, self.heads, head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head)
        scores = (q @ k.transpose(-1, -2)) / head**0.5  # (B, heads, T, T)
        scores = scores.masked_fill(padded[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, time, width)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyCtcNetwork(nn.Module):
    """WeNet-style CTC model: 4x conv subsampling, 2 attention blocks, log-softmax over tokens.

    Inputs and outputs follow WeNet's sherpa-onnx export: fbank (N, T, 80) and lengths (N,) in,
    log-probs (N, T', vocab) and lengths (N,) out, T' = T / 4.
    """

    subsampling_factor = 4

    def __init__(self, vocab_size: int, n_mels: int = 80, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.subsample = nn.Sequential(
            nn.Conv1d(n_mels, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.blocks = nn.ModuleList([_CtcBlock(width, 2) for _ in range(layers)])
        self.head = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.subsample(x.transpose(1, 2)).transpose(1, 2)  # (N, T', width)
        lens = ((x_lens + 1) // 2 + 1) // 2  # two stride-2 convs with padding 1
        padded = torch.arange(h.shape[1], device=h.device).unsqueeze(0) >= lens.unsqueeze(1)
        for block in self.blocks:
            h = block(h, padded)
        return self.head(h).log_softmax(dim=-1), lens


@contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars while writing checkpoints, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_clip(folder: Path) -> None:
    """open_clip_config.json + open_clip_model.safetensors of a random tiny CLIP."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.CLIP(**_TINY_CLIP_CFG)
    size = _TINY_CLIP_CFG["vision_cfg"]["image_size"]
    config = {"model_cfg": _TINY_CLIP_CFG, "preprocess_cfg": {"size": size, **_CLIP_PREPROCESS}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / "open_clip_model.safetensors"))


def _write_hubert(folder: Path) -> None:
    """A save_pretrained tiny HuBERT with its Wav2Vec2FeatureExtractor config."""
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    with _quiet_transformers():
        HubertModel(hubert_config(tiny=True)).save_pretrained(folder)
    # chinese-hubert-large's preprocessor_config.json: per-clip zero mean, unit variance.
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(folder)


def _write_wenet(folder: Path) -> None:
    """model.onnx (with sherpa-onnx's metadata) + tokens.txt of a random tiny CTC network."""
    import onnx

    chars = sorted({c for sentence in CORPUS for c in sentence if c.strip()})
    tokens = ["<blank>", "<unk>", *chars, "<sos/eos>"]  # WeNet's units.txt order
    (folder / "tokens.txt").write_text(
        "".join(f"{token} {i}\n" for i, token in enumerate(tokens)), encoding="utf-8"
    )
    network = TinyCtcNetwork(len(tokens)).eval()
    model_file = folder / "model.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one that keeps this graph simple.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (torch.randn(1, 100, 80), torch.tensor([100])),
            str(model_file),
            input_names=["x", "x_lens"],
            output_names=["log_probs", "log_probs_lens"],
            dynamic_axes={
                "x": {0: "N", 1: "T"},
                "x_lens": {0: "N"},
                "log_probs": {0: "N", 1: "T"},
                "log_probs_lens": {0: "N"},
            },
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(model_file))
    metadata = {
        "model_type": "wenet_ctc",
        "version": "1",
        "comment": "merflow tiny random CTC model",
        "vocab_size": len(tokens),
        "subsampling_factor": TinyCtcNetwork.subsampling_factor,
    }
    for key, value in metadata.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.save(proto, str(model_file))


def _write_llama(folder: Path) -> None:
    """A save_pretrained tiny Llama base model with its BPE tokenizer."""
    from transformers import LlamaModel

    tokenizer = build_tokenizer()
    with _quiet_transformers():
        tokenizer.save_pretrained(folder)
        LlamaModel(causal_lm_config(tiny=True, vocab_size=len(tokenizer))).save_pretrained(folder)


_WRITERS: dict[str, Callable[[Path], None]] = {
    "tiny-clip-vit": _write_clip,
    "tiny-hubert": _write_hubert,
    "tiny-wenet-ctc": _write_wenet,
    "tiny-llama": _write_llama,
}


def _is_built(folder: Path, name: str, seed: int) -> bool:
    """Whether `folder` holds a complete tiny checkpoint of `name` built with `seed`."""
    marker = folder / TINY_MARKER
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text(encoding="utf-8"))
    return info == {"spec": name, "seed": seed, "format": TINY_FORMAT}


def build_tiny_models(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny checkpoint under out_dir/<spec name>; skip those already built."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for offset, (name, write) in enumerate(sorted(_WRITERS.items())):
        folder = out_dir / name
        built[name] = folder
        if _is_built(folder, name, seed):
            continue
        # Build in a scratch folder and rename it into place, so a crash or a concurrent
        # builder never leaves a half-written checkpoint under the final name.
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1000 + offset)
                write(scratch)
            marker = {"spec": name, "seed": seed, "format": TINY_FORMAT}
            (scratch / TINY_MARKER).write_text(json.dumps(marker), encoding="utf-8")
            if folder.exists() and not _is_built(folder, name, seed):
                shutil.rmtree(folder)
            try:
                os.rename(scratch, folder)
            except OSError:
                if not _is_built(folder, name, seed):  # lost a race to another builder
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return built


def random_encoder(
    spec: ExtractorSpec | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """An encoder of the spec's architecture at full size with random weights, in memory.

    For shape tests and throughput benchmarks where no checkpoint is present. The text model
    is Llama-shaped (see causal_lm_config) and uses the tiny tokenizer, whose ids fit any vocab.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    if spec.loader == "open_clip":
        import open_clip

        from models.visual import MERTOOLS, VisualEncoder, mertools_preprocess

        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        if spec.tiny:
            cfg = _TINY_CLIP_CFG
            model = open_clip.CLIP(**cfg).to(device, dtype)
            preprocess = open_clip.image_transform(
                cfg["vision_cfg"]["image_size"], is_train=False, **_CLIP_PREPROCESS
            )
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.architecture, pretrained=None, precision=precision, device=device
            )
        if spec.recipe == MERTOOLS:  # the baseline's PIL processor, as load_visual uses it
            side = model.visual.image_size
            preprocess = mertools_preprocess(None, side[0] if isinstance(side, tuple) else side)
        return VisualEncoder(spec, model.visual, preprocess, device=device, dtype=dtype)
    if spec.loader == "hf-hubert":
        from transformers import HubertModel, Wav2Vec2FeatureExtractor

        from models.acoustic import AcousticEncoder

        model = HubertModel(hubert_config(tiny=spec.tiny)).to(device, dtype)
        features = Wav2Vec2FeatureExtractor(sampling_rate=spec.sample_rate, do_normalize=True)
        return AcousticEncoder(spec, model, features, device=device, dtype=dtype)
    if spec.loader == "hf-causal-lm":
        from transformers import LlamaModel

        from models.text import TextEncoder

        tokenizer = build_tokenizer()
        vocab = len(tokenizer) if spec.tiny else 125_696  # Baichuan2's vocabulary size
        config = causal_lm_config(tiny=spec.tiny, vocab_size=vocab)
        with torch.device(device):
            model = LlamaModel._from_config(config, dtype=dtype)
        return TextEncoder(spec, model, tokenizer, device=device, dtype=dtype)
    raise ValueError(
        f"no random-weight builder for extractor {spec.name} (loader {spec.loader}); "
        "an ASR model needs its exported ONNX file"
    )
