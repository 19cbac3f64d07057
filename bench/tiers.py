"""Throughput and latency of each storage tier on real SmolLM2-135M KV, and TTFT of a hit served from Redis.

    python bench/tiers.py --json bench/results/tiers.json [--chunk-tokens 64,256] [--chunks N] [--repeats R]

The KV is real: SmolLM2-135M (fp32, 30 layers x 3 kv heads x 64 head dim,
46,080 bytes = 45 KiB per token) runs once over real English text (the GPL-3 from
/usr/share/common-licenses, then CPython's LICENSE.txt), and its KV is cut into
chunks with ``kvtier.keys.chunk_spans`` / ``kvtier.chunk.Chunk`` exactly as the
engine cuts it. For every chunk size (``--chunk-tokens``) and every tier:

* ``put_gbps``    one batched ``backend.put(all chunks)`` into an empty tier,
                  payload bytes / s (median of ``--repeats``, the tier cleared
                  outside the timed region before each)
* ``get_gbps``    one batched ``backend.get(all keys)`` in prefix order (as
                  ``TierStack.get`` asks a tier), payload bytes / s
* ``get_p50_ms`` / ``get_p99_ms``  single-chunk ``backend.get([key])`` latency

Tiers: ``L1`` = MemoryBackend (holds chunks by reference: no copy, no
serialization, so its GB/s are bookkeeping, not memory bandwidth); ``L2`` =
DiskBackend in a temporary directory, reads with the files in the page cache
(``get_*``) and after ``posix_fadvise(DONTNEED)`` dropped them (``*_dropped``,
residency checked with mincore); ``L3`` = RedisBackend on a redis-server this
script starts on a free loopback port (persistence off, ``--maxmemory``
sized to the data, ``noeviction``) and stops at exit, even on error.

For L3 the same run times plain redis-py on values of exactly the encoded
chunks' bytes (stored under other keys with plain SET): a pipelined GET of all
of them in one batch (what ``RedisBackend.get`` sends, so this is
``raw_redis_get_gbps``) and a sequential GET loop (``raw_redis_get_seq_gbps``),
timed interleaved with the backend's batched get (L3, raw pipelined, raw
sequential, L3, ...) so a shared machine's drift hits all three alike.
``l3_over_raw`` is raw pipelined time / L3 time for the same chunks. The L3
rows also carry a ``profile`` of where a batched get spends its time: redis-py
fetch + parse vs the backend's decode (header JSON, checksum, payload copy),
Redis's time to first byte of the pipelined reply, the same GETs in <= 16 MB
sub-pipelines, a one-copy ``recv_into`` read path, and cProfile's top functions.
The Redis tier runs with ``l3.timeout_s`` = ``--l3-timeout`` (default 5 s, see
its help).

Finally ``l3_hit_speedup_4096``: an engine with L1 and L2 disabled and L3 at
that server (``chunk_size`` 256, ``store_partial=false``) stores prefix +
suffix A (the model's own KV of those tokens, via ``CacheEngine.store``); then
``CachedModel.generate`` of prefix + a different 50-token suffix B (the prefix
comes from Redis, B is prefilled, one token generated) vs a plain
``model.generate`` of prefix + B, median of 3 each.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import gc
import json
import os
import pstats
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent, _HERE.parent / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    CleanTimer,
    fix_threads,
    fmt_s,
    loadavg,
    machine_info,
    parse_ints,
    quiet,
    real_tokens,
    resident_fraction,
    unique_sorted,
)

MODEL = "smollm2-135m"
ROW_FIELDS = ("tier", "chunk_tokens", "get_gbps", "put_gbps", "get_p50_ms", "get_p99_ms")
GEN = {"max_new_tokens": 1, "do_sample": False}
TARGET_L3_OVER_RAW = 0.7
TARGET_HIT_SPEEDUP = 10.0
KEY_PREFIX = "kvtier-bench"
RAW_PREFIX = b"kvtier-bench-raw:"


def log(msg: str) -> None:
    print(f"[tiers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# -- the redis-server's CPU is ours, not another process's ----------------------------------------------------------

_SERVER_PIDS: list[int] = []
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_base_snapshot = common.cpu_snapshot


def _server_cpu_s() -> float:
    total = 0.0
    for pid in _SERVER_PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _snapshot_with_server() -> tuple[float, float, float, float]:
    wall, busy, steal, own = _base_snapshot()
    return wall, busy, steal, own + _server_cpu_s()


# CleanTimer (and wait_idle) look cpu_snapshot up in bench/common.py's namespace: count the redis-server this
# script started as this benchmark's own CPU, so a busy server during an L3 timing is not "another process".
common.cpu_snapshot = _snapshot_with_server


# -- redis-server lifecycle -------------------------------------------------------------------------------------------


class _Server:
    """A RedisServer from tests/redis_servers.py, stopped on exit, on error and on SIGTERM/SIGHUP/SIGINT."""

    def __init__(self, folder: Path, maxmemory: int) -> None:
        from redis_servers import RedisServer

        self.server = RedisServer(
            folder, None, "--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction", "--protected-mode", "yes"
        )
        self.maxmemory = maxmemory

    def __enter__(self) -> _Server:
        def on_signal(signum: int, _frame: object) -> None:
            raise SystemExit(128 + signum)  # unwinds through the finally/with blocks that stop the server

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
        atexit.register(self.stop)
        self.server.start()
        assert self.server.proc is not None
        _SERVER_PIDS.append(self.server.proc.pid)
        return self

    def stop(self) -> None:
        if self.server.proc is not None:
            pid = self.server.proc.pid
            self.server.stop()
            if pid in _SERVER_PIDS:
                _SERVER_PIDS.remove(pid)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=30, socket_connect_timeout=2)


# -- KV and chunks ----------------------------------------------------------------------------------------------------


def compute_kv(model, ids: list[int]):
    """The model's KV of ``ids`` (one forward pass) as a LayerKV source over [H, T, D] tensors."""
    from kvtier.adapters.hf import hf_layout
    from kvtier.layout import LayerKV

    with torch.inference_mode():
        cache = model(torch.tensor([ids], dtype=torch.long), use_cache=True).past_key_values
    keys = [layer.keys[0].clone() for layer in cache.layers]
    values = [layer.values[0].clone() for layer in cache.layers]
    return LayerKV(keys, values, hf_layout(model))


