"""The connector's scheduler and worker sides without a vLLM engine, driven with stand-ins for vLLM's request and
scheduler output: asynchronous and synchronous loads, deadlines, failed loads, stores of finished requests."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from test_vllm_paged import BS, D, H, kernel_write, layer_for, writer

from kvtier.adapters.vllm.paged import probe_layout
from kvtier.config import load_config
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

pytest.importorskip("vllm", reason="the step metadata subclasses vLLM's KVConnectorMetadata")


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
def make_sides(tmp_path):
    """make(**overrides) -> (scheduler side, worker side) over one cache dir, blocks written by a reference kernel."""
    before = _logging_state()
    import kvtier.adapters.vllm.connector  # noqa: F401  (the facade vLLM loads)
    from kvtier.adapters.vllm.scheduler import SchedulerSide
    from kvtier.adapters.vllm.settings import ConnectorSettings
    from kvtier.adapters.vllm.worker import WorkerSide

    made = []

    def make(**overrides):
        config = load_config(
            env={},
            overrides={"cache_dir": str(tmp_path), "chunk_size": 32, "l1.max_bytes": "16MB", **overrides},
        )
        settings = ConnectorSettings(config, Namespace("fp", KVLayout(2, H, D)), BS, None)
        worker = WorkerSide(settings)
        scheduler = SchedulerSide(settings)
        assert _logging_state() == before  # no global logging changes: kvtier serve / the embedder does that
        worker.layers = [layer_for("cpu-k-transposed", num_blocks=8) for _ in range(2)]
        worker.paged = probe_layout(worker.layers[0], H, D, BS, writer("cpu-k-transposed"))
        made.append((scheduler, worker))
        return scheduler, worker

    yield make
    for scheduler, worker in made:
        scheduler.close()
        worker.close()
    assert _logging_state() == before


def wait_finished(worker, timeout: float = 10.0) -> tuple[set[str], set[str]]:
    """Poll take_finished as vLLM does each step until something is reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored, loaded = worker.take_finished()
        if stored or loaded:
            return stored, loaded
        time.sleep(0.002)
    raise AssertionError("nothing finished")


def store_request(scheduler, worker, req_id: str, tokens: list[int], kv: torch.Tensor, block_ids: list[int]) -> None:
    """Run one request through the scheduler and worker: computed, finished, stored from its held blocks."""
    from kvtier.adapters.vllm.compat import RequestView, scheduled_requests

    kernel_write(worker.paged, worker.layers, kv, block_ids)
    request = FakeRequest(req_id, tokens)
    assert scheduler.matched(RequestView(request), 0) == (0, False)
    scheduler.after_alloc(RequestView(request), block_ids, 0)
    meta = scheduler.build_meta(
        list(scheduled_requests(scheduler_output([(req_id, 0, block_ids)], {req_id: len(tokens)})))
    )
    assert meta.loads == [] and meta.stores == []  # nothing is copied while the request runs
    request.num_computed_tokens = len(tokens)
    assert scheduler.finished(RequestView(request), block_ids)  # blocks held until the worker copied them
    meta = scheduler.build_meta([])
    assert [(op.req_id, len(op.tokens), op.final) for op in meta.stores] == [(req_id, len(tokens), True)]
    worker.store(meta.stores[0])  # queued: returns before the copy
    assert wait_finished(worker) == ({req_id}, set())
    assert worker.flush(10)


def test_an_async_load_fills_the_blocks_while_the_step_goes_on(make_sides):
    from kvtier.adapters.vllm.compat import RequestView

    scheduler, worker = make_sides()
    tokens = list(range(500, 540))  # one full 32-token chunk and an 8-token tail
    kv = torch.randn(2, 2, H, 40, D)
    store_request(scheduler, worker, "a", tokens, kv, [4, 1, 3])
    assert worker.stats.stored_chunks == 2

    b = FakeRequest("b", [*tokens, 7])  # the scheduler sees the worker's disk writes
    assert scheduler.matched(RequestView(b), 0) == (40, True)
    scheduler.after_alloc(RequestView(b), [2, 5, 0], 40)
    meta = scheduler.build_meta([])  # b is not scheduled this step: it waits for its load
    (load,) = meta.loads
    assert (load.req_id, load.start, load.end, load.block_ids) == ("b", 0, 40, [2, 5, 0])
    worker.start_loads(meta.loads)
    stored, loaded = wait_finished(worker)
    assert (stored, loaded) == (set(), {"b"})
    assert worker.take_load_errors() == set()
    assert torch.equal(worker.paged.read(worker.layers, [2, 5, 0], 0, 40), kv)
    assert worker.metrics.load_seconds._sum.get() > 0


