"""Utterance text features from a causal LM: last-layer mean over the text's own tokens.

Special tokens (BOS/EOS/pad) feed the model but are left out of the average; sequences are
right-padded so that, under causal attention, a text's states do not depend on what else is
in the batch. Empty text has no feature (None, a missing modality), never a zero vector.

The `mertools` recipe is the challenge baseline's: one text per forward (no padding, no
truncation), the tokens kept those that a probe sentence shows to be text (`probe_span`), the
sum of the last 4 states, fp16 on a GPU. It too gives None, not the baseline's zero vector, for
an empty text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.encoders import (
    Extractor,
    final_hidden_states,
    masked_sum,
    mean_of_last_layers,
    pack_batches,
    sum_of_last_layers,
)
from models.registry import (
    CheckpointMismatchError,
    ExtractorInputError,
    ExtractorSpec,
    RemoteCodeRefusedError,
)

logger = logging.getLogger(__name__)

# The baseline's probe: a sentence without spaces whose decoded tokens show where text begins.
PROBE_SENTENCE = "今天天气真好"


def probe_span(tokenizer: Any) -> tuple[int, int | None]:
    """(start, end) slicing a tokenized text's own tokens out of `tokenizer(text)`'s ids.

    The challenge baseline's rule: start is the first of 0, 1, 2 from which the probe's ids decode
    (spaces removed) to text beginning with the probe; end is None when they decode to exactly
    the probe, else -1 or -2, whichever cuts the trailing special tokens off.
    """
    ids = list(tokenizer(PROBE_SENTENCE)["input_ids"])

    def decoded(part: list[int]) -> str:
        return str(tokenizer.decode(part)).replace(" ", "")

    for start in range(3):
        text = decoded(ids[start:])
        if text == PROBE_SENTENCE:
            return start, None
        if text.startswith(PROBE_SENTENCE):
            for end in (-1, -2):
                if decoded(ids[start:end]) == PROBE_SENTENCE:
                    return start, end
            break
    raise CheckpointMismatchError(
        f"the tokenizer's ids for the probe {PROBE_SENTENCE!r} ({ids}) decode to no slice equal to "
        "it, so the mertools recipe cannot tell text tokens from special ones; use the merflow "
        "recipe for this model"
    )


class TextEncoder(Extractor):
    """Embeds texts into one vector each; empty or special-token-only texts give None."""

    def __init__(
        self,
        spec: ExtractorSpec,
        model: nn.Module,
        tokenizer: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_path: Path | None = None,
        max_batch_tokens: int = 4096,
    ) -> None:
        super().__init__(spec, device, dtype, model_path)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.output_dim = int(model.config.hidden_size)
        if spec.output_dim is not None and self.output_dim != spec.output_dim:
            raise CheckpointMismatchError(
                f"extractor {spec.name} expects {spec.output_dim}-d features but the checkpoint "
                f"at {model_path} has hidden size {self.output_dim}; check the folder"
            )
        # Padding is masked out, so any id will do where the tokenizer defines no pad token.
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.one_by_one = spec.recipe == "mertools"
        if self.one_by_one:
            wanted = torch.float16 if device.type == "cuda" else torch.float32
            if dtype != wanted:
                raise ValueError(
                    f"extractor {spec.name} with the mertools recipe runs in {wanted} on "
                    f"{device.type}, as the challenge baseline did, not {dtype}; load it through "
                    "models.extractors.load_extractor"
                )
            self.span = probe_span(tokenizer)

    def tokenize(self, index: int, text: str) -> tuple[list[int], list[bool]] | None:
        """Token ids and which of them count (not special) for one text; None when none do."""
        if not isinstance(text, str):
            raise ExtractorInputError(
                f"text {index} is {type(text).__name__}, expected str (use '' for no text)"
            )
        if self.one_by_one:
            return self._tokenize_as_baseline(text)
        if not text.strip():
            return None
        encoded = self.tokenizer(
            text,
            add_special_tokens=True,
            truncation=True,
            max_length=self.spec.max_tokens,
            return_special_tokens_mask=True,
        )
        ids = list(encoded["input_ids"])
        keep = [not special for special in encoded["special_tokens_mask"]]
        return (ids, keep) if any(keep) else None

    def _tokenize_as_baseline(self, text: str) -> tuple[list[int], list[bool]] | None:
        """The baseline's tokens: all special tokens the tokenizer adds, no truncation; those in
        the probe's span count. Only the empty string is no text (whitespace is embedded)."""
        if not text:
            return None
        ids = list(self.tokenizer(text)["input_ids"])
        kept = set(range(len(ids))[slice(*self.span)])
        keep = [i in kept for i in range(len(ids))]
        return (ids, keep) if kept else None

    @torch.inference_mode()
    def embed(
        self, texts: Sequence[str], max_batch_tokens: int | None = None
    ) -> list[np.ndarray | None]:
        """One float32 (output_dim,) vector per text, None where the text is empty."""
        tokenized = [self.tokenize(i, text) for i, text in enumerate(texts)]
        results: list[np.ndarray | None] = [None] * len(texts)
        if self.one_by_one:
            for i, item in enumerate(tokenized):
                if item is not None:
                    results[i] = self._embed_alone(*item)
            return results
        todo = [i for i, item in enumerate(tokenized) if item is not None]
        budget = max_batch_tokens or self.max_batch_tokens
        lengths = [len(tokenized[i][0]) for i in todo]  # type: ignore[index]
        for batch in pack_batches(lengths, budget):
            members = [todo[b] for b in batch]
            longest = max(len(tokenized[i][0]) for i in members)  # type: ignore[index]
            ids = torch.full((len(members), longest), self.pad_id, dtype=torch.long)  # (B, T)
            attention = torch.zeros(len(members), longest, dtype=torch.long)
            keep = torch.zeros(len(members), longest, dtype=torch.bool)
            for row, i in enumerate(members):
                token_ids, counted = tokenized[i]  # type: ignore[misc]
                ids[row, : len(token_ids)] = torch.tensor(token_ids)
                attention[row, : len(token_ids)] = 1
                keep[row, : len(token_ids)] = torch.tensor(counted)
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=attention.to(self.device),
                output_hidden_states=True,
                use_cache=False,
            )
            states = mean_of_last_layers(final_hidden_states(out), self.spec.layers)  # (B, T, D)
            total, count = masked_sum(states, keep.to(states.device))
            pooled = (total / count.unsqueeze(1)).cpu().numpy().astype(np.float32)
            for row, i in enumerate(members):
                results[i] = pooled[row]
        return results

    def _embed_alone(self, ids: list[int], keep: list[bool]) -> np.ndarray:
        """The mertools recipe for one text: its own forward, sum of the last states, the mean
        over the kept tokens."""
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        states = sum_of_last_layers(final_hidden_states(out), self.spec.layers)[0]  # (T, D)
        kept = states[torch.tensor(keep, device=states.device)]
        return kept.mean(dim=0).cpu().numpy().astype(np.float32)