def make_chunks(namespace, tokens: np.ndarray, source, chunk_tokens: int, n_chunks: int):
    from kvtier.chunk import Chunk
    from kvtier.keys import chunk_spans

    spans = chunk_spans(namespace, tokens[: n_chunks * chunk_tokens], chunk_tokens)
    assert len(spans) == n_chunks, (len(spans), n_chunks)
    return [
        Chunk(
            s.key,
            s.parent,
            namespace.digest,
            namespace.layout,
            tokens[s.start : s.end].copy(),
            source.gather(s.start, s.end),
        )
        for s in spans
    ]


def _check_same(chunks, got) -> None:
    bad = [
        i
        for i, (c, g) in enumerate(zip(chunks, got, strict=True))
        if g is None or not torch.equal(c.payload, g.payload)
    ]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(chunks)} chunks came back missing or different (first: {bad[0]})")


# -- measurements ----------------------------------------------------------------------------------------------------


def _gc() -> None:
    gc.collect()


def latency_ms(
    timer: CleanTimer,
    label: str,
    get_one: Callable[[Any], object],
    keys: Sequence[Any],
    samples: int,
    before_round: Callable[[], object] | None = None,
) -> list[float]:
    """``samples`` single-key gets, cycling through ``keys`` (shuffled each round); ms each.

    ``before_round`` runs (untimed) before every pass over the keys (e.g. a page-cache drop, so each key
    is read once per drop). GC is off during the timed calls.
    """
    order: list[Any] = []
    rng = random.Random(0)
    pos = {"i": 0}

    def before() -> None:
        if pos["i"] % len(keys) == 0:
            order[:] = list(keys)
            rng.shuffle(order)
            if before_round is not None:
                gc.enable()
                before_round()
                gc.disable()

    def one() -> object:
        k = order[pos["i"] % len(keys)]
        pos["i"] += 1
        return get_one(k)

    gc.collect()
    gc.disable()
    try:
        _, times, _, _ = timer.timed(label, one, repeats=samples, warmup=0, before=before)
    finally:
        gc.enable()
    return [t * 1e3 for t in times]


def bench_backend(
    name: str,
    backend,
    chunks,
    args: argparse.Namespace,
    timer: CleanTimer,
    *,
    after_put: Callable[[], object] | None = None,
    get_refs: dict[str, tuple[Callable[[], object], object]] | None = None,
) -> dict[str, Any]:
    """put / get throughput and single-get latency of one started backend; leaves the chunks stored.

    ``get_refs`` (name -> (fn, expected result)) are timed interleaved with the backend's batched get
    (backend, ref1, ref2, backend, ...), so drift of a shared machine hits them alike.
    """
    ct = chunks[0].num_tokens
    payload = sum(c.payload.nbytes for c in chunks)
    keys = [c.key for c in chunks]
    R = args.repeats

    def clear() -> None:
        backend.clear()
        os.sync()  # L2: write back the previous put's pages now, not during the next timed put
        _gc()

    put_s, put_all, put_res, put_f = timer.timed(
        f"{name} c{ct} put", lambda: backend.put(chunks), repeats=R, before=clear
    )
    if not all(put_res):
        raise AssertionError(f"{name}: {len(put_res) - sum(put_res)} of {len(chunks)} puts refused")
    if after_put is not None:
        after_put()
    fns: dict[str, Callable[[], object]] = {name: lambda: backend.get(keys)}
    fns.update({ref: fn for ref, (fn, _) in (get_refs or {}).items()})
    names = list(fns)
    last: dict[str, object] = {}
    calls = {"n": 0}

    def before() -> None:  # untimed: free this function's previous result, collect garbage
        last[names[calls["n"] % len(names)]] = None
        _gc()

    def one() -> None:
        which = names[calls["n"] % len(names)]
        calls["n"] += 1
        last[which] = fns[which]()

    label = f"{name} c{ct} get" + (f" (interleaved with {', '.join(names[1:])})" if len(names) > 1 else "")
    _, times, _, get_f = timer.timed(label, one, repeats=R * len(names), warmup=len(names), before=before)
    per = {n: times[i :: len(names)] for i, n in enumerate(names)}
    _check_same(chunks, last.pop(name))
    for ref, (_, expected) in (get_refs or {}).items():
        if last.pop(ref) != expected:
            raise AssertionError(f"{ref} returned other data")
    last.clear()
    get_s, get_all = median(per[name]), per[name]
    lat = latency_ms(
        timer, f"{name} c{ct} get1", lambda k: backend.get([k]), keys, max(args.latency_samples, len(keys))
    )
    row = {
        "tier": name,
        "chunk_tokens": ct,
        "get_gbps": payload / get_s / 1e9,
        "put_gbps": payload / put_s / 1e9,
        "get_p50_ms": _pct(lat, 50),
        "get_p99_ms": _pct(lat, 99),
        "chunks": len(chunks),
        "payload_bytes": payload,
        "get_s": get_s,
        "put_s": put_s,
        "get_all_s": get_all,
        "put_all_s": put_all,
        "latency_samples": len(lat),
        "get_mean_ms": float(np.mean(lat)),
        "get_max_ms": float(np.max(lat)),
        "foreign_cores": {"put": put_f, "get": get_f},
    }
    if get_refs:
        row["ref_get_s"] = {ref: median(per[ref]) for ref in get_refs}
        row["ref_get_all_s"] = {ref: per[ref] for ref in get_refs}
    return row


