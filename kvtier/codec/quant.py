"""Helpers shared by the quantizing base stages (``fp8``, ``int8``, ``int4``), and the float16 sinks of int8/int4.

**Sinks** (int8 and int4). A few tokens per head (the first of a sequence,
mostly) draw much of the attention and have keys unlike every other token: one
of them stretches its key groups' range, and its own key and value errors are
weighted by its large attention. Per (layer, head) the 2 tokens whose keys lie
farthest from the chunk's per-channel mean (in channel standard deviations,
max over channels) are stored as float16 keys and values, left out of the key
groups' ranges, and put back on decode. The chunk needs no idea of its
position: a chunk without a sink spends them on its two most unusual tokens.
Their bytes are a stage's first three sections::

    sink_idx   u16  [L, H, S]          token index of each sink, ascending (S = min(2, T))
    sink_k     f16  [L, H, S, D]
    sink_v     f16  [L, H, S, D]
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvtier.codec.base import CodecError, Shape

SINKS = 2
FP16_MAX = 65504.0


def offsets(sizes: list[int]) -> list[int]:
    """Start offsets of consecutive sections of ``sizes`` bytes, then the total."""
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return out


def sections(data: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Views of flat uint8 ``data`` cut into consecutive sections of ``sizes`` bytes."""
    off = offsets(sizes)
    return [data[off[i] : off[i + 1]] for i in range(len(sizes))]


def nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: rows of zeros then quantize to 0, never 0/0."""
    return torch.where(scale == 0, 1.0, scale)


def groups(x: torch.Tensor, dim: int, group: int) -> list[torch.Tensor]:
    """Views of ``x`` cut along ``dim`` into groups of ``group`` (the last may be shorter).

    Full groups come as one view with ``dim`` unflattened to (n_groups, group),
    a shorter tail as a second view with a group axis of 1; the group index is
    at ``dim``, the position inside the group at ``dim + 1``.
    """
    size = x.shape[dim]
    full = size // group * group
    views = []
    if full:
        views.append(x.narrow(dim, 0, full).unflatten(dim, (full // group, group)))
    if full < size:
        views.append(x.narrow(dim, full, size - full).unsqueeze(dim))
    return views


def rounded(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """``x`` in ``dtype``, rounded towards ``direction`` (+inf: up, -inf: down) instead of to nearest."""
    h = x.to(dtype)
    wrong = (h.to(x.dtype) - x) * direction < 0
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def half(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` in float16, rounded towards ``direction`` (+inf: up, -inf: down) instead of to nearest."""
    return rounded(x, torch.float16, direction)


def check_range(name: str, x: torch.Tensor) -> None:
    """ValueError unless every value of ``x`` is finite and within float16 range (key mins and sinks are float16)."""
    low, high = torch.aminmax(x)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))) or max(-low, high) > FP16_MAX:
        raise ValueError(f"{name} cannot encode non-finite values nor values beyond float16 range")


def sink_sizes(shape: Shape) -> list[int]:
    """Bytes of the three sink sections (sink_idx, sink_k, sink_v) for ``shape``."""
    layers, _, heads, tokens, dim = shape
    lh, sinks = layers * heads, min(SINKS, tokens)
    return [2 * lh * sinks, 2 * lh * sinks * dim, 2 * lh * sinks * dim]