def test_the_same_prompt_again_hits_all_but_its_last_token(make_sides):
    """A finished request's prompt ends inside a chunk and its answer follows: the prompt's own partial chunk is
    stored too, so the same prompt sent again loads 39 of its 40 tokens (vLLM computes the last), not just the
    full chunk; the request with the answer still hits its own partial chunk."""
    from kvtier.adapters.vllm.compat import RequestView, scheduled_requests

    scheduler, worker = make_sides()
    prompt = list(range(600, 640))  # one full 32-token chunk, then 8 prompt tokens
    tokens = [*prompt, 1, 2, 3, 4, 5]  # and 5 generated ones (the last has no KV yet)
    kv = torch.randn(2, 2, H, 44, D)
    kernel_write(worker.paged, worker.layers, kv, [4, 1, 3])
    a = FakeRequest("a", tokens)
    a.num_prompt_tokens, a.num_computed_tokens = len(prompt), 44
    assert scheduler.matched(RequestView(a), 0) == (0, False)
    scheduler.after_alloc(RequestView(a), [4, 1, 3], 0)
    scheduler.build_meta(list(scheduled_requests(scheduler_output([("a", 0, [4, 1, 3])], {"a": 40}))))
    assert scheduler.finished(RequestView(a), [4, 1, 3])
    (op,) = scheduler.build_meta([]).stores
    assert (len(op.tokens), op.prompt_tokens) == (44, 40)
    worker.store(op)
    assert wait_finished(worker) == ({"a"}, set())
    assert worker.flush(10)
    assert worker.stats.stored_chunks == 3  # [0, 32), the prompt's [32, 40) and the answer's [32, 44)

    again = FakeRequest("b", prompt)
    assert scheduler.matched(RequestView(again), 0) == (39, True)
    scheduler.after_alloc(RequestView(again), [2, 5, 0], 39)
    (load,) = scheduler.build_meta([]).loads
    assert (len(load.tokens), load.start, load.end) == (40, 0, 39)  # the chunk's key needs all 40 tokens
    worker.start_loads([load])
    assert wait_finished(worker) == (set(), {"b"})
    assert worker.take_load_errors() == set()
    assert torch.equal(worker.paged.read(worker.layers, [2, 5, 0], 0, 39), kv[:, :, :, :39])
    assert not torch.equal(worker.paged.read(worker.layers, [2, 5, 0], 39, 40), kv[:, :, :, 39:40])  # not written

    follow_up = FakeRequest("c", [*tokens[:44], 9, 9])  # the chat goes on: the answer's chunk serves 44 tokens
    assert scheduler.matched(RequestView(follow_up), 0) == (44, True)


def test_blocks_are_released_once_copied_and_reusing_them_does_not_touch_the_store(make_sides):
    """The store thread reports the request (vLLM frees its blocks) as soon as it has copied them, before the
    chunks are built and written: vLLM writing other KV into those blocks right then changes nothing stored."""
    from kvtier.adapters.vllm.compat import RequestView
    from kvtier.adapters.vllm.metadata import StoreOp

    scheduler, worker = make_sides()
    tokens = list(range(700, 790))  # two full chunks and a 26-token tail: 6 blocks of 16
    kv = torch.randn(2, 2, H, 90, D)
    blocks = [4, 1, 3, 6, 2, 7]
    kernel_write(worker.paged, worker.layers, kv, blocks)
    release = threading.Event()
    real_put = worker.base.tiers.put_chunks

    def put_after_reuse(chunks):  # the tiers are written only after the blocks were handed back and reused
        assert release.wait(10)
        return real_put(chunks)

    worker.base.tiers.put_chunks = put_after_reuse
    worker.store(StoreOp("a", tokens, blocks, None, True, len(tokens)))
    assert wait_finished(worker) == ({"a"}, set())  # released while the tier write waits
    for layer in worker.layers:
        layer.fill_(-1.0)  # vLLM reuses the blocks for another request
    release.set()
    assert worker.flush(10)
    worker.base.tiers.put_chunks = real_put
    b = FakeRequest("b", [*tokens, 5])
    assert scheduler.matched(RequestView(b), 0) == (90, True)
    scheduler.after_alloc(RequestView(b), [5, 0, 1, 2, 3, 4], 90)
    worker.start_loads(scheduler.build_meta([]).loads)
    assert wait_finished(worker) == (set(), {"b"})
    assert torch.equal(worker.paged.read(worker.layers, [5, 0, 1, 2, 3, 4], 0, 90), kv)