def bench_l2_dropped(disk, chunks, args: argparse.Namespace, timer: CleanTimer) -> dict[str, Any]:
    """Batched and single gets of chunk files after the page cache dropped them."""
    ct = chunks[0].num_tokens
    payload = sum(c.payload.nbytes for c in chunks)
    keys = [c.key for c in chunks]
    residency: list[float | None] = []

    def drop() -> None:
        gc.collect()
        os.sync()  # dirty pages cannot be dropped: write them out first
        disk.drop_page_cache()
        residency.append(resident_fraction(disk.files()))

    get_s, get_all, got, get_f = timer.timed(
        f"L2 c{ct} get dropped", lambda: disk.get(keys), repeats=args.repeats, before=drop
    )
    _check_same(chunks, got)
    got = None
    lat = latency_ms(
        timer, f"L2 c{ct} get1 dropped", lambda k: disk.get([k]), keys, max(args.latency_samples, len(keys)), drop
    )
    return {
        "get_gbps_dropped": payload / get_s / 1e9,
        "get_p50_ms_dropped": _pct(lat, 50),
        "get_p99_ms_dropped": _pct(lat, 99),
        "get_s_dropped": get_s,
        "get_all_s_dropped": get_all,
        "page_cache_resident_after_drop_max": max((r for r in residency if r is not None), default=None),
        "foreign_cores_dropped": get_f,
    }


class RawRedis:
    """Plain redis-py on values of the encoded chunks' bytes, under keys of their own."""

    def __init__(self, server: _Server, values: list[bytes], ct: int) -> None:
        self.client = server.client()
        self.values = values
        self.keys = [RAW_PREFIX + f"{ct}:{i}".encode() for i in range(len(values))]
        self.nbytes = sum(len(v) for v in values)
        self.ct = ct

    def delete(self) -> None:
        self.client.delete(*self.keys)
        _gc()

    def put(self) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for k, v in zip(self.keys, self.values, strict=True):
            pipe.set(k, v)
        return pipe.execute()

    def get_pipelined(self) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for k in self.keys:
            pipe.get(k)
        return pipe.execute()

    def get_sequential(self) -> list[Any]:
        return [self.client.get(k) for k in self.keys]

    def bench_put(self, timer: CleanTimer, repeats: int) -> float:
        """Pipelined SET of all values (one batch) into an empty keyspace; leaves them stored. Median s."""
        put_s, _, res, _ = timer.timed(f"raw c{self.ct} set pipelined", self.put, repeats=repeats, before=self.delete)
        if not all(r is True for r in res):
            raise AssertionError("raw SET failed")
        return put_s

    def close(self) -> None:
        self.client.delete(*self.keys)
        self.client.close()