def _model_class(config: dict[str, Any]) -> tuple[Any, bool]:
    """The Auto class to load with, and whether the base model must be taken out of an LM."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto_map = config.get("auto_map") or {}
    # Baichuan2 maps only AutoModelForCausalLM to its code; its base model sits inside.
    if auto_map and "AutoModel" not in auto_map and "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM, True
    return AutoModel, False


def load_text(
    spec: ExtractorSpec,
    model_path: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    trust_remote_code: bool = False,
    reason: str = "",
) -> TextEncoder:
    """A TextEncoder from a save_pretrained folder (model + tokenizer)."""
    from transformers import AutoTokenizer

    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    if trust_remote_code:
        logger.warning(
            "trust_remote_code is ON for extractor %s (%s): Python files shipped in %s may run",
            spec.name,
            reason or "enabled",
            model_path,
        )
    model_class, take_base = _model_class(config)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if device.type == "cuda":
        # Straight onto the GPU: a 13B model never has to fit in host memory twice.
        kwargs["device_map"] = {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, local_files_only=True
        )
        model = model_class.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, **kwargs
        )
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise RemoteCodeRefusedError(
            f"the checkpoint of extractor {spec.name} at {model_path} ships its own Python code "
            "and trust_remote_code is off; if you trust that code, enable it in the spec or "
            "with the trust_remote_code=true setting"
        ) from e
    if take_base:
        model = getattr(model, model.base_model_prefix, model)
    if device.type != "cuda":
        model = model.to(device)
    return TextEncoder(spec, model, tokenizer, device=device, dtype=dtype, model_path=model_path)
