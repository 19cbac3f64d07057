"""``CachedModel``: a transformers causal LM whose prompts go through kvtier.

``generate`` finds the longest cached prefix of each prompt, hands it to
transformers as a pre-filled :class:`~kvtier.adapters.hf.cache.KvtierCache`
(a ``DynamicCache``), lets ``model.generate`` prefill only the rest and
decode, then stores the chunks that were new (the prompt's, and with
``store_generated`` the generated tokens' too, since a chat re-sends the
answer as history). At least each prompt's last token is always computed,
because its logits give the first new token.

Batches: ``generate([prompt, ...])`` left-pads the prompts and gives each row
its own prefix hit (how the rows are laid out: :mod:`kvtier.adapters.hf.cache`);
the result is one :class:`Generation` per prompt, equal to generating them
one by one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from kvtier.adapters.hf.cache import KvtierCache, Prompt, _all, as_prompts, hf_layout, hf_namespace
from kvtier.config import KvtierConfig
from kvtier.engine import CacheEngine, StoreResult

log = logging.getLogger(__name__)


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

    sequences: torch.Tensor  # [k, prompt + new] (k = num_return_sequences, 1 by default), no left padding
    prompt_tokens: int
    reused_tokens: int
    tier_tokens: dict[str, int]
    ttft_s: float  # of the whole batch, for a batch
    total_s: float
    stored: StoreResult
    output: Any  # transformers' GenerateOutput (logits/scores if asked for); a batch's rows share it
    row: int = 0  # this prompt's first row in ``output`` (``output.logits[step][row]``)

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

    @overload
    def generate(self, input_ids: torch.Tensor | Sequence[int], **generate_kwargs: Any) -> Generation: ...

    @overload
    def generate(self, input_ids: Sequence[Prompt], **generate_kwargs: Any) -> list[Generation]: ...

    def generate(
        self, input_ids: torch.Tensor | Sequence[int] | Sequence[Prompt], **generate_kwargs: Any
    ) -> Generation | list[Generation]:
        """Generate from one prompt, or from a batch, reusing and then storing each prompt's prefix KV.

        One prompt (``[N]``, ``[1, N]`` or a list of ints) gives a
        :class:`Generation`; a batch (a list of prompts of any lengths, or a
        ``[B, N]`` tensor with B > 1) gives a list of them, one per prompt, in
        order (:meth:`generate_batch`). ``generate_kwargs`` go to
        ``model.generate`` (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``output_logits``, a ``streamer``, …); ``past_key_values``,
        ``attention_mask`` and ``return_dict_in_generate`` are kvtier's to set.
        Raises ValueError for an empty prompt or one of them passed.
        """
        prompts, batch = as_prompts(input_ids)  # type: ignore[arg-type]
        results = self._generate(prompts, generate_kwargs)
        return results if batch else results[0]

    def generate_batch(self, prompts: Sequence[Prompt], **generate_kwargs: Any) -> list[Generation]:
        """:meth:`generate` for a list of prompts (any lengths): one :class:`Generation` per prompt, in order."""
        rows, _ = as_prompts(list(prompts))
        return self._generate(rows, generate_kwargs)

    @torch.inference_mode()
    def _generate(self, prompts: list[torch.Tensor], generate_kwargs: dict[str, Any]) -> list[Generation]:
        for reserved in ("past_key_values", "attention_mask", "return_dict_in_generate"):
            if reserved in generate_kwargs:
                raise ValueError(f"{reserved} is set by kvtier; do not pass it")
        start = time.perf_counter()
        cache = KvtierCache(self.model, self.engine, pad_token_id=generate_kwargs.get("pad_token_id"))
        gen_config = self.model.generation_config
        copies = int(generate_kwargs.get("num_return_sequences") or gen_config.num_return_sequences or 1)
        inputs = cache.load(prompts, copies=copies)
        if len(prompts) > 1:
            generate_kwargs.setdefault("pad_token_id", cache.pad_token_id)
        timer = _FirstToken(generate_kwargs.pop("streamer", None))
        out = self.model.generate(
            **inputs, past_key_values=cache, return_dict_in_generate=True, streamer=timer, **generate_kwargs
        )
        ttft = (timer.first_token_at or time.perf_counter()) - start
        eos = generate_kwargs.get("eos_token_id", getattr(self.model.generation_config, "eos_token_id", None))
        if self.store_generated:
            cache.store_generated(out.sequences, eos)
        total = time.perf_counter() - start
        eos_ids = set(_all(eos))
        results = []
        for i, row in enumerate(cache.rows):
            new = out.sequences[i * copies : (i + 1) * copies, cache.prompt_columns :].cpu()
            if copies == 1 and len(prompts) > 1:  # a batch row runs on (pads) after its end
                ends = [j for j, t in enumerate(new[0].tolist()) if t in eos_ids]
                new = new[:, : ends[0] + 1] if ends else new
            sequence = torch.cat([row.prompt.expand(new.shape[0], -1), new], dim=1)
            log.info(
                "kvtier: prompt %d tokens, reused %d (%s), stored %d new chunks, TTFT %.3fs",
                row.prompt_tokens,
                row.reused_tokens,
                row.tiers,
                row.stored.stored_chunks,
                ttft,
            )
            results.append(
                Generation(
                    sequence,
                    row.prompt_tokens,
                    row.reused_tokens,
                    row.tier_tokens,
                    ttft,
                    total,
                    row.stored,
                    out,
                    i * copies,
                )
            )
        return results