def profile_l3(backend, port: int, chunks, repeats: int) -> dict[str, Any]:
    """Where a batched RedisBackend.get spends its time (medians over ``repeats``), and cProfile's view."""
    from kvtier.chunk import decode_header, encode, payload_checksum

    keys = [c.key for c in chunks]
    rkeys = [backend.redis_key(k) for k in keys]
    client = backend._get_client()  # the backend's own connection pool (diagnostics only)

    def fetch() -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        for k in rkeys:
            pipe.get(k)
        try:
            return pipe.execute()
        finally:
            pipe.reset()

    parts: dict[str, list[float]] = {
        k: [] for k in ("total", "fetch", "decode", "header", "checksum", "copy", "copy_kept", "frombuffer")
    }
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        backend.get(keys)
        parts["total"].append(time.perf_counter() - t0)
        gc.collect()
        t0 = time.perf_counter()
        values = fetch()
        parts["fetch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = [backend._decode(k, v) for k, v in zip(keys, values, strict=True)]
        parts["decode"].append(time.perf_counter() - t0)
        assert all(c is not None for c in out)
        out = None
        h = c = cp = fb = 0.0
        for v in values:
            view = memoryview(v)
            t0 = time.perf_counter()
            header = decode_header(view)
            t1 = time.perf_counter()
            payload_checksum(view[header.offset :])
            t2 = time.perf_counter()
            buf = bytearray(view[header.offset :])
            t3 = time.perf_counter()
            torch.frombuffer(buf, dtype=torch.float32)
            t4 = time.perf_counter()
            h, c, cp, fb = h + t1 - t0, c + t2 - t1, cp + t3 - t2, fb + t4 - t3
            buf = None
        kept = []  # the same copies, all kept alive as RedisBackend.get keeps them: fresh memory, page faults
        t0 = time.perf_counter()
        for v in values:
            view = memoryview(v)
            kept.append(bytearray(view[decode_header(view).offset :]))
        parts["copy_kept"].append(time.perf_counter() - t0)
        kept = None
        parts["header"].append(h)
        parts["checksum"].append(c)
        parts["copy"].append(cp)
        parts["frombuffer"].append(fb)
        values = None
    # a one-copy read path for comparison: the same pipelined GETs on a plain socket, each value received
    # straight into its own bytearray (recv_into), decoded as views of it (no further copy)
    proto_s: list[float] = []
    ttfb_s: list[float] = []
    with _RespReader(port) as reader:
        for _ in range(repeats):
            gc.collect()
            t0 = time.perf_counter()
            bufs = reader.get_many(rkeys)
            out = [_decode_view(k, b) for k, b in zip(keys, bufs, strict=True)]
            proto_s.append(time.perf_counter() - t0)
            ttfb_s.append(reader.first_byte_s)
            _check_same(chunks, out)
            bufs = out = None
    parts["recv_into_prototype"] = proto_s
    parts["first_byte"] = ttfb_s
    # redis-py, the same GETs in several smaller pipelines (<= 16 MB of values each) on the backend's client
    sizes = [len(v) for v in fetch()]
    batches: list[list[bytes]] = [[]]
    acc = 0
    for k, n in zip(rkeys, sizes, strict=True):
        if batches[-1] and acc + n > 16 << 20:
            batches.append([])
            acc = 0
        batches[-1].append(k)
        acc += n
    sub_s: list[float] = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        got: list[bytes] = []
        for batch in batches:
            pipe = client.pipeline(transaction=False)
            for k in batch:
                pipe.get(k)
            got += pipe.execute()
        sub_s.append(time.perf_counter() - t0)
        got = None
    parts["subbatch_fetch"] = sub_s
    med = {k: median(v) for k, v in parts.items()}
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    backend.get(keys)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "ncalls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    # put side: what encode costs before the pipeline sends anything
    enc = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        [encode(c) for c in chunks]
        enc.append(time.perf_counter() - t0)
    total = med["total"]
    return {
        "get_total_s": total,
        "fetch_s": med["fetch"],
        "decode_s": med["decode"],
        "decode_parts_s": {
            "header_json": med["header"],
            "checksum": med["checksum"],
            "copy": med["copy"],
            "copy_all_kept_alive": med["copy_kept"],
            "frombuffer": med["frombuffer"],
        },
        "fetch_share": med["fetch"] / total,
        "decode_share": med["decode"] / total,
        "encode_s": median(enc),
        "recv_into_prototype_s": med["recv_into_prototype"],
        "pipeline_first_byte_s": med["first_byte"],
        "fetch_subbatch_16mb_s": med["subbatch_fetch"],
        "fetch_subbatch_16mb_batches": len(batches),
        "fetch_subbatch_16mb_gbps": sum(sizes) / med["subbatch_fetch"] / 1e9,
        "recv_into_prototype_gbps": sum(c.payload.nbytes for c in chunks) / med["recv_into_prototype"] / 1e9,
        "cprofile_top_tottime": rows[:15],
    }


class _RespReader:
    """Pipelined GETs over a plain socket, each bulk value received with recv_into into its own bytearray.

    A diagnostic, not a client: no errors beyond "unexpected reply", no reconnects. It shows what a read
    path with one copy (kernel -> the chunk's own memory) costs next to redis-py's (recv -> bytes ->
    BytesIO -> bytes, then RedisBackend's bytearray copy).
    """

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.scratch = bytearray(1 << 16)
        self.pending = bytearray()
        self.first_byte_s = 0.0

    def __enter__(self) -> _RespReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _fill(self) -> None:
        n = self.sock.recv_into(self.scratch)
        if not n:
            raise ConnectionError("redis closed the connection")
        self.pending += memoryview(self.scratch)[:n]

    def _line(self) -> bytes:
        while (i := self.pending.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.pending[:i])
        del self.pending[: i + 2]
        return line

    def get_many(self, keys: Sequence[bytes]) -> list[bytearray]:
        t0 = time.perf_counter()
        self.sock.sendall(b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys))
        out: list[bytearray] = []
        for i in range(len(keys)):
            line = self._line()
            if i == 0:
                self.first_byte_s = time.perf_counter() - t0  # Redis answers a pipeline after running all of it
            if line[:1] != b"$" or line == b"$-1":
                raise AssertionError(f"unexpected reply {line[:40]!r}")
            n = int(line[1:])
            buf = bytearray(n + 2)
            view = memoryview(buf)
            have = min(len(self.pending), n + 2)
            view[:have] = self.pending[:have]
            del self.pending[:have]
            while have < n + 2:
                got = self.sock.recv_into(view[have:])
                if not got:
                    raise ConnectionError("redis closed the connection")
                have += got
            del view
            del buf[n:]  # the trailing CRLF (shrinking in place keeps the buffer)
            out.append(buf)
        return out


