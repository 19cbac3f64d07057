"""Hugging Face transformers adapter: ``CachedModel.generate`` with kvtier underneath.

``generate`` finds the longest cached prefix of the prompt, hands it to
transformers as a pre-filled ``DynamicCache``, lets ``model.generate`` prefill
only the rest and decode, then stores the chunks that were new (the prompt's,
and with ``store_generated`` the generated tokens' too, since a chat re-sends
the answer as history). At least the prompt's last token is always computed,
because its logits give the first new token.

Batches: one sequence per call (``input_ids`` of shape [N] or [1, N]); a
larger batch raises ValueError. Prefix reuse across padded rows would need
per-row cache lengths, which ``DynamicCache`` does not have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from kvtier.config import KvtierConfig
from kvtier.engine import CacheEngine, RetrieveResult, StoreResult
from kvtier.fingerprint import model_fingerprint
from kvtier.keys import Namespace
from kvtier.layout import KVLayout, LayerKV

log = logging.getLogger(__name__)


def hf_layout(model: PreTrainedModel) -> KVLayout:
    """The KV layout of a decoder-only transformers model (all layers full attention)."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"only full-attention models are supported, this one has layers {sorted(layer_types)}")
    return KVLayout.from_torch_dtype(cfg.num_hidden_layers, kv_heads, head_dim, model.dtype)


def hf_namespace(model: PreTrainedModel, *, tenant: str | None = None, hash_name: str = "blake3") -> Namespace:
    """The namespace of a loaded model: fingerprint of its weights and config, its layout, the tenant salt."""
    fingerprint = model_fingerprint(model.config.to_dict(), model.named_parameters())
    return Namespace(fingerprint, hf_layout(model), tenant, hash_name)  # type: ignore[arg-type]


class _FirstToken(BaseStreamer):
    """Records when ``generate`` emits its first new token (the prompt is the first ``put``)."""

    def __init__(self, inner: BaseStreamer | None) -> None:
        self.inner = inner
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.end()


@dataclass(frozen=True)
class Generation:
    """One ``generate`` call's output and what kvtier did for it."""

    sequences: torch.Tensor  # [1, prompt + new]
    prompt_tokens: int
    reused_tokens: int
    tier_tokens: dict[str, int]
    ttft_s: float
    total_s: float
    stored: StoreResult
    output: Any  # transformers' GenerateOutput (logits/scores if asked for)

    @property
    def new_tokens(self) -> list[int]:
        return self.sequences[0, self.prompt_tokens :].tolist()

    @property
    def tiers(self) -> str:
        return "+".join(f"{t}:{n}" for t, n in self.tier_tokens.items() if n) or "none"


class CachedModel:
    """A transformers causal LM whose prompts go through kvtier. Not thread-safe (one generate at a time)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        engine: CacheEngine,
        *,
        store_generated: bool = True,
    ) -> None:
        expected = hf_layout(model)
        if engine.layout != expected:
            raise ValueError(f"engine layout {engine.layout} does not match the model's {expected}")
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.store_generated = store_generated

    @classmethod
    def from_config(cls, config: KvtierConfig) -> CachedModel:
        """Resolve and load ``config.model``, build and start its engine. Call ``close`` when done."""
        from kvtier.models import load_model, resolve_model

        model, tokenizer = load_model(resolve_model(config.model, config.cache_dir))
        engine = CacheEngine.from_config(config, hf_namespace(model, tenant=config.tenant, hash_name=config.hash))
        return cls(model, tokenizer, engine.start(), store_generated=config.store_generated)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> CachedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cache_from(self, hit: RetrieveResult) -> DynamicCache:
        """A DynamicCache that adopts the retrieved tensors (no copy).

        ``DynamicLayer.update`` would concatenate onto an empty tensor, copying
        the whole prefix once more; plain dynamic layers take the tensors as
        they are instead (kvtier owns them and nobody else holds a reference).
        """
        cache = DynamicCache(config=self.model.config)
        for layer, kv in zip(cache.layers, hit.layers, strict=True):
            k, v = kv[0].unsqueeze(0), kv[1].unsqueeze(0)  # [2, H, N, D] -> [1, H, N, D] each
            if type(layer) is DynamicLayer:
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            else:
                layer.update(k, v)
        return cache

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[int], **generate_kwargs: Any) -> Generation:
        """Generate from one prompt, reusing and then storing its prefix KV.

        ``generate_kwargs`` go to ``model.generate`` (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``output_logits``, a ``streamer``, …);
        ``past_key_values`` and ``attention_mask`` are kvtier's to set.
        Returns a :class:`Generation`; raises ValueError for a batch > 1 or an
        empty prompt.
        """
        for reserved in ("past_key_values", "attention_mask", "return_dict_in_generate"):
            if reserved in generate_kwargs:
                raise ValueError(f"{reserved} is set by kvtier; do not pass it")
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"CachedModel.generate takes one sequence ([N] or [1, N]), got shape {tuple(ids.shape)}")
        n_prompt = ids.shape[1]
        if n_prompt == 0:
            raise ValueError("empty prompt")
        start = time.perf_counter()
        hit = self.engine.retrieve(ids[0], max_tokens=n_prompt - 1)
        cache = self._cache_from(hit) if hit.num_tokens else DynamicCache(config=self.model.config)
        timer = _FirstToken(generate_kwargs.pop("streamer", None))
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            return_dict_in_generate=True,
            streamer=timer,
            **generate_kwargs,
        )
        ttft = (timer.first_token_at or time.perf_counter()) - start
        stored = self._store(out.sequences[0], out.past_key_values, n_prompt)
        total = time.perf_counter() - start
        log.info(
            "kvtier: prompt %d tokens, reused %d (%s), stored %d new chunks, TTFT %.3fs",
            n_prompt,
            hit.num_tokens,
            hit.tiers,
            stored.stored_chunks,
            ttft,
        )
        return Generation(out.sequences, n_prompt, hit.num_tokens, dict(hit.tier_tokens), ttft, total, stored, out)

    def _store(self, sequence: torch.Tensor, cache: DynamicCache, n_prompt: int) -> StoreResult:
        """Store the prompt's chunks, then (with ``store_generated``) those of prompt + answer.

        The prompt is stored on its own first so that its trailing partial chunk
        exists too: a repeat of the same prompt then reuses all of it, while the
        longer partial chunk serves the next turn of a chat.
        """
        cached = cache.get_seq_length()
        keys = [layer.keys[0] for layer in cache.layers]  # [H, cached, D]
        values = [layer.values[0] for layer in cache.layers]
        source = LayerKV(keys, values, self.engine.layout)
        result = self.engine.store(sequence[: min(n_prompt, cached)], source)
        if self.store_generated and cached > n_prompt:
            more = self.engine.store(sequence[:cached], source)
            result = result.combine(more)
        return result
