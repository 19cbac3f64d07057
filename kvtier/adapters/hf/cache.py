"""``KvtierCache``: a transformers ``DynamicCache`` that starts from stored prefixes and stores what it computes.

Use it as transformers' own caches are used (``OffloadedCache``,
``QuantizedCache``)::

    cache = KvtierCache(model, engine)
    inputs = cache.load(prompts)            # one prompt or a batch; retrieves each one's longest stored prefix
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    cache.store_generated(out.sequences)    # optional: the answers' chunks too (a chat re-sends them)
    cache.rows[0].reused_tokens, cache.rows[0].stored

``load`` fills the cache with the retrieved KV and returns the ``input_ids``
and ``attention_mask`` to generate from; transformers then computes only the
tokens after the cached part (``generate`` feeds ``input_ids[:, cache
length:]``). The prompts' chunks are stored as soon as the prefill's last layer
has its KV (inside that forward), so a ``generate`` call needs nothing after
it to leave its prompt behind. At least each prompt's last token is always
computed, because its logits give the first new token.

Batches are left-padded. Row ``i`` of ``load``'s ``input_ids`` is::

    [pad * (C - u_i)] [prompt_i[:u_i]] | [pad * (R - n_i + u_i)] [prompt_i[u_i:]]
     \\______________ cached part, C columns ____/   \\_______ computed, R columns ____/

with ``u_i`` the tokens of row ``i`` that come from kvtier; the pads are
masked out and positions come from the mask (transformers' ``cumsum``), so
every real token sits at its true position. For a model with only
full-attention layers ``u_i`` is row ``i``'s own hit. Sliding-window masks are
built over column indices, not positions, so a model with sliding layers
keeps each row's tokens contiguous (no pads inside a row): then ``u_i`` is
what a common cached width allows (``C = min_i(L - n_i + h_i)``, ``L`` the
longest prompt), which may be less than the row's hit.

Sliding-window layers: transformers' ``DynamicSlidingWindowLayer`` keeps
only the last ``window - 1`` tokens, which is too little to store a prefix.
The cache turns on its past recording (``activate_past_recording``): the
layer keeps every token, while what it hands to attention and the masks it
asks for are exactly those of the default (same shapes, same numbers). Nothing
in plain ``generate`` crops the cache; if something has (a length that no
longer matches), nothing is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvtier.engine import CacheEngine, RetrieveResult, StoreResult
from kvtier.fingerprint import model_fingerprint
from kvtier.keys import Namespace
from kvtier.layout import KVLayout, LayerKV
from kvtier.models import check_supported

log = logging.getLogger(__name__)

Prompt = torch.Tensor | Sequence[int]


def hf_layout(model: PreTrainedModel) -> KVLayout:
    """The KV layout of a supported decoder-only transformers model, each layer's attention window included.

    Raises :class:`~kvtier.errors.UnsupportedModelError` (a ``ValueError``)
    naming the reason for a model kvtier cannot cache
    (:func:`kvtier.models.unsupported_reason`).
    """
    plan = check_supported(model.config)
    return KVLayout.from_torch_dtype(plan.num_layers, plan.num_kv_heads, plan.head_dim, model.dtype, plan.windows)


def hf_namespace(model: PreTrainedModel, *, tenant: str | None = None, hash_name: str = "blake3") -> Namespace:
    """The namespace of a loaded model: fingerprint of its weights and config, its layout, the tenant salt."""
    fingerprint = model_fingerprint(model.config.to_dict(), model.named_parameters())
    return Namespace(fingerprint, hf_layout(model), tenant, hash_name)  # type: ignore[arg-type]


def _stores(a: StoreResult, b: StoreResult) -> StoreResult:
    return a.combine(b)


_NOTHING = StoreResult(0, 0, 0, 0)


@dataclass
class RowReport:
    """What kvtier did for one prompt of a :class:`KvtierCache`."""

    prompt: torch.Tensor  # [n] token ids
    reused_tokens: int  # leading prompt tokens whose KV came from kvtier (not computed)
    hit_tokens: int  # tokens the engine returned (> reused_tokens only in a sliding model's batch)
    tier_tokens: dict[str, int]  # where the hit came from
    columns: torch.Tensor = field(repr=False)  # [n] column of each prompt token in the padded batch
    stored: StoreResult = _NOTHING  # chunks written for this row (prompt, then generated tokens)

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt.numel())

    @property
    def tiers(self) -> str:
        return "+".join(f"{t}:{n}" for t, n in self.tier_tokens.items() if n) or "none"


def as_prompts(prompts: Prompt | Sequence[Prompt]) -> tuple[list[torch.Tensor], bool]:
    """(list of 1-D long tensors, whether the input was a batch). Raises ValueError for empty or malformed input.

    One prompt: a 1-D tensor or a sequence of ints, or a [1, N] tensor. A
    batch: a [B, N] tensor with B > 1 (every row a whole prompt, no padding),
    or a list/tuple of prompts of any lengths.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            rows, batch = [prompts], False
        elif prompts.dim() == 2:
            rows, batch = list(prompts), prompts.shape[0] > 1
        else:
            raise ValueError(f"prompt tensor must be [N] or [B, N], got shape {tuple(prompts.shape)}")
    elif isinstance(prompts, (list, tuple)) and prompts and all(_is_sequence(p) for p in prompts):
        rows, batch = [torch.as_tensor(p) for p in prompts], True
    else:
        rows, batch = [torch.as_tensor(prompts)], False
    out = []
    for i, row in enumerate(rows):
        row = row.to("cpu", torch.long)  # token ids live on the CPU (keys, padding); the inputs move to the model
        if row.dim() != 1:
            raise ValueError(f"prompt {i} must be one-dimensional token ids, got shape {tuple(row.shape)}")
        if row.numel() == 0:
            raise ValueError(f"prompt {i} is empty")
        out.append(row)
    if not out:
        raise ValueError("no prompts")
    return out, batch