def _decode_view(key, buf: bytearray):
    from kvtier.chunk import decode_header, decode_payload

    view = memoryview(buf)
    header = decode_header(view)
    if header.key != key or len(buf) != header.offset + header.payload_len:
        raise AssertionError("prototype read returned another value")
    return decode_payload(header, view[header.offset :])


# -- L3-only hit vs cold ----------------------------------------------------------------------------------------------


def bench_hit(
    model,
    tokenizer,
    namespace,
    all_ids: list[int],
    kv_source,
    server: _Server,
    args: argparse.Namespace,
    timer: CleanTimer,
) -> dict[str, Any]:
    from kvtier.adapters.hf import CachedModel
    from kvtier.config import load_config
    from kvtier.engine import CacheEngine

    P, S = args.prefix, args.suffix
    ids_a = all_ids[: P + S]
    ids_b = all_ids[:P] + all_ids[P + S : P + 2 * S]
    hit_ids = torch.tensor([ids_b], dtype=torch.long)
    hit_mask = torch.ones_like(hit_ids)
    config = load_config(
        overrides={
            "l1.enabled": False,
            "l2.enabled": False,
            "l3.enabled": True,
            "l3.url": server.url,
            "l3.key_prefix": f"{KEY_PREFIX}-ttft",
            "l3.timeout_s": args.l3_timeout,
            "store_partial": False,
        }
    )
    engine = CacheEngine.from_config(config, namespace).start()
    try:
        assert engine.tiers.names == ["redis"], engine.tiers.names
        stored = engine.store(ids_a, kv_source)  # the model's own KV of prefix + suffix A
        look = engine.lookup(ids_b, max_tokens=len(ids_b) - 1)
        if look.num_tokens != P or look.tier_tokens.get("redis") != P:
            raise AssertionError(
                f"after storing, lookup finds {look.num_tokens} tokens ({look.tiers}), expected {P} in redis"
            )
        cm = CachedModel(model, tokenizer, engine)
        R = args.ttft_repeats
        with torch.inference_mode():
            log(f"hit: CachedModel.generate of {P}+{S} tokens, prefix from L3 (warm-up + {R})")
            hit_s, hit_all, gen, hit_f = timer.timed(
                "hit_l3", lambda: cm.generate(hit_ids, **GEN), repeats=R, before=_gc
            )
            if gen.reused_tokens != P or gen.tier_tokens.get("redis") != P:
                raise AssertionError(f"hit reused {gen.reused_tokens} tokens ({gen.tiers}), expected {P} from redis")
            ttfts = []
            for _ in range(R):  # Generation.ttft_s of separate calls (the timed block keeps only the last)
                _gc()
                ttfts.append(cm.generate(hit_ids, **GEN).ttft_s)
            retr_s, _, res, _ = timer.timed(
                "retrieve_l3", lambda: engine.retrieve(ids_b, max_tokens=P), repeats=R, before=_gc
            )
            assert res.num_tokens == P
            res = None
            # cold: warm the model's code paths on a short prompt, then the full prefill
            model.generate(hit_ids[:, :32], attention_mask=hit_mask[:, :32], **GEN)
            cold_times, cold_f, first_cold = [], [], None
            for i in range(R):
                log(f"cold: model.generate of {P}+{S} tokens ({i + 1}/{R})")
                dt, out, f = timer.once(
                    f"cold#{i + 1}", lambda: model.generate(hit_ids, attention_mask=hit_mask, **GEN), _gc
                )
                cold_times.append(dt)
                cold_f.append(f)
                first_cold = int(out[0, -1])
        counters = engine.tiers.tiers[0].counters()
    finally:
        engine.close()
    cold_s = median(cold_times)
    return {
        "l3_hit_speedup_4096": cold_s / hit_s,
        "l3_hit_s": hit_s,
        "cold_s": cold_s,
        "hit": {
            "prefix_tokens": P,
            "suffix_tokens": S,
            "chunk_size": config.chunk_size,
            "stored_chunks": stored.stored_chunks,
            "reused_tokens": gen.reused_tokens,
            "tiers": gen.tiers,
            "hit_all_s": hit_all,
            "hit_ttft_s_median": median(ttfts),
            "hit_ttft_s_all": ttfts,
            "retrieve_l3_s": retr_s,
            "cold_all_s": cold_times,
            "first_token_hit": gen.new_tokens[0],
            "first_token_cold": first_cold,
            "same_first_token": gen.new_tokens[0] == first_cold,
            "redis_counters": counters,
            "foreign_cores": {"hit": hit_f, "cold_max": max((x for x in cold_f if x is not None), default=None)},
        },
    }


