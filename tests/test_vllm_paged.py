"""The vLLM adapter without a vLLM engine: the paged layout (probing, block reads, slot maps, PagedKV) and the
connector's scheduler and worker sides driven with stand-ins for vLLM's request and scheduler output."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from kvtier.adapters.vllm.paged import CANDIDATES, PagedKV, probe_layout
from kvtier.config import load_config
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
    paged.write_tokens(layers, [kv[0], kv[1]], paged.slots(block_ids, 0, 48))
    got = paged.read(layers, block_ids, start, end)
    assert got.shape == (2, 2, H, end - start, D)
    assert torch.equal(got, kv[:, :, :, start:end])
    assert got.is_contiguous() and got.data_ptr() != layers[0].data_ptr()


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
    paged.write_tokens(layers, [kv[0], kv[1]], paged.slots([2, 5], 0, 20))
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
    paged.write_tokens(layers, [kv[0], kv[1]], paged.slots([3, 0, 5], 0, 40))
    engine = CacheEngine(
        Namespace("fp", layout), TierStack([MemoryBackend(1 << 24)], write_queue_bytes=1 << 20), chunk_size=32
    )
    tokens = list(range(100, 140))
    with engine:
        assert engine.store(tokens, PagedKV(paged, layers, [3, 0, 5], 40)).stored_chunks == 2  # 32 + partial 8
        hit = engine.retrieve(tokens)
        assert hit.num_tokens == 40
        assert all(torch.equal(hit.layers[i], kv[i]) for i in range(2))


# -- the connector's two sides, without an engine --------------------------------------------------------------


class FakeRequest:
    """The attributes of a vLLM ``Request`` that ``compat.RequestView`` reads."""

    def __init__(self, req_id: str, tokens: list[int], cache_salt: str | None = None) -> None:
        self.request_id = req_id
        self.all_token_ids = list(tokens)
        self.cache_salt = cache_salt
        self.num_prompt_tokens = len(tokens)
        self.num_computed_tokens = 0
        self.lora_request = None
        self.mm_features = []
        self.prompt_embeds = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def scheduler_output(new: list[tuple[str, int, list[int]]], scheduled: dict[str, int]) -> SimpleNamespace:
    """A ``SchedulerOutput`` with new requests only: (req_id, num_computed_tokens, block_ids)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c, block_ids=(b,)) for r, c, b in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set()
        ),
        num_scheduled_tokens=scheduled,
    )


def _logging_state() -> list:
    return [(lg.level, list(lg.handlers), lg.propagate) for lg in (logging.root, logging.getLogger("kvtier"))]


@pytest.fixture
def sides(tmp_path):
    """(scheduler side, worker side) over one cache dir, the worker's blocks written by a reference kernel."""
    pytest.importorskip("vllm", reason="the step metadata subclasses vLLM's KVConnectorMetadata")
    before = _logging_state()
    import kvtier.adapters.vllm.connector  # noqa: F401  (the facade vLLM loads)
    from kvtier.adapters.vllm.scheduler import SchedulerSide
    from kvtier.adapters.vllm.settings import ConnectorSettings
    from kvtier.adapters.vllm.worker import WorkerSide

    config = load_config(env={}, overrides={"cache_dir": str(tmp_path), "chunk_size": 32, "l1.max_bytes": "16MB"})
    settings = ConnectorSettings(config, Namespace("fp", KVLayout(2, H, D)), BS, None)
    worker = WorkerSide(settings)
    scheduler = SchedulerSide(settings)
    assert _logging_state() == before  # no global logging changes: kvtier serve / the embedder configures logging
    worker.layers = [layer_for("cpu-k-transposed") for _ in range(2)]
    worker.paged = probe_layout(worker.layers[0], H, D, BS, writer("cpu-k-transposed"))
    yield scheduler, worker
    scheduler.close()
    worker.close()
    assert _logging_state() == before


def test_store_in_one_request_then_load_in_another(sides):
    from kvtier.adapters.vllm.compat import RequestView, scheduled_requests

    scheduler, worker = sides
    tokens = list(range(500, 540))  # one full 32-token chunk and an 8-token tail
    kv = torch.randn(2, 2, H, 40, D)
    worker.paged.write_tokens(worker.layers, [kv[0], kv[1]], worker.paged.slots([4, 1, 3], 0, 40))

    a = FakeRequest("a", tokens)
    assert scheduler.matched(RequestView(a), 0) == 0
    scheduler.after_alloc(RequestView(a), 0)
    meta = scheduler.build_meta(list(scheduled_requests(scheduler_output([("a", 0, [4, 1, 3])], {"a": 40}))))
    assert meta.loads == [] and [(op.req_id, len(op.tokens), op.final) for op in meta.stores] == [("a", 32, False)]
    for op in meta.stores:
        worker.store(op)
    a.num_computed_tokens = 40
    assert scheduler.finished(RequestView(a), [4, 1, 3])  # the trailing 8 tokens: blocks held one more step
    meta = scheduler.build_meta([])
    assert [(len(op.tokens), op.final) for op in meta.stores] == [(40, True)]
    worker.store(meta.stores[0])
    assert worker.take_finished() == {"a"} and worker.stats.stored_chunks == 2
    assert worker.base.flush(10)

    b = FakeRequest("b", [*tokens, 7])  # the scheduler sees the worker's disk writes
    assert scheduler.matched(RequestView(b), 0) == 40
    scheduler.after_alloc(RequestView(b), 40)
    meta = scheduler.build_meta(list(scheduled_requests(scheduler_output([("b", 40, [2, 5, 0])], {"b": 1}))))
    (load,) = meta.loads
    assert (load.start, load.end, load.block_ids) == (0, 40, [2, 5, 0])
    worker.start_loads(meta.loads)
    assert worker.take_load_errors() == set()
    assert torch.equal(worker.paged.read(worker.layers, [2, 5, 0], 0, 40), kv)


def test_a_failed_load_reports_its_blocks_and_skips_the_store(sides):
    from kvtier.adapters.vllm.metadata import LoadOp, StoreOp

    _, worker = sides
    tokens = list(range(40))
    worker.start_loads([LoadOp("c", tokens, 16, 40, [3, 1, 2], "nobody stored this")])
    worker.store(StoreOp("c", tokens[:32], [3, 1, 2], "nobody stored this"))
    assert worker.take_load_errors() == {1, 2}  # the blocks of [16, 40); block 3 was vLLM's own
    assert worker.stats.failed_loads == 1 and worker.stats.stored_chunks == 0
    assert worker.base.metrics.load_failures._value.get() == 1