class KvtierCache(DynamicCache):
    """A ``DynamicCache`` filled from kvtier by :meth:`load` that stores its prompts' KV (see the module docstring).

    One cache serves one ``generate`` call (like any ``DynamicCache``). Not thread-safe.
    """

    def __init__(self, model: PreTrainedModel, engine: CacheEngine, *, pad_token_id: int | None = None) -> None:
        expected = hf_layout(model)
        if engine.layout != expected:
            raise ValueError(f"engine layout {engine.layout} does not match the model's {expected}")
        super().__init__(config=model.config)
        if len(self.layers) != expected.num_layers:
            raise ValueError(f"transformers built {len(self.layers)} cache layers for {expected.num_layers} layers")
        for layer, window in zip(self.layers, expected.windows or (0,) * expected.num_layers, strict=True):
            if window:
                if type(layer) is not DynamicSlidingWindowLayer or layer.sliding_window != window:
                    raise ValueError(f"cache layer {layer!r} is not a sliding window of {window}")
                layer.activate_past_recording()  # keep every token: the prefix is stored from it
            elif type(layer) is not DynamicLayer:
                raise ValueError(f"cache layer {layer!r} is not a full-attention DynamicLayer")
        self.engine = engine
        self.kv_layout = expected
        self.device = model.device  # the retrieved KV (CPU) moves here; what is stored is copied back out
        gen = getattr(model, "generation_config", None)
        if pad_token_id is None and gen is not None:
            pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else _first(gen.eos_token_id)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.rows: list[RowReport] = []
        self.prompt_columns = 0  # width of load()'s input_ids
        self._pending_prompt_store = False
        self._reordered = False

    # -- filling ---------------------------------------------------------------------------------------------------

    def load(self, prompts: Prompt | Sequence[Prompt], *, copies: int = 1) -> dict[str, torch.Tensor]:
        """Retrieve each prompt's longest stored prefix into this cache; return ``input_ids`` and ``attention_mask``.

        Call once, on an empty cache, then pass both (``**inputs``) and this
        cache to ``model.generate`` (or a forward). Per-row results are in
        :attr:`rows`. ``generate`` repeats its inputs, but not a filled cache,
        for ``num_return_sequences`` (sampling) or ``num_beams`` (beam search):
        pass that number as ``copies`` and each prompt's cached rows are
        repeated to match.
        """
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        if self.rows or self.get_seq_length() or any(layer.is_initialized for layer in self.layers):
            raise ValueError("KvtierCache.load fills an empty cache once; make a new KvtierCache per generate")
        rows, _ = as_prompts(prompts)
        hits = [self.engine.retrieve(row, max_tokens=row.numel() - 1) for row in rows]
        lengths = [row.numel() for row in rows]
        hit_lens = [hit.num_tokens for hit in hits]
        if self.kv_layout.has_sliding and len(rows) > 1:  # contiguous rows (sliding masks index columns)
            longest = max(lengths)
            width = min(longest - n + h for n, h in zip(lengths, hit_lens, strict=True))
            used = [max(0, width - (longest - n)) for n in lengths]
        else:
            used = hit_lens
            width = max(used)
        computed = max(n - u for n, u in zip(lengths, used, strict=True))
        total = width + computed
        input_ids = torch.full((len(rows), total), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), total), dtype=torch.long)
        for i, (row, n, u) in enumerate(zip(rows, lengths, used, strict=True)):
            columns = torch.cat(
                [torch.arange(width - u, width), torch.arange(total - (n - u), total)]
            )  # where row i's tokens sit
            input_ids[i, columns] = row
            mask[i, columns] = 1
            self.rows.append(RowReport(row, u, hit_lens[i], dict(hits[i].tier_tokens), columns))
        if width:
            self._fill(hits, used, width, copies)
        self.prompt_columns = total
        self._pending_prompt_store = True
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _fill(self, hits: list[RetrieveResult], used: list[int], width: int, copies: int) -> None:
        """Put the retrieved KV into the layers: [B * copies, H, width, D], row i's last ``used[i]`` columns its hit."""
        layout = self.kv_layout
        adopt = len(hits) == 1 and used[0] == hits[0].num_tokens  # one row, all of it: no copy
        for index, layer in enumerate(self.layers):
            if adopt:
                kv = hits[0].layers[index]  # [2, H, N, D]
                keys, values = kv[0].unsqueeze(0), kv[1].unsqueeze(0)
            else:
                shape = (len(hits), layout.num_kv_heads, width, layout.head_dim)
                keys = torch.zeros(shape, dtype=layout.torch_dtype)
                values = torch.zeros(shape, dtype=layout.torch_dtype)
                for i, (hit, u) in enumerate(zip(hits, used, strict=True)):
                    if u:
                        keys[i, :, width - u :] = hit.layers[index][0, :, :u]
                        values[i, :, width - u :] = hit.layers[index][1, :, :u]
            keys, values = keys.to(self.device), values.to(self.device)  # no copy on CPU
            if copies > 1:
                keys, values = keys.repeat_interleave(copies, dim=0), values.repeat_interleave(copies, dim=0)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values  # adopted as they are: kvtier owns them
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = width

    # -- storing ---------------------------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if (
            self._pending_prompt_store
            and layer_idx == len(self.layers) - 1
            and self.get_seq_length() >= self.prompt_columns
        ):
            self._pending_prompt_store = False  # the prefill's last layer: every layer holds the prompts' KV
            copies = self._copies()
            for i, row in enumerate(self.rows):  # copies of one prompt (num_return_sequences, beams) share its KV
                if copies:
                    row.stored = _stores(row.stored, self._store_row(i * copies, row.prompt, row.columns))
        return out

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reordered = True  # beam search: cache rows no longer follow generate's output rows
        super().reorder_cache(beam_idx)

    def _copies(self) -> int:
        """How many cache rows each prompt has (generate repeats them for ``num_return_sequences``); 0: unknown."""
        batch = self.layers[0].keys.shape[0] if self.layers and self.layers[0].keys is not None else 0
        if not self.rows or batch % len(self.rows):
            log.warning("kvtier: the cache has %d rows for %d prompts; nothing stored", batch, len(self.rows))
            return 0
        return batch // len(self.rows)

    def store_generated(self, sequences: torch.Tensor, eos_token_id: int | Sequence[int] | None = None) -> None:
        """Store each output row's prompt + generated tokens (``generate``'s ``sequences``, [B * k, columns + new]).

        ``k`` is ``num_return_sequences`` (output row ``r`` continues prompt
        ``r // k``). A row's generated tokens end after its first
        ``eos_token_id`` (what follows is padding); the last generated token
        has no KV yet and is left out. After beam search (the cache's rows were
        reordered) nothing is stored: the rows no longer match the output.
        Adds to :attr:`rows`' ``stored``.
        """
        if self._pending_prompt_store:
            raise ValueError("store_generated needs a generate (or forward) over load()'s inputs first")
        if self._reordered:
            log.warning("kvtier: beam search reordered the cache; the generated tokens are not stored")
            return
        copies = self._copies()
        if sequences.dim() != 2 or not copies or sequences.shape[0] != len(self.rows) * copies:
            raise ValueError(f"sequences must be [{len(self.rows) * max(copies, 1)}, N], got {tuple(sequences.shape)}")
        eos = set(_all(eos_token_id))
        with_kv = self.get_seq_length() - self.prompt_columns  # generated tokens whose KV the cache holds
        for r in range(sequences.shape[0]):
            row = self.rows[r // copies]
            new = sequences[r, self.prompt_columns :].tolist()
            ends = [j for j, t in enumerate(new) if t in eos]
            keep = min(with_kv, ends[0] + 1 if ends else len(new))
            if keep <= 0:
                continue
            tokens = torch.cat([row.prompt, sequences[r, self.prompt_columns : self.prompt_columns + keep].cpu()])
            columns = torch.cat([row.columns, torch.arange(self.prompt_columns, self.prompt_columns + keep)])
            row.stored = _stores(row.stored, self._store_row(r, tokens, columns))

    def _store_row(self, row: int, tokens: torch.Tensor, columns: torch.Tensor) -> StoreResult:
        length = self.get_seq_length()
        if any(layer.keys is None or layer.keys.shape[-2] != length for layer in self.layers):
            log.warning("kvtier: the cache was cropped (a layer no longer holds every token); nothing stored")
            return _NOTHING
        if row == 0 and torch.equal(columns, torch.arange(columns.numel())):
            n = columns.numel()  # one unpadded row: views, no copy
            keys = [layer.keys[0, :, :n] for layer in self.layers]
            values = [layer.values[0, :, :n] for layer in self.layers]
        else:
            index = columns.to(self.device)
            keys = [layer.keys[row].index_select(1, index) for layer in self.layers]
            values = [layer.values[row].index_select(1, index) for layer in self.layers]
        return self.engine.store(tokens, LayerKV(keys, values, self.engine.layout))


def _is_sequence(p: object) -> bool:
    return (isinstance(p, torch.Tensor) and p.dim() >= 1) or isinstance(p, (list, tuple))


def _all(ids: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return [int(x) for x in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(x) for x in ids]


def _first(ids: int | Sequence[int] | torch.Tensor | None) -> int | None:
    found = _all(ids)
    return found[0] if found else None