# -- reporting --------------------------------------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]], hit: dict[str, Any] | None) -> dict[str, Any]:
    def check(value: float | None, threshold: float) -> dict[str, Any]:
        return {"value": value, "op": ">=", "threshold": threshold, "pass": value is not None and value >= threshold}

    out: dict[str, Any] = {}
    for r in rows:
        if r["tier"] == "L3":
            out[f"l3_over_raw_c{r['chunk_tokens']}"] = check(r["l3_over_raw"], TARGET_L3_OVER_RAW) | {
                "l3_get_gbps": r["get_gbps"],
                "raw_redis_get_gbps": r["raw_redis_get_gbps"],
            }
    if hit is not None:
        out["l3_hit_speedup_4096"] = check(hit["l3_hit_speedup_4096"], TARGET_HIT_SPEEDUP)
    out["all_pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict))
    return out


def _f(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


def print_table(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=max(170, Console(file=sys.stdout).width))
    table = Table(
        title=f"kvtier tiers, real {MODEL} fp32 KV ({result['settings']['bytes_per_token'] // 1024} KiB/token)"
    )
    cols = [
        ("tier", "tier", str),
        ("chunk tok", "chunk_tokens", str),
        ("chunks", "chunks", str),
        ("MB", "payload_bytes", lambda v: f"{v / 1e6:.0f}"),
        ("put GB/s", "put_gbps", _f(".2f")),
        ("get GB/s", "get_gbps", _f(".2f")),
        ("get p50 ms", "get_p50_ms", _f(".3f")),
        ("get p99 ms", "get_p99_ms", _f(".3f")),
        ("cold get GB/s", "get_gbps_dropped", _f(".2f")),
        ("cold p50 ms", "get_p50_ms_dropped", _f(".3f")),
        ("cold p99 ms", "get_p99_ms_dropped", _f(".3f")),
        ("raw pipe GB/s", "raw_redis_get_gbps", _f(".2f")),
        ("raw seq GB/s", "raw_redis_get_seq_gbps", _f(".2f")),
        ("raw p50 ms", "raw_redis_get_p50_ms", _f(".3f")),
        ("L3/raw", "l3_over_raw", _f(".2f")),
    ]
    for title, _, _ in cols:
        table.add_column(title, justify="right")
    for r in rows:
        table.add_row(*(fmt(r.get(key)) if r.get(key) is not None else "-" for _, key, fmt in cols))
    console.print(table)
    console.print(
        "L1 holds chunks by reference (no copy): its GB/s measure bookkeeping. 'cold' = L2 after the page cache "
        "dropped the files (posix_fadvise DONTNEED). raw = plain redis-py on the same value bytes; raw pipe = one "
        "pipelined batch, as RedisBackend.get sends it."
    )
    for r in rows:
        p = r.get("profile")
        if p:
            d = p["decode_parts_s"]
            console.print(
                f"L3 c{r['chunk_tokens']} batched get {fmt_s(p['get_total_s'])}: fetch+parse (redis-py) "
                f"{fmt_s(p['fetch_s'])} ({100 * p['fetch_share']:.0f} %), decode {fmt_s(p['decode_s'])} "
                f"({100 * p['decode_share']:.0f} %: header {fmt_s(d['header_json'])}, checksum {fmt_s(d['checksum'])}, "
                f"copy {fmt_s(d['copy'])} into reused memory, {fmt_s(d['copy_all_kept_alive'])} into fresh memory "
                f"kept alive as get does); Redis's first byte after {fmt_s(p['pipeline_first_byte_s'])}; "
                f"<=16 MB sub-pipelines fetch {p['fetch_subbatch_16mb_gbps']:.2f} GB/s; one-copy recv_into read+decode "
                f"{p['recv_into_prototype_gbps']:.2f} GB/s"
            )
    hit = result.get("hit")
    if hit:
        console.print(
            f"L3-only hit at {hit['prefix_tokens']}+{hit['suffix_tokens']} tokens: {fmt_s(result['l3_hit_s'])} vs cold "
            f"{fmt_s(result['cold_s'])} = {result['l3_hit_speedup_4096']:.1f}x (retrieve from L3 alone "
            f"{fmt_s(hit['retrieve_l3_s'])}; same first token: {'yes' if hit['same_first_token'] else 'NO'})"
        )
    console.print("targets:")
    for name, t in result["targets"].items():
        if isinstance(t, dict):
            mark = "[green]PASS[/green]" if t["pass"] else "[red]FAIL[/red]"
            console.print(f"  {name} = {t['value']:.3f} (target {t['op']} {t['threshold']}): {mark}")


def _contention(timer: CleanTimer) -> dict[str, Any]:
    """The timer's summary with events grouped per block (single-get blocks have hundreds of calls)."""
    blocks: dict[str, dict[str, Any]] = {}
    for e in timer.events:
        label = str(e["label"]).split("#")[0]
        b = blocks.setdefault(label, {"calls": 0, "disturbed": False, "foreign_cores": e["foreign_cores"]})
        b["calls"] += 1
        b["disturbed"] = b["disturbed"] or bool(e["disturbed"])
    s = timer.summary()
    s["disturbed_calls"] = sorted({str(x).split("#")[0] for x in s["disturbed_calls"]})
    return s | {"blocks": blocks}


# -- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, required=True, help="write results here")
    parser.add_argument("--chunk-tokens", default="64,256", help="comma-separated chunk sizes (tokens)")
    parser.add_argument(
        "--chunks", type=int, help="chunks per chunk size (default: as many as cover --kv-tokens, i.e. 4096/size)"
    )
    parser.add_argument(
        "--kv-tokens", type=int, default=4096, help="tokens of KV per chunk size when --chunks is unset"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed batched puts/gets per measurement (median)")
    parser.add_argument("--latency-samples", type=int, default=200, help="single-chunk gets per latency measurement")
    parser.add_argument("--prefix", type=int, default=4096, help="prefix tokens of the L3 hit (default 4096)")
    parser.add_argument("--suffix", type=int, default=50, help="suffix tokens of the L3 hit (default 50)")
    parser.add_argument("--ttft-repeats", type=int, default=3, help="timed hits and colds (median)")
    parser.add_argument("--no-ttft", action="store_true", help="skip the L3 hit vs cold TTFT measurement")
    parser.add_argument(
        "--l3-timeout",
        type=float,
        default=5.0,
        help="l3.timeout_s for the Redis tier (default 5; the config default 0.5 s can time out on a batched get of "
        "~190 MB on a loaded 2-core machine: Redis sends nothing until it has copied every reply of the pipeline)",
    )
    parser.add_argument("--maxmemory", type=int, help="redis-server --maxmemory in bytes (default: sized to the data)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--cache-dir", type=Path, help="model cache dir (default: kvtier config's cache_dir)")
    parser.add_argument(
        "--tmp-dir", type=Path, help="parent of the temporary L2 and redis folders (default: system tmp)"
    )
    parser.add_argument("--idle-threshold", type=float, default=0.2, help="foreign CPU (cores) that disturbs a timing")
    parser.add_argument("--max-wait", type=float, default=10.0, help="max s to wait for a quiet machine per block")
    parser.add_argument("--wait-budget", type=float, default=60.0, help="max s of such waiting in the whole run")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a disturbed block (>= 0.5 s)")
    args = parser.parse_args(argv)
    sizes = unique_sorted(parse_ints(args.chunk_tokens))
    if args.repeats <= 0 or args.ttft_repeats <= 0 or args.latency_samples <= 0:
        parser.error("--repeats, --ttft-repeats and --latency-samples must be positive")
    n_chunks = {ct: args.chunks if args.chunks else max(1, args.kv_tokens // ct) for ct in sizes}

    start = time.perf_counter()
    load_before = loadavg()
    quiet()
    fix_threads(args.threads)
    from kvtier.adapters.hf import hf_namespace
    from kvtier.chunk import encode
    from kvtier.config import L3Config, load_config
    from kvtier.keys import as_token_array
    from kvtier.models import load_model, resolve_model
    from kvtier.storage import DiskBackend, MemoryBackend
    from kvtier.storage.redis import RedisBackend

    config = load_config()
    cache_dir = args.cache_dir or config.cache_dir
    model_path = resolve_model(MODEL, cache_dir)
    log(f"loading {MODEL} from {model_path}")
    model, tokenizer = load_model(model_path)
    namespace = hf_namespace(model, tenant=config.tenant, hash_name=config.hash)
    layout = namespace.layout
    need_chunk_tokens = max(ct * n for ct, n in n_chunks.items())
    kv_tokens = max(need_chunk_tokens, 0 if args.no_ttft else args.prefix + args.suffix)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and kv_tokens > max_pos:
        parser.error(f"{kv_tokens} tokens of KV needed, the model takes at most {max_pos}")
    all_ids, sources = real_tokens(tokenizer, max(kv_tokens, args.prefix + 2 * args.suffix))
    log(f"{len(all_ids)} tokens of text from {', '.join(sources)}; prefill of {kv_tokens} tokens for the KV")
    t0 = time.perf_counter()
    kv_source = compute_kv(model, all_ids[:kv_tokens])
    kv_prefill_s = time.perf_counter() - t0
    tokens = as_token_array(all_ids[:kv_tokens])
    log(f"KV computed in {kv_prefill_s:.1f} s ({kv_tokens * layout.bytes_per_token / 1e6:.0f} MB, {layout})")

    largest = max(ct * n * layout.bytes_per_token for ct, n in n_chunks.items())
    maxmemory = args.maxmemory or max(2 << 30, 3 * largest + (512 << 20))
    timer = CleanTimer(
        threshold=args.idle_threshold, max_wait=args.max_wait, wait_budget=args.wait_budget, retries=args.retries
    )
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-tiers-", dir=args.tmp_dir))
    rows: list[dict[str, Any]] = []
    hit: dict[str, Any] | None = None
    redis_info: dict[str, Any] = {}
    try:
        with _Server(tmp / "redis", maxmemory) as server:
            with server.client() as c:
                info = c.info()
                redis_info = {
                    k: info.get(k) for k in ("redis_version", "maxmemory", "maxmemory_policy", "io_threads_active")
                }
            log(f"redis-server {redis_info.get('redis_version')} on {server.url} (maxmemory {maxmemory >> 20} MiB)")
            for ct in sizes:
                chunks = make_chunks(namespace, tokens, kv_source, ct, n_chunks[ct])
                mb = sum(c.payload.nbytes for c in chunks) / 1e6
                log(f"c{ct}: {len(chunks)} chunks, {mb:.0f} MB of payload")

                # L1
                log(f"c{ct}: L1 (memory)")
                l1 = MemoryBackend(4 * int(mb * 1e6) + (1 << 30), name="cpu")
                l1.start()
                rows.append({**bench_backend("L1", l1, chunks, args, timer), "note": "held by reference (no copy)"})
                l1.close()

                # L2
                log(f"c{ct}: L2 (disk, page cache warm, then dropped)")
                disk = DiskBackend(tmp / f"l2-c{ct}", 4 * int(mb * 1e6) + (1 << 30), name="disk")
                disk.start()
                row = bench_backend("L2", disk, chunks, args, timer, after_put=os.sync)
                row["page_cache_resident_before_get"] = resident_fraction(disk.files())
                row.update(bench_l2_dropped(disk, chunks, args, timer))
                row["dir"] = str(disk.root)
                rows.append(row)
                disk.clear()
                disk.close()
                shutil.rmtree(disk.root, ignore_errors=True)

                # L3 and the plain redis-py reference on the same bytes
                log(f"c{ct}: L3 (redis) and plain redis-py reference")
                l3 = RedisBackend.from_config(
                    L3Config(url=server.url, key_prefix=KEY_PREFIX, timeout_s=args.l3_timeout), tenant=None
                )
                l3.start()
                values = [encode(c) for c in chunks]
                raw = RawRedis(server, values, ct)
                raw_put_s = raw.bench_put(timer, args.repeats)
                row = bench_backend(
                    "L3",
                    l3,
                    chunks,
                    args,
                    timer,
                    get_refs={
                        "raw_pipelined": (raw.get_pipelined, values),
                        "raw_sequential": (raw.get_sequential, values),
                    },
                )
                raw_lat = latency_ms(
                    timer, f"raw c{ct} get1", raw.client.get, raw.keys, max(args.latency_samples, len(raw.keys))
                )
                raw.close()
                nbytes = raw.nbytes
                pipe_s, seq_s = row["ref_get_s"]["raw_pipelined"], row["ref_get_s"]["raw_sequential"]
                row.update(
                    {
                        "encoded_bytes": nbytes,
                        "raw_redis_get_gbps": nbytes / pipe_s / 1e9,
                        "raw_redis_get_gbps_basis": "pipelined GETs of all chunks in one batch, as RedisBackend.get",
                        "raw_redis_get_seq_gbps": nbytes / seq_s / 1e9,
                        "raw_redis_put_gbps": nbytes / raw_put_s / 1e9,
                        "raw_redis_get_p50_ms": _pct(raw_lat, 50),
                        "raw_redis_get_p99_ms": _pct(raw_lat, 99),
                        "l3_over_raw": pipe_s / row["get_s"],
                        "l3_over_raw_seq": seq_s / row["get_s"],
                    }
                )
                log(f"c{ct}: profiling L3 get")
                row["profile"] = profile_l3(l3, server.server.port, chunks, args.repeats)
                counters = l3.counters()
                if counters["errors"] or counters["corrupt"] or counters["skipped"]:
                    raise AssertionError(f"redis backend counted failures during the benchmark: {counters}")
                row["redis_counters"] = counters
                l3.clear()
                l3.close()
                rows.append(row)
                values = chunks = raw = None
                gc.collect()
                log(
                    f"c{ct}: L3 get {row['get_gbps']:.2f} GB/s vs raw {row['raw_redis_get_gbps']:.2f} GB/s "
                    f"({row['l3_over_raw']:.2f}x)"
                )
            with server.client() as c:
                c.flushall()
            if not args.no_ttft:
                hit = bench_hit(model, tokenizer, namespace, all_ids, kv_source, server, args, timer)
            with server.client() as c:
                redis_info["used_memory_peak"] = c.info("memory").get("used_memory_peak")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in rows:
        assert all(k in r for k in ROW_FIELDS), r
    tgt = targets(rows, hit)
    runtime = time.perf_counter() - start
    machine = machine_info(args.threads)
    machine["loadavg_start"] = load_before
    machine["loadavg_end"] = loadavg()
    result: dict[str, Any] = {
        "benchmark": "tiers",
        "model": MODEL,
        "model_path": str(model_path),
        "settings": {
            "chunk_tokens": sizes,
            "chunks": n_chunks,
            "repeats": args.repeats,
            "latency_samples": args.latency_samples,
            "l3_timeout_s": args.l3_timeout,
            "layout": layout.to_dict(),
            "bytes_per_token": layout.bytes_per_token,
            "kv_tokens": kv_tokens,
            "kv_prefill_s": kv_prefill_s,
            "text_sources": sources,
            "redis": redis_info | {"hiredis": _has_hiredis()},
            "units": "GB/s = 1e9 payload bytes per second; raw redis GB/s = encoded value bytes per second; "
            "l3_over_raw = raw pipelined GET time / L3 get time for the same chunks",
        },
        "machine": machine,
        "rows": rows,
        "l3_hit_speedup_4096": hit["l3_hit_speedup_4096"] if hit else None,
        "l3_hit_s": hit["l3_hit_s"] if hit else None,
        "cold_s": hit["cold_s"] if hit else None,
        "hit": hit["hit"] if hit else None,
        "targets": tgt,
        "contention": _contention(timer),
        "runtime_s": runtime,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, result)
    print(f"wrote {args.json}; total runtime {runtime:.0f} s")
    disturbed = result["contention"]["disturbed_calls"]
    if disturbed:
        log(f"WARNING: other processes used >= {args.idle_threshold} cores during: {', '.join(disturbed)}")
    if hit and not hit["hit"]["same_first_token"]:
        log("WARNING: the L3 hit's first token differs from the cold run's")
        return 1
    return 0


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
