"""KV layouts: what a chunk's payload looks like, and conversions from engine tensors.

kvtier's canonical chunk payload is one contiguous tensor per chunk::

    chunk: [L, 2, H, T, D]   # layers, (key, value), kv heads, tokens, head dim

and a retrieved prefix is handed back per layer::

    layer l: [2, H, N, D]    # N = number of prefix tokens

so each layer's K and V are contiguous ``[H, N, D]`` views, which is what
both Hugging Face (``[B, H, N, D]``) and a paged engine's per-layer copy want.
Nothing here imports an inference engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shape and dtype of a model's attention KV, and each layer's attention kind, independent of any engine.

    Part of every chunk's namespace: chunks of different layouts never mix.

    ``windows`` says each layer's attention kind: ``windows[l] == 0`` is full
    (causal) attention, ``windows[l] == w > 0`` a sliding window in which a
    token sees itself and the ``w - 1`` tokens before it (transformers' and
    vLLM's ``sliding_window``). ``None`` (or all zeros, normalised to ``None``)
    means every layer is full attention; only then is the namespace exactly the
    one full-attention models have always had, so their keys never change.
    A chunk always holds every layer's KV for its tokens (the payload shape
    does not depend on the windows); see docs/models.md for what a sliding
    layer could leave out.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    windows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.windows is not None:
            windows = tuple(self.windows)
            if len(windows) != self.num_layers or any(not isinstance(w, int) or w < 0 for w in windows):
                raise ValueError(
                    f"KVLayout.windows must be {self.num_layers} ints >= 0 (0: full attention), got {self.windows!r}"
                )
            object.__setattr__(self, "windows", windows if any(windows) else None)

    @property
    def has_sliding(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return self.windows is not None

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """Each layer's attention kind: ``"full"`` or ``"sliding"``."""
        return tuple("sliding" if w else "full" for w in self.windows or (0,) * self.num_layers)

    @property
    def payload(self) -> KVLayout:
        """This layout without the attention kinds: what a chunk's header records and its payload's shape."""
        return self if self.windows is None else KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a chunk payload holding ``num_tokens`` tokens: [L, 2, H, T, D]."""
        return (self.num_layers, 2, self.num_kv_heads, num_tokens, self.head_dim)

    def to_dict(self) -> dict[str, int | str | list[int]]:
        """The canonical form hashed into the namespace; ``windows`` appears only when a layer slides."""
        out: dict[str, int | str | list[int]] = {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
        }
        if self.windows is not None:
            out["windows"] = list(self.windows)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, int | str | list[int]]) -> KVLayout:
        windows = data.get("windows")
        return cls(
            num_layers=int(data["num_layers"]),  # type: ignore[arg-type]
            num_kv_heads=int(data["num_kv_heads"]),  # type: ignore[arg-type]
            head_dim=int(data["head_dim"]),  # type: ignore[arg-type]
            dtype=str(data["dtype"]),
            windows=tuple(int(w) for w in windows) if isinstance(windows, list) else None,
        )

    @classmethod
    def from_torch_dtype(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        windows: Sequence[int] | None = None,
    ) -> KVLayout:
        names = {v: k for k, v in _DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"unsupported KV dtype {dtype}; supported: {sorted(_DTYPES)}")
        return cls(num_layers, num_kv_heads, head_dim, names[dtype], tuple(windows) if windows is not None else None)


@runtime_checkable
class KVSource(Protocol):
    """KV of a token sequence in some engine's memory, readable chunk by chunk."""

    @property
    def num_tokens(self) -> int:
        """How many leading tokens of the sequence have KV here."""
        ...

    def gather(self, start: int, end: int) -> torch.Tensor:
        """A new contiguous [L, 2, H, end-start, D] tensor with the KV of tokens [start, end).

        The result is owned by the caller and shares no memory with the engine.
        """
        ...


def check_range(start: int, end: int, num_tokens: int) -> None:
    """The bounds a :meth:`KVSource.gather` call must respect: 0 <= start < end <= num_tokens."""
    if not 0 <= start < end <= num_tokens:
        raise ValueError(f"token range [{start}, {end}) outside [0, {num_tokens})")


