"""Conversions between vLLM's paged KV memory and kvtier's chunk layout.

kvtier's chunk payload is ``[L, 2, H, T, D]``. vLLM keeps KV in fixed-size
blocks, one tensor per attention layer, and a request's token ``p`` lives at
slot ``block_ids[p // block_size] * block_size + p % block_size``.

How a block is laid out inside that tensor depends on the build:

* **CPU** (``CPU_ATTN``, this module's tested case): each layer is
  ``[num_blocks, H, block_size, 2*D]``, but the attention kernels view it as
  ``[num_blocks, H, 2, block_size*D]``; with the ``vec``/``vec16`` ISAs K is
  stored *transposed* (``[D, block_size]`` per block and head) and V token
  major. Other ISAs (AMX, NEON) may pack K differently.
* **CUDA** FlashAttention/FlashInfer: ``[2, num_blocks, block_size, H, D]``
  or ``[num_blocks, 2, block_size, H, D]``, K and V token-major.

So the layout is never assumed: :func:`probe_layout` writes known values
through the engine's own cache-write kernel into a scratch block and picks the
candidate view (from :data:`CANDIDATES`) that reads them back exactly; an
unknown packing is refused (the connector then serves no hits) rather than
read as garbage. Writes always go through the engine's kernel (a
:data:`WriteFn`), so they are right for any ISA.

Nothing here imports vLLM: the kernel is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvtier.layout import KVLayout, check_range

# (key [T, H, D], value [T, H, D], layer cache tensor, slot_mapping [T] int64) -> None
WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# layer cache tensor -> (K view, V view), each [num_blocks, H, block_size, D] (strided views, no copy)
ViewFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def _cpu_k_transposed(t: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = t.shape[0]
    bs = t.numel() // (nb * heads * 2 * head_dim)
    halves = t.view(nb, heads, 2, bs * head_dim)
    return halves[:, :, 0].view(nb, heads, head_dim, bs).transpose(2, 3), halves[:, :, 1].view(nb, heads, bs, head_dim)


def _cpu_token_major(t: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = t.shape[0]
    bs = t.numel() // (nb * heads * 2 * head_dim)
    halves = t.view(nb, heads, 2, bs, head_dim)
    return halves[:, :, 0], halves[:, :, 1]


def _last_dim_halves(t: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = t.shape[0]
    bs = t.numel() // (nb * heads * 2 * head_dim)
    rows = t.view(nb, heads, bs, 2 * head_dim)
    return rows[..., :head_dim], rows[..., head_dim:]


def _flash_kv_first(t: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # [2, num_blocks, block_size, H, D] (FlashAttention): index 0 of dim 0 is K
    two, nb = t.shape[0], t.shape[1]
    if two != 2:
        raise ValueError("not a [2, num_blocks, ...] tensor")
    bs = t.numel() // (2 * nb * heads * head_dim)
    kv = t.view(2, nb, bs, heads, head_dim)
    return kv[0].transpose(1, 2), kv[1].transpose(1, 2)


def _flash_blocks_first(t: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # [num_blocks, 2, block_size, H, D] (FlashInfer)
    nb = t.shape[0]
    bs = t.numel() // (nb * 2 * heads * head_dim)
    kv = t.view(nb, 2, bs, heads, head_dim)
    return kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)


#: Known block packings, tried in order by :func:`probe_layout`. Each maps a
#: layer tensor to strided [num_blocks, H, block_size, D] views of K and V.
CANDIDATES: dict[str, ViewFn] = {
    "cpu-k-transposed": _cpu_k_transposed,
    "cpu-token-major": _cpu_token_major,
    "last-dim-halves": _last_dim_halves,
    "flash-kv-first": _flash_kv_first,
    "flash-blocks-first": _flash_blocks_first,
}


@dataclass(frozen=True)
class PagedLayout:
    """How one engine build packs KV into blocks: a verified view plus the engine's write kernel."""

    name: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    view: ViewFn
    write: WriteFn

    def kv_views(self, layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided [num_blocks, H, block_size, D] views of a layer tensor's K and V (no copy)."""
        return self.view(layer, self.num_kv_heads, self.head_dim)

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """The slot of each token position in [start, end) given a request's block ids."""
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
        if end > len(block_ids) * self.block_size:
            raise ValueError(f"tokens up to {end} need {-(-end // self.block_size)} blocks, got {len(block_ids)}")
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def read(self, layers: Sequence[torch.Tensor], block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """A new [L, 2, H, end-start, D] tensor with the KV of token positions [start, end)."""
        if not 0 <= start < end:
            raise ValueError(f"bad token range [{start}, {end})")
        first, last = start // self.block_size, -(-end // self.block_size)
        if last > len(block_ids):
            raise ValueError(f"tokens up to {end} need {last} blocks, got {len(block_ids)}")
        ids = torch.as_tensor(list(block_ids[first:last]), dtype=torch.int64)
        lo = start - first * self.block_size
        n = end - start
        sample = layers[0]
        out = torch.empty((len(layers), 2, self.num_kv_heads, n, self.head_dim), dtype=sample.dtype)
        for li, layer in enumerate(layers):
            for kv, view in enumerate(self.kv_views(layer)):
                blocks = view.index_select(0, ids)  # [b, H, bs, D]
                out[li, kv].copy_(blocks.transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, lo : lo + n])
        return out

    def write_tokens(self, layers: Sequence[torch.Tensor], kv: Sequence[torch.Tensor], slots: torch.Tensor) -> None:
        """Write per-layer KV ``kv[l]`` ([2, H, T, D]) at ``slots`` ([T]) through the engine's kernel."""
        for layer, layer_kv in zip(layers, kv, strict=True):
            self.write(layer_kv[0].transpose(0, 1), layer_kv[1].transpose(0, 1), layer, slots)


def probe_layout(
    sample: torch.Tensor, num_kv_heads: int, head_dim: int, block_size: int, write: WriteFn
) -> PagedLayout | None:
    """Find the candidate view that reads back what ``write`` stores, on a scratch copy shaped like ``sample``.

    Writes three rounds of small integers (exact in fp32, fp16 and bf16) that
    together number every K and V element of two blocks, and accepts a
    candidate only if it returns every number in place. Returns None when no
    candidate matches (an unknown packing).
    """
    kv_first = sample.dim() == 5 and sample.shape[0] == 2  # [2, num_blocks, ...] keeps the 2 in front
    shape = (2, 2, *sample.shape[2:]) if kv_first else (2, *sample.shape[1:])  # two blocks
    scratch = torch.zeros(shape, dtype=sample.dtype)
    n = 2 * block_size
    ids = torch.arange(2 * num_kv_heads * n * head_dim, dtype=torch.int64).view(2, n, num_kv_heads, head_dim)
    slots = torch.arange(n, dtype=torch.int64)
    digits = []
    for base in (1, 64, 4096):
        scratch.zero_()
        part = ((ids // base) % 64).to(sample.dtype)
        write(part[0], part[1], scratch, slots)
        digits.append(scratch.clone())
    for name, view in CANDIDATES.items():
        try:
            got = torch.zeros(2, 2, num_kv_heads, block_size, head_dim, dtype=torch.int64)
            for base, written in zip((1, 64, 4096), digits, strict=True):
                k, v = view(written, num_kv_heads, head_dim)
                if tuple(k.shape) != (2, num_kv_heads, block_size, head_dim) or k.shape != v.shape:
                    raise ValueError("shape")
                got += base * torch.stack([k, v]).to(torch.int64)
        except (RuntimeError, ValueError):
            continue
        # got [2(kv), 2(blocks), H, bs, D] -> ids [2(kv), n, H, D]
        expected = ids.view(2, 2, block_size, num_kv_heads, head_dim).transpose(2, 3)
        if torch.equal(got, expected):
            return PagedLayout(name, block_size, num_kv_heads, head_dim, view, write)
    return None


class PagedKV:
    """A :class:`~kvtier.layout.KVSource` over one request's tokens in vLLM's paged memory.

    ``gather`` copies out of the blocks, so the engine may reuse them as soon
    as ``CacheEngine.store`` returns.
    """

    def __init__(
        self, paged: PagedLayout, layers: Sequence[torch.Tensor], block_ids: Sequence[int], num_tokens: int
    ) -> None:
        if num_tokens > len(block_ids) * paged.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit {len(block_ids)} blocks of {paged.block_size}")
        self._paged = paged
        self._layers = layers
        self._block_ids = list(block_ids)
        self._num_tokens = num_tokens

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def gather(self, start: int, end: int) -> torch.Tensor:
        check_range(start, end, self._num_tokens)
        return self._paged.read(self._layers, self._block_ids, start, end)


def layout_matches(paged: PagedLayout, layout: KVLayout, sample: torch.Tensor) -> str | None:
    """Why ``sample`` (a registered layer tensor) cannot hold ``layout``'s KV, or None if it can."""
    if sample.dtype != layout.torch_dtype:
        return f"vLLM's KV dtype {sample.dtype} is not the layout's {layout.dtype}"
    if paged.num_kv_heads != layout.num_kv_heads or paged.head_dim != layout.head_dim:
        return f"vLLM's KV heads/head dim {paged.num_kv_heads}/{paged.head_dim} differ from the layout's"
    return None