def _stored_then_cleared(scheduler, worker, tokens, kv, blocks):
    """Store ``tokens`` from ``blocks``, zero the blocks, and return the LoadOp that brings them back."""
    from kvtier.adapters.vllm.compat import RequestView

    store_request(scheduler, worker, "a", tokens, kv, blocks)
    for layer in worker.layers:
        layer.zero_()
    b = FakeRequest("b", [*tokens, 7])
    assert scheduler.matched(RequestView(b), 0) == (len(tokens), True)
    scheduler.after_alloc(RequestView(b), blocks, len(tokens))
    (load,) = scheduler.build_meta([]).loads
    return load


def test_a_load_runs_its_chunk_aligned_parts_at_once(make_sides):
    """load_parts = 3 over four chunks: three retrieves of whole chunks, all in flight together, fill every block."""
    scheduler, worker = make_sides(**{"vllm.load_parts": 3, "vllm.load_threads": 3})
    tokens = list(range(2000, 2128))  # four 32-token chunks, blocks of 16
    kv = torch.randn(2, 2, H, 128, D)
    load = _stored_then_cleared(scheduler, worker, tokens, kv, list(range(8)))
    engine = worker.engines.get(None)
    real_retrieve = engine.retrieve
    together = threading.Barrier(3, timeout=5)  # a part that ran alone would break it: its load would fail
    ranges = []

    def parallel_retrieve(*args, start, max_tokens, **kwargs):
        ranges.append((start, max_tokens))
        together.wait()
        return real_retrieve(*args, start=start, max_tokens=max_tokens, **kwargs)

    engine.retrieve = parallel_retrieve
    worker.start_loads([load])
    assert wait_finished(worker) == (set(), {"b"})
    assert sorted(ranges) == [(0, 32), (32, 64), (64, 128)]
    assert worker.take_load_errors() == set()
    assert worker.stats.loaded_tokens == 128 and worker.stats.failed_loads == 0
    assert torch.equal(worker.paged.read(worker.layers, list(range(8)), 0, 128), kv)


def test_a_failed_first_part_fails_the_whole_load_whatever_the_later_parts_wrote(make_sides):
    """The blocks hold only a gap-free prefix: [0, 64) failed, so [64, 128), though written, is reported too."""
    scheduler, worker = make_sides(**{"vllm.load_parts": 2})
    tokens = list(range(3000, 3128))
    kv = torch.randn(2, 2, H, 128, D)
    load = _stored_then_cleared(scheduler, worker, tokens, kv, list(range(8)))
    engine = worker.engines.get(None)
    real_retrieve = engine.retrieve

    def first_part_fails(*args, start, **kwargs):
        if start == 0:
            raise OSError("tier read failed")
        return real_retrieve(*args, start=start, **kwargs)

    engine.retrieve = first_part_fails
    worker.start_loads([load])
    assert wait_finished(worker) == (set(), {"b"})
    assert worker.take_load_errors() == set(range(8))
    assert worker.stats.loaded_tokens == 0 and worker.stats.failed_loads == 1
    assert torch.equal(worker.paged.read(worker.layers, list(range(8)), 64, 128), kv[:, :, :, 64:])  # written, unused


def test_loads_split_into_whole_chunks(make_sides):
    _, worker = make_sides(**{"vllm.load_parts": 2})
    assert worker._split(0, 128) == [(0, 64), (64, 128)]
    assert worker._split(16, 100) == [(16, 64), (64, 100)]  # vLLM held [0, 16); the last chunk is partial
    assert worker._split(0, 20) == [(0, 20)]  # one chunk: one part
    _, worker = make_sides(**{"vllm.load_parts": 4})
    assert worker._split(32, 128) == [(32, 64), (64, 96), (96, 128)]  # no more parts than chunks


