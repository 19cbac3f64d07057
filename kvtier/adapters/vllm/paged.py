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
read as garbage. Because the probe matches every element of two blocks, the
chosen view is exactly the kernel's mapping: loads write through it
(:meth:`PagedLayout.scatter`, a strided copy per layer, K/V and block, no
temporary) and stores read through it (:meth:`PagedLayout.read`).

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

    def copy_blocks(self, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> list[torch.Tensor]:
        """New layer tensors holding copies of ``block_ids`` (as blocks 0, 1, ...) in the engine's own packing.

        One contiguous gather per layer (no transposes): the fastest way to get a request's KV out of blocks the
        engine wants back; :class:`PagedKV` over the copies then reads them as it reads the engine's tensors.
        """
        index = torch.as_tensor(list(block_ids), dtype=torch.int64)
        dim = 1 if self.name == "flash-kv-first" else 0  # [2, num_blocks, ...]: the blocks are the second dim
        return [layer.index_select(dim, index) for layer in layers]

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """The slot of each token position in [start, end) given a request's block ids."""
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
        if end > len(block_ids) * self.block_size:
            raise ValueError(f"tokens up to {end} need {-(-end // self.block_size)} blocks, got {len(block_ids)}")
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _pieces(self, block_ids: Sequence[int], start: int, end: int) -> list[tuple[int, int, int, int]]:
        """(block id, offset in block, offset in [start, end), length) for each block [start, end) touches."""
        if not 0 <= start < end:
            raise ValueError(f"bad token range [{start}, {end})")
        bs = self.block_size
        if end > len(block_ids) * bs:
            raise ValueError(f"tokens up to {end} need {-(-end // bs)} blocks, got {len(block_ids)}")
        pieces = []
        pos = start
        while pos < end:
            b, off = divmod(pos, bs)
            take = min(bs - off, end - pos)
            pieces.append((block_ids[b], off, pos - start, take))
            pos += take
        return pieces

    def read(self, layers: Sequence[torch.Tensor], block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """A new [L, 2, H, end-start, D] tensor with the KV of token positions [start, end)."""
        pieces = self._pieces(block_ids, start, end)
        out = torch.empty(
            (len(layers), 2, self.num_kv_heads, end - start, self.head_dim), dtype=layers[0].dtype if layers else None
        )
        for li, layer in enumerate(layers):
            for kv, view in enumerate(self.kv_views(layer)):
                for block, off, at, n in pieces:
                    out[li, kv, :, at : at + n].copy_(view[block, :, off : off + n])
        return out

    def scatter(self, layers: Sequence[torch.Tensor], block_ids: Sequence[int], start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` ([L, 2, H, T, D]) as the KV of token positions [start, start+T) into the blocks.

        Copies straight into the blocks through the probed views, one strided
        copy per (layer, K/V, block): no temporary. The probe checked, element
        by element, that a view reads exactly what the engine's kernel wrote,
        so writing through it puts every value where the kernel would.
        """
        if kv.dim() != 5 or kv.shape[0] != len(layers) or kv.shape[1] != 2:
            raise ValueError(f"KV of shape {tuple(kv.shape)} is not [L={len(layers)}, 2, H, T, D]")
        pieces = self._pieces(block_ids, start, start + kv.shape[3])
        for li, layer in enumerate(layers):
            for half, view in enumerate(self.kv_views(layer)):
                src = kv[li, half]
                for block, off, at, n in pieces:
                    view[block, :, off : off + n].copy_(src[:, at : at + n])


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