def encode_sinks(
    x: torch.Tensor, payload: torch.Tensor, k_group: int, section: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the sinks of float32 ``x`` [L, 2, H, T, D] (``payload`` or a copy of it), write sections 0-2.

    Returns the keys [L, H, T, D] with each sink replaced by an ordinary token of its key group (the first
    of the group's first three tokens that is no sink; a copy if ``x`` is the caller's ``payload``), so that
    the groups' ranges leave the sinks out, and the channels' mean square over the other tokens [L, H, 1, D].
    """
    layers, _, heads, tokens, dim = x.shape
    k, v = x[:, 0], x[:, 1]
    # the tokens whose keys lie farthest from the chunk's channel means, in channel std units (variance as
    # E[k^2] - mean^2: one pass, and precise enough to rank tokens)
    sinks = min(SINKS, tokens)
    mean = k.mean(2, keepdim=True)
    mean_square = torch.linalg.vector_norm(k, dim=2, keepdim=True).square_().div_(tokens)  # [L, H, 1, D]
    var = (mean_square - mean.square()).clamp_(min=0)
    std = torch.where(var > 0, var.sqrt(), torch.inf)  # a constant channel makes no token unusual
    unusual = (k - mean).abs_().div_(std).amax(-1)  # [L, H, T]
    idx = unusual.topk(sinks, dim=-1).indices.sort(-1).values  # [L, H, S]
    section[0].view(torch.uint16).copy_(idx.reshape(-1))
    at = idx.unsqueeze(-1).expand(-1, -1, -1, dim)
    sink_k = k.gather(2, at)  # [L, H, S, D]
    section[1].view(torch.float16).copy_(sink_k.reshape(-1))
    section[2].view(torch.float16).copy_(v.gather(2, at).reshape(-1))
    others = max(tokens - sinks, 1)
    mean_square.mul_(tokens).sub_(sink_k.square().sum(2, keepdim=True)).div_(others).clamp_(min=0)

    k_work = k if x is not payload else k.clone()
    is_sink = torch.zeros(layers, heads, tokens, dtype=torch.bool).scatter_(2, idx, True)
    first = idx // k_group * k_group  # [L, H, S]: start of each sink's group
    last = torch.clamp(first + k_group, max=tokens) - 1
    candidates = torch.minimum(first.unsqueeze(-1) + torch.arange(3), last.unsqueeze(-1))  # [L, H, S, 3]
    taken = is_sink.gather(2, candidates.flatten(2)).view(candidates.shape)
    pick = torch.argmin(taken.to(torch.uint8), dim=-1, keepdim=True)  # the first free one (0 if none)
    stand_in = torch.where(taken.all(-1), idx, candidates.gather(-1, pick).squeeze(-1))  # all sinks: keep
    k_work.scatter_(2, at, k.gather(2, stand_in.unsqueeze(-1).expand(-1, -1, -1, dim)))
    return k_work, mean_square


def sink_index(name: str, data: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The sink token indices [L, H, S] (int64) in section 0; CodecError if one is beyond the chunk."""
    layers, _, heads, tokens, _ = shape
    idx = data.view(torch.uint16).view(layers, heads, min(SINKS, tokens)).to(torch.int64)
    if bool((idx >= tokens).any()):
        raise CodecError(f"{name}: sink index beyond the chunk's {tokens} tokens")
    return idx


def put_sinks(out: torch.Tensor, idx: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor) -> None:
    """Write the float16 sink keys and values (sections 1 and 2) into ``out`` [L, 2, H, T, D] at ``idx``."""
    layers, heads, sinks = idx.shape
    dim = out.shape[-1]
    at = idx.unsqueeze(-1).expand(-1, -1, -1, dim)
    out[:, 0].scatter_(2, at, sink_k.view(torch.float16).view(layers, heads, sinks, dim).to(out.dtype))
    out[:, 1].scatter_(2, at, sink_v.view(torch.float16).view(layers, heads, sinks, dim).to(out.dtype))


class Sectioned:
    """Base of the quantizing stages: a body of consecutive sections whose sizes depend on the shape alone."""

    name: ClassVar[str]
    lossy: ClassVar[bool] = True

    def shuffle_size(self, dtype: torch.dtype) -> int:
        return 1  # codes and scales of mixed widths: no element size to shuffle by

    def _sections(self, shape: Shape) -> list[int]:
        raise NotImplementedError

    def encoded_size(self, shape: Shape, dtype: torch.dtype) -> int:
        return sum(self._sections(shape))


class SinkStage(Sectioned):
    """Base of int8 and int4: sections 0-2 hold the sinks, keys are grouped along T in groups of ``k_group``."""

    sinks: ClassVar[int] = SINKS
    k_group: ClassVar[int]

    def _begin_encode(
        self, payload: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(body to fill, its sections, payload in float32, keys without sinks, channel mean squares); sinks written.

        The keys and mean squares are :func:`encode_sinks`'s; ValueError for values beyond float16 range.
        """
        shape = tuple(payload.shape)
        out = torch.empty(self.encoded_size(shape, payload.dtype), dtype=torch.uint8)
        section = sections(out, self._sections(shape))
        x = payload.float()  # [L, 2, H, T, D]
        check_range(self.name, x)
        return out, section, x, *encode_sinks(x, payload, self.k_group, section)

    def _begin_decode(self, data: torch.Tensor, shape: Shape) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The sections of ``data`` and the sink indices [L, H, S] (CodecError if one is beyond the chunk)."""
        section = sections(data, self._sections(shape))
        return section, sink_index(self.name, section[0], shape)