def test_sync_loads_run_before_the_forward(make_sides):
    from kvtier.adapters.vllm.compat import RequestView, scheduled_requests

    scheduler, worker = make_sides(**{"vllm.async_loads": False})
    tokens = list(range(40))
    kv = torch.randn(2, 2, H, 40, D)
    store_request(scheduler, worker, "a", tokens, kv, [4, 1, 3])
    b = FakeRequest("b", [*tokens, 7])
    assert scheduler.matched(RequestView(b), 16) == (24, False)  # vLLM itself holds the first block
    scheduler.after_alloc(RequestView(b), [6, 5, 0], 24)
    meta = scheduler.build_meta(list(scheduled_requests(scheduler_output([("b", 40, [6, 5, 0])], {"b": 1}))))
    (load,) = meta.loads
    assert (load.start, load.end) == (16, 40)
    worker.start_loads(meta.loads)  # done when it returns
    assert worker.take_load_errors() == set()
    assert torch.equal(worker.paged.read(worker.layers, [6, 5, 0], 16, 40), kv[:, :, :, 16:])


def test_a_failed_load_reports_exactly_the_unfilled_blocks(make_sides):
    from kvtier.adapters.vllm.metadata import LoadOp

    _, worker = make_sides()
    tokens = list(range(40))
    worker.start_loads([LoadOp("c", tokens, 16, 40, [3, 1, 2], "nobody stored this")])
    assert wait_finished(worker) == (set(), {"c"})
    assert worker.take_load_errors() == {1, 2}  # the blocks of [16, 40); block 3 was vLLM's own
    assert worker.stats.failed_loads == 1
    assert worker.base.metrics.load_failures._value.get() == 1


def test_a_load_past_its_deadline_is_cut_short_and_writes_nothing_after(make_sides):
    """The first chunk lands, the deadline passes during the second: [32, 96) is reported, and stays untouched."""
    from kvtier.adapters.vllm.compat import RequestView

    scheduler, worker = make_sides(**{"vllm.load_deadline_s": 0.3})
    tokens = list(range(1000, 1096))  # three full chunks
    kv = torch.randn(2, 2, H, 96, D)
    store_request(scheduler, worker, "a", tokens, kv, [0, 1, 2, 3, 4, 5])
    engine = worker.engines.get(None)
    real_retrieve = engine.retrieve
    release = threading.Event()

    def slow_retrieve(*args, sink, **kwargs):  # the real retrieve; the tier seems slow after the first chunk
        def slowed(start, end, piece):
            if start > 0:
                release.wait(5)
            return sink(start, end, piece)

        return real_retrieve(*args, sink=slowed, **kwargs)

    engine.retrieve = slow_retrieve
    for layer in worker.layers:
        layer.zero_()
    b = FakeRequest("b", [*tokens, 7])
    assert scheduler.matched(RequestView(b), 0) == (96, True)
    scheduler.after_alloc(RequestView(b), [6, 7, 0, 1, 2, 3], 96)
    meta = scheduler.build_meta([])
    worker.start_loads(meta.loads)
    time.sleep(0.1)
    assert worker.take_finished() == (set(), set())  # still loading, within its deadline
    assert wait_finished(worker)[1] == {"b"}
    assert worker.metrics.load_timeouts._value.get() == 1
    assert worker.take_load_errors() == {0, 1, 2, 3}  # blocks of [32, 96)
    release.set()
    worker.flush(10)
    assert torch.equal(worker.paged.read(worker.layers, [6, 7], 0, 32), kv[:, :, :, :32])
    untouched = worker.paged.read(worker.layers, [0, 1, 2, 3], 0, 64)
    assert torch.count_nonzero(untouched) == 0
    scheduler.loads_done({"b"}, {0, 1, 2, 3})
    assert not scheduler.loading
    # vLLM may ask again for a request whose load came back short (from 0 if the first block failed): no second try
    assert scheduler.matched(RequestView(b), 0) == (0, False)


def test_a_request_finished_while_loading_is_not_stored(make_sides):
    from kvtier.adapters.vllm.compat import RequestView

    scheduler, worker = make_sides()
    tokens = list(range(40))
    store_request(scheduler, worker, "a", tokens, torch.randn(2, 2, H, 40, D), [4, 1, 3])
    b = FakeRequest("b", [*tokens, 9, 9, 9])
    assert scheduler.matched(RequestView(b), 0) == (40, True)
    scheduler.after_alloc(RequestView(b), [2, 5, 0], 40)
    b.num_computed_tokens = 40
    assert not scheduler.finished(RequestView(b), [2, 5, 0])  # aborted mid-load: its blocks are not all filled
    scheduler.loads_done({"b"}, set())
    assert scheduler.build_meta([]).stores == [] and not scheduler.loading and not scheduler.failed


