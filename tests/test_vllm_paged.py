"""The vLLM adapter's paged layout without a vLLM engine: probing, block reads and writes, slot maps, PagedKV."""

from __future__ import annotations

import pytest
import torch

from kvtier.adapters.vllm.paged import CANDIDATES, PagedKV, probe_layout
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

H, D, BS = 3, 8, 16


def writer(name: str):
    """A reference cache-write kernel for a known packing (what the engine's kernel does for it)."""
    view = CANDIDATES[name]

    def write(key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor, slots: torch.Tensor) -> None:
        k, v = view(layer, H, D)  # [nb, H, bs, D] strided views into layer
        blocks, offsets = slots // BS, slots % BS
        k[blocks, :, offsets] = key
        v[blocks, :, offsets] = value

    return write


def layer_for(name: str, num_blocks: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if name == "flash-kv-first":
        return torch.zeros(2, num_blocks, BS, H, D, dtype=dtype)
    if name == "flash-blocks-first":
        return torch.zeros(num_blocks, 2, BS, H, D, dtype=dtype)
    return torch.zeros(num_blocks, H, BS, 2 * D, dtype=dtype)  # vLLM CPU shape


def kernel_write(paged, layers, kv: torch.Tensor, block_ids, start: int = 0) -> None:
    """Write [L, 2, H, T, D] at positions [start, start+T) through the engine's own kernel (as vLLM's forward does)."""
    slots = paged.slots(block_ids, start, start + kv.shape[3])
    for layer, layer_kv in zip(layers, kv, strict=True):
        paged.write(layer_kv[0].transpose(0, 1), layer_kv[1].transpose(0, 1), layer, slots)


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_probe_finds_the_packing_a_kernel_writes(name, dtype):
    paged = probe_layout(layer_for(name, dtype=dtype), H, D, BS, writer(name))
    assert paged is not None and paged.name == name


def test_probe_refuses_an_unknown_packing():
    def scrambled(key, value, layer, slots):  # K and V interleaved per element: no candidate reads that
        flat = layer.view(layer.shape[0], -1)
        for i, s in enumerate(slots.tolist()):
            b, o = divmod(s, BS)
            pair = torch.stack([key[i], value[i]], dim=-1).reshape(-1)  # [H*D*2]
            flat[b, o * pair.numel() : (o + 1) * pair.numel()] = pair

    assert probe_layout(layer_for("cpu-k-transposed"), H, D, BS, scrambled) is None


@pytest.mark.parametrize("name", ["cpu-k-transposed", "flash-kv-first"])
@pytest.mark.parametrize(("start", "end"), [(0, 40), (5, 33), (16, 32), (31, 33)])
def test_write_then_read_any_token_range(name, start, end):
    layers = [layer_for(name) for _ in range(2)]
    paged = probe_layout(layers[0], H, D, BS, writer(name))
    block_ids = [4, 1, 3]  # a request's blocks, not in order
    kv = torch.randn(2, 2, H, 48, D)  # [L, 2, H, N, D]
    kernel_write(paged, layers, kv, block_ids)
    got = paged.read(layers, block_ids, start, end)
    assert got.shape == (2, 2, H, end - start, D)
    assert torch.equal(got, kv[:, :, :, start:end])
    assert got.is_contiguous() and got.data_ptr() != layers[0].data_ptr()


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize(("start", "end"), [(0, 48), (5, 33), (16, 32), (31, 33), (47, 48)])
def test_scatter_puts_every_value_where_the_kernel_does(name, start, end):
    paged = probe_layout(layer_for(name), H, D, BS, writer(name))
    kv = torch.randn(2, 2, H, end - start, D)
    by_kernel, by_scatter = ([layer_for(name) for _ in range(2)] for _ in range(2))
    kernel_write(paged, by_kernel, kv, [4, 1, 3], start)
    paged.scatter(by_scatter, [4, 1, 3], start, kv)
    assert all(torch.equal(a, b) for a, b in zip(by_kernel, by_scatter, strict=True))
    with pytest.raises(ValueError, match="blocks"):
        paged.scatter(by_scatter, [4, 1], start, torch.randn(2, 2, H, 48 - start, D))
    with pytest.raises(ValueError, match="not"):
        paged.scatter(by_scatter, [4, 1, 3], start, kv[0])


def test_slots_follow_the_block_table():
    paged = probe_layout(layer_for("cpu-k-transposed"), H, D, BS, writer("cpu-k-transposed"))
    slots = paged.slots([7, 2], 14, 18)
    assert slots.tolist() == [7 * BS + 14, 7 * BS + 15, 2 * BS + 0, 2 * BS + 1]
    with pytest.raises(ValueError, match="blocks"):
        paged.slots([7], 0, BS + 1)


def test_paged_kv_is_a_kv_source_with_bounds():
    layers = [layer_for("cpu-k-transposed") for _ in range(2)]
    paged = probe_layout(layers[0], H, D, BS, writer("cpu-k-transposed"))
    kv = torch.randn(2, 2, H, 20, D)
    kernel_write(paged, layers, kv, [2, 5])
    source = PagedKV(paged, layers, [2, 5], 20)
    assert source.num_tokens == 20
    assert torch.equal(source.gather(3, 19), kv[:, :, :, 3:19])
    with pytest.raises(ValueError):
        source.gather(0, 21)
    with pytest.raises(ValueError, match="do not fit"):
        PagedKV(paged, layers, [2], 20)


def test_cpu_engine_store_reads_blocks_exactly(tmp_path):
    """CacheEngine.store over PagedKV stores exactly the KV the blocks hold."""
    from kvtier.engine import CacheEngine
    from kvtier.storage import MemoryBackend, TierStack

    layout = KVLayout(2, H, D)
    layers = [layer_for("cpu-k-transposed") for _ in range(2)]
    paged = probe_layout(layers[0], H, D, BS, writer("cpu-k-transposed"))
    kv = torch.randn(2, 2, H, 40, D)
    kernel_write(paged, layers, kv, [3, 0, 5])
    engine = CacheEngine(
        Namespace("fp", layout), TierStack([MemoryBackend(1 << 24)], write_queue_bytes=1 << 20), chunk_size=32
    )
    tokens = list(range(100, 140))
    with engine:
        assert engine.store(tokens, PagedKV(paged, layers, [3, 0, 5], 40)).stored_chunks == 2  # 32 + partial 8
        hit = engine.retrieve(tokens)
        assert hit.num_tokens == 40
        assert all(torch.equal(hit.layers[i], kv[i]) for i in range(2))