class LayerKV:
    """A :class:`KVSource` over per-layer K and V tensors of shape [H, N, D].

    This is the shape of a Hugging Face cache layer with the batch dim removed.
    The tensors are read, never modified.
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], layout: KVLayout) -> None:
        if len(keys) != layout.num_layers or len(values) != layout.num_layers:
            raise ValueError(f"expected {layout.num_layers} layers of K and V, got {len(keys)} and {len(values)}")
        lengths = {t.shape[1] for t in (*keys, *values)}
        if len(lengths) != 1:
            raise ValueError(f"K/V tensors disagree on token count: {sorted(lengths)}")
        expected = (layout.num_kv_heads, layout.head_dim)
        for t in (*keys, *values):
            if t.dim() != 3 or (t.shape[0], t.shape[2]) != expected:
                raise ValueError(
                    f"K/V tensor of shape {tuple(t.shape)} does not match [H={expected[0]}, N, D={expected[1]}]"
                )
        self._keys = keys
        self._values = values
        self._layout = layout
        self._num_tokens = lengths.pop()

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def gather(self, start: int, end: int) -> torch.Tensor:
        check_range(start, end, self._num_tokens)
        out = torch.empty(self._layout.chunk_shape(end - start), dtype=self._layout.torch_dtype)
        for layer, (k, v) in enumerate(zip(self._keys, self._values, strict=True)):
            out[layer, 0].copy_(k[:, start:end])  # [H, T, D]
            out[layer, 1].copy_(v[:, start:end])
        return out


class TensorKV:
    """A :class:`KVSource` over one [L, 2, H, N, D] tensor (kvtier's own layout)."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout) -> None:
        if kv.dim() != 5 or tuple(kv.shape[:3]) != layout.chunk_shape(0)[:3] or kv.shape[4] != layout.head_dim:
            raise ValueError(f"KV tensor of shape {tuple(kv.shape)} does not match layout [L, 2, H, N, D] of {layout}")
        self._kv = kv
        self._layout = layout

    @property
    def num_tokens(self) -> int:
        return self._kv.shape[3]

    def gather(self, start: int, end: int) -> torch.Tensor:
        check_range(start, end, self.num_tokens)
        return self._kv[:, :, :, start:end].to(self._layout.torch_dtype, copy=True).contiguous()


#: Receives one piece of a retrieved prefix: KV of token positions [start, end) as an [L, 2, H, end-start, D]
#: view that is valid only during the call (copy it out before returning). Returns False to stop the retrieve
#: there (e.g. the caller gave up on it): nothing after that piece is delivered.
KVSink = Callable[[int, int, torch.Tensor], bool]


def assemble_layers(
    chunks: Sequence[torch.Tensor],
    layout: KVLayout,
    num_tokens: int,
    out: torch.Tensor | None = None,
    *,
    skip: int = 0,
) -> list[torch.Tensor]:
    """Concatenate chunk payloads [L, 2, H, T_i, D] into per-layer [2, H, num_tokens, D] tensors.

    The first ``skip`` tokens of the first chunk are left out; ``num_tokens``
    (counted after them) may cut the last chunk short. With ``out`` (a caller-owned
    [L, 2, H, >=num_tokens, D] tensor, e.g. an engine's preallocated KV memory)
    each chunk is copied there with one strided copy and the result are the
    per-layer views ``out[l, :, :, :num_tokens]``; nothing is allocated.
    Otherwise each layer is a new tensor (one ``cat`` per layer: per-layer
    allocations are small enough for the allocator to recycle warm pages).
    """
    if out is not None:
        expected = layout.chunk_shape(num_tokens)
        if (
            out.dim() != 5
            or out.dtype != layout.torch_dtype
            or tuple(out.shape[:3]) != expected[:3]
            or out.shape[4] != expected[4]
            or out.shape[3] < num_tokens
        ):
            raise ValueError(f"out {tuple(out.shape)} {out.dtype} cannot hold {expected} of {layout.dtype}")
    if chunks and not 0 <= skip < chunks[0].shape[3]:
        raise ValueError(f"skip {skip} outside the first chunk's {chunks[0].shape[3]} tokens")
    pieces: list[torch.Tensor] = []
    remaining = num_tokens
    for i, chunk in enumerate(chunks):
        lo = skip if i == 0 else 0
        take = min(remaining, chunk.shape[3] - lo)
        pieces.append(chunk if lo == 0 and take == chunk.shape[3] else chunk[:, :, :, lo : lo + take])
        remaining -= take
        if remaining == 0:
            break
    if remaining:
        raise ValueError(f"chunks hold {num_tokens - remaining} tokens, {num_tokens} requested")
    if out is None:
        return [torch.cat([p[layer] for p in pieces], dim=2) for layer in range(layout.num_layers)]
    offset = 0
    for piece in pieces:
        out[:, :, :, offset : offset + piece.shape[3]].copy_(piece)
        offset += piece.shape[3]
    return [out[layer, :, :, :num_tokens] for layer in range(layout.num_layers)]