def test_a_full_store_queue_drops_the_store_and_releases_the_blocks(make_sides):
    from kvtier.adapters.vllm.metadata import StoreOp

    _, worker = make_sides(**{"vllm.store_queue_bytes": 1})
    worker._store_queue.put(None)  # stop the store thread: the next store stays queued
    worker._storer.join()
    kv = torch.randn(2, 2, H, 40, D)
    kernel_write(worker.paged, worker.layers, kv, [4, 1, 3])
    worker.store(StoreOp("a", list(range(40)), [4, 1, 3], None, True))  # an empty queue takes any one store
    worker.store(StoreOp("b", list(range(50, 90)), [4, 1, 3], None, True))  # no room: dropped, blocks released
    assert worker.take_finished() == ({"b"}, set())
    assert worker.metrics.dropped_stores._value.get() == 1
    worker._storer = threading.Thread(target=worker._store_loop, daemon=True)  # the fixture's close stops it
    worker._storer.start()
    assert wait_finished(worker) == ({"a"}, set())


def test_an_idle_step_waits_for_a_load_in_flight_instead_of_spinning(make_sides):
    from kvtier.adapters.vllm.compat import RequestView
    from kvtier.adapters.vllm.worker import IDLE_WAIT_S

    scheduler, worker = make_sides(**{"vllm.load_threads": 1})
    tokens = list(range(900, 940))
    kv = torch.randn(2, 2, H, 40, D)
    store_request(scheduler, worker, "a", tokens, kv, [4, 1, 3])
    b = FakeRequest("b", [*tokens, 7])
    assert scheduler.matched(RequestView(b), 0) == (40, True)
    scheduler.after_alloc(RequestView(b), [2, 5, 0], 40)
    gate = threading.Event()
    worker._loader.submit(gate.wait)  # the only load thread is busy: b's load queues behind it
    worker.start_loads(scheduler.build_meta([], idle=True).loads)

    t0 = time.perf_counter()
    assert worker.take_finished(idle=True) == (set(), set())  # nothing ended: it waited, then reported nothing
    assert time.perf_counter() - t0 >= 0.9 * IDLE_WAIT_S
    gate.set()
    reported: set[str] = set()
    for _ in range(500):  # each idle call returns as soon as the load ends (or after IDLE_WAIT_S)
        reported |= worker.take_finished(idle=True)[1]
        if reported:
            break
    assert reported == {"b"}
    assert torch.equal(worker.paged.read(worker.layers, [2, 5, 0], 0, 40), kv)


def test_quiet_waits_put_a_vllm_queue_reader_to_sleep_until_the_writer_notifies():
    """vLLM's reader spins (returns at once) after a recent read; quiet, the same wait sleeps until notified."""
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    from kvtier.adapters.vllm import compat

    assert compat.install_quiet_waits() and compat.install_quiet_waits()  # idempotent
    context = zmq.Context()
    address = get_open_zmq_ipc_path()
    writer = SpinCondition(is_reader=False, context=context, notify_address=address)
    reader = SpinCondition(is_reader=True, context=context, notify_address=address)
    try:
        reader.record_read()
        t0 = time.perf_counter()
        reader.wait(timeout_ms=300)
        assert time.perf_counter() - t0 < 0.1  # vLLM's busy loop: a sched_yield, then back to the shm check
        compat.quiet_waits(True)
        reader.record_read()
        t0 = time.perf_counter()
        reader.wait(timeout_ms=300)
        assert time.perf_counter() - t0 >= 0.25  # asleep on the notify socket, nothing came
        stop = threading.Event()

        def notify() -> None:
            while not stop.wait(0.02):
                writer.notify()

        pinger = threading.Thread(target=notify)
        pinger.start()
        reader.record_read()
        t0 = time.perf_counter()
        reader.wait(timeout_ms=5000)
        assert time.perf_counter() - t0 < 2  # the writer's notify wakes it
        stop.set()
        pinger.join()
    finally:
        compat.quiet_waits(False)
        for sock in (writer.local_notify_socket, reader.local_notify_socket):
            sock.close(linger=0)
        reader.write_cancel_socket.close(linger=0)
        reader.read_cancel_socket.close(linger=0)
        context.term()
