"""Throughput and latency of each storage tier on real SmolLM2-135M KV, and TTFT of a hit served from Redis.

    python bench/tiers.py --json bench/results/tiers.json [--chunk-tokens 64,256] [--chunks N] [--repeats R]
                          [--quick]

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

Each tier is the backend ``kvtier.storage.build_backends`` opens for a config
that enables that tier alone (kvtier defaults, no ``KVTIER_*`` from the shell):
``L1`` = the memory tier (holds chunks by reference: no copy, no serialization,
so its GB/s are bookkeeping, not memory bandwidth); ``L2`` = the disk tier in a
temporary directory, reads with the files in the page cache (``get_*``) and
after ``posix_fadvise(DONTNEED)`` dropped them (``*_dropped``, residency checked
with mincore); ``L3`` = the Redis tier on a redis-server this script starts on
a free loopback port (persistence off, ``--maxmemory`` sized to the data,
``noeviction``) and stops at exit, even on error. The server's CPU counts as
this benchmark's own in the quiet-machine checks.

For L3 the same run times plain redis-py (a client of its own, from the
server's URL) on values of exactly the encoded chunks' bytes (stored under
other keys with plain SET): a pipelined GET of all of them in one batch
(``raw_redis_get_gbps``) and a sequential GET loop (``raw_redis_get_seq_gbps``),
timed interleaved with the backend's batched get (L3, raw pipelined, raw
sequential, L3, ...) so a shared machine's drift hits all three alike.
``l3_over_raw`` is raw pipelined time / L3 time for the same chunks. The L3
rows also carry a ``profile`` of a batched get: the pipelined fetch on that
client vs ``kvtier.chunk.decode`` of the values, and what encoding the chunks
costs. The Redis tier runs with ``l3.timeout_s`` = ``--l3-timeout``.

Finally ``l3_hit_speedup_4096``: an engine with the Redis tier alone
(``chunk_size`` 256, ``store_partial=false``) stores prefix + suffix A (the
model's own KV of those tokens, via ``CacheEngine.store``; written in the
background, so ``flush`` before reading); then ``CachedModel.generate`` of
prefix + a different 50-token suffix B (the prefix comes from Redis, B is
prefilled, one token generated) vs a plain ``model.generate`` of prefix + B,
median of ``--ttft-repeats`` each.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import harness as h
import numpy as np
import torch
from harness import GEN, MODEL, CleanTimer, fmt_s

ROW_FIELDS = ("tier", "chunk_tokens", "get_gbps", "put_gbps", "get_p50_ms", "get_p99_ms")
COLUMNS = {
    "tier": "tier",
    "chunk tok": "chunk_tokens",
    "chunks": "chunks",
    "MB": "payload_bytes",
    "put GB/s": "put_gbps",
    "get GB/s": "get_gbps",
    "get p50 ms": "get_p50_ms",
    "get p99 ms": "get_p99_ms",
    "cold get GB/s": "get_gbps_dropped",
    "cold p50 ms": "get_p50_ms_dropped",
    "cold p99 ms": "get_p99_ms_dropped",
    "raw pipe GB/s": "raw_redis_get_gbps",
    "raw seq GB/s": "raw_redis_get_seq_gbps",
    "raw p50 ms": "raw_redis_get_p50_ms",
    "L3/raw": "l3_over_raw",
}
TARGET_L3_OVER_RAW = 0.7
TARGET_HIT_SPEEDUP = 10.0
KEY_PREFIX = "kvtier-bench"
RAW_PREFIX = b"kvtier-bench-raw:"
QUICK = {
    "chunk_tokens": "64",
    "chunks": 4,
    "repeats": 1,
    "latency_samples": 4,
    "prefix": 256,
    "suffix": 8,
    "ttft_repeats": 1,
    "wait_budget": 0.0,
}


def log(msg: str) -> None:
    """A line above the progress bar (stderr)."""
    from tqdm import tqdm

    tqdm.write(f"[tiers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


def _pct(values: Sequence[float], q: float) -> float:
    return float(h.percentile(values, q))


# -- redis-server -----------------------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server on a free loopback port (persistence off), stopped on exit, on error and on SIGTERM/SIGHUP."""

    def __init__(self, folder: Path, maxmemory: int) -> None:
        self.folder, self.maxmemory = folder, maxmemory
        self.port = h.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        def on_signal(signum: int, _frame: object) -> None:
            raise SystemExit(128 + signum)  # unwinds through the finally/with blocks that stop the server

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
        atexit.register(self.stop)
        self.folder.mkdir(parents=True, exist_ok=True)
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"), "--protected-mode", "yes"]
        args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen([server, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        with self.client() as c:
            while True:
                try:
                    if c.ping():
                        return self
                except Exception as exc:  # not up yet
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server on port {self.port} did not start: {exc}") from exc
                time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self):
        """A plain redis-py client of this benchmark's own, from the server's URL."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=30, socket_connect_timeout=2)


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


def one_backend(overrides: dict[str, Any], *, memory: bool = False):
    """The one started backend ``build_backends`` opens for a config enabling a single tier."""
    from kvtier.storage import TierAccess, build_backends

    [backend] = build_backends(h.bench_config(overrides), TierAccess(memory=memory))
    backend.start()
    return backend


# -- measurements ----------------------------------------------------------------------------------------------------


def _gc() -> None:
    gc.collect()


def latency_ms(
    timer: CleanTimer,
    label: str,
    get_one: Callable[[Any], object],
    keys: Sequence[Any],
    samples: int,
    seed: int,
    before_round: Callable[[], object] | None = None,
) -> list[float]:
    """``samples`` single-key gets, cycling through ``keys`` (shuffled each round); ms each.

    ``before_round`` runs (untimed) before every pass over the keys (e.g. a page-cache drop, so each key
    is read once per drop). GC is off during the timed calls.
    """
    order: list[Any] = []
    rng = random.Random(seed)
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
    samples = max(args.latency_samples, len(keys))
    lat = latency_ms(timer, f"{name} c{ct} get1", lambda k: backend.get([k]), keys, samples, args.seed)
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
        residency.append(h.resident_fraction(disk.files()))

    get_s, get_all, got, get_f = timer.timed(
        f"L2 c{ct} get dropped", lambda: disk.get(keys), repeats=args.repeats, before=drop
    )
    _check_same(chunks, got)
    got = None
    samples = max(args.latency_samples, len(keys))
    lat = latency_ms(timer, f"L2 c{ct} get1 dropped", lambda k: disk.get([k]), keys, samples, args.seed, drop)
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

    def __init__(self, server: RedisServer, values: list[bytes], ct: int) -> None:
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

    def get_pipelined(self, keys: Sequence[bytes] | None = None) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for k in self.keys if keys is None else keys:
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


def profile_l3(backend, raw: RawRedis, chunks, repeats: int) -> dict[str, Any]:
    """Where a batched get of the Redis tier goes (medians over ``repeats``): the pipelined fetch of its values
    on a plain redis-py client vs ``kvtier.chunk.decode`` of them; and what encoding the chunks costs."""
    from kvtier.chunk import decode, encode

    keys = [c.key for c in chunks]
    rkeys = [backend.redis_key(k) for k in keys]
    parts: dict[str, list[float]] = {"total": [], "fetch": [], "decode": [], "encode": []}
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        backend.get(keys)
        parts["total"].append(time.perf_counter() - t0)
        gc.collect()
        t0 = time.perf_counter()
        values = raw.get_pipelined(rkeys)
        parts["fetch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = [decode(v) for v in values]
        parts["decode"].append(time.perf_counter() - t0)
        if [c.key for c in out] != keys:
            raise AssertionError("the Redis tier's values decode to other chunks")
        out = values = None
        t0 = time.perf_counter()
        [encode(c) for c in chunks]
        parts["encode"].append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in parts.items()}
    return {
        "get_total_s": med["total"],
        "fetch_s": med["fetch"],
        "decode_s": med["decode"],
        "fetch_share": med["fetch"] / med["total"],
        "decode_share": med["decode"] / med["total"],
        "encode_s": med["encode"],
    }


# -- L3-only hit vs cold ----------------------------------------------------------------------------------------------


def bench_hit(model, tokenizer, ns, all_ids: list[int], kv_source, server: RedisServer, args, timer: CleanTimer, bar):
    from kvtier.adapters.hf import CachedModel

    P, S, R = args.prefix, args.suffix, args.ttft_repeats
    ids_a, ids_b = h.prompt_pair(all_ids, P, S)
    hit_ids = torch.tensor([ids_b], dtype=torch.long)
    overrides = {
        "l2.enabled": False,
        "l3.enabled": True,
        "l3.url": server.url,
        "l3.key_prefix": f"{KEY_PREFIX}-ttft",
        "l3.timeout_s": args.l3_timeout,
        "store_partial": False,
    }
    engine = h.engine(ns, overrides, memory=False)
    try:
        [l3] = engine.tiers.tiers
        stored = engine.store(ids_a, kv_source)  # the model's own KV of prefix + suffix A
        if not engine.flush(timeout=600):  # the Redis tier is written in the background
            raise AssertionError("the Redis tier's writes did not finish within 600 s")
        look = engine.lookup(ids_b, max_tokens=len(ids_b) - 1)
        if look.num_tokens != P or look.tier_tokens.get(l3.name) != P:
            raise AssertionError(
                f"after storing, lookup finds {look.num_tokens} tokens ({look.tiers}), expected {P} in {l3.name}"
            )
        cm = CachedModel(model, tokenizer, engine)
        with torch.inference_mode():
            log(f"hit: CachedModel.generate of {P}+{S} tokens, prefix from L3 (warm-up + {R})")
            hit_s, hit_all, gen, hit_f = timer.timed(
                "hit_l3", lambda: cm.generate(hit_ids, **GEN), repeats=R, before=_gc
            )
            if gen.reused_tokens != P or gen.tier_tokens.get(l3.name) != P:
                raise AssertionError(f"hit reused {gen.reused_tokens} tokens ({gen.tiers}), expected {P} from L3")
            ttfts = []
            for _ in range(R):  # Generation.ttft_s of separate calls (the timed block keeps only the last)
                _gc()
                ttfts.append(cm.generate(hit_ids, **GEN).ttft_s)
            retr_s, _, res, _ = timer.timed(
                "retrieve_l3", lambda: engine.retrieve(ids_b, max_tokens=P), repeats=R, before=_gc
            )
            assert res.num_tokens == P
            res = None
            h.first_token(model, hit_ids[:, :32])  # cold: warm the model's code paths, then the full prefill
            cold_times, cold_f, first_cold = [], [], None
            for i in range(R):
                log(f"cold: model.generate of {P}+{S} tokens ({i + 1}/{R})")
                dt, first_cold, f = timer.once(f"cold#{i + 1}", lambda: h.first_token(model, hit_ids), _gc)
                cold_times.append(dt)
                cold_f.append(f)
        counters = l3.counters()
    finally:
        engine.close()
    bar.update()
    cold_s = median(cold_times)
    return {
        "l3_hit_speedup_4096": cold_s / hit_s,
        "l3_hit_s": hit_s,
        "cold_s": cold_s,
        "hit": {
            "prefix_tokens": P,
            "suffix_tokens": S,
            "chunk_size": engine.chunk_size,
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


# -- one chunk size ---------------------------------------------------------------------------------------------------


def bench_chunk_size(ct: int, chunks, args, timer: CleanTimer, server: RedisServer, tmp: Path, bar) -> list[dict]:
    """L1, L2 and L3 rows for one chunk size."""
    from kvtier.chunk import encode

    budget = 4 * sum(c.payload.nbytes for c in chunks) + (1 << 30)
    rows = []
    log(f"c{ct}: L1 (memory)")
    l1 = one_backend({"l1.max_bytes": budget, "l2.enabled": False}, memory=True)
    rows.append({**bench_backend("L1", l1, chunks, args, timer), "note": "held by reference (no copy)"})
    l1.close()
    bar.update()

    log(f"c{ct}: L2 (disk, page cache warm, then dropped)")
    disk = one_backend({"l2.path": str(tmp / f"l2-c{ct}"), "l2.max_bytes": budget})
    row = bench_backend("L2", disk, chunks, args, timer, after_put=os.sync)
    row["page_cache_resident_before_get"] = h.resident_fraction(disk.files())
    row.update(bench_l2_dropped(disk, chunks, args, timer))
    row["dir"] = str(disk.root)
    rows.append(row)
    disk.clear()
    disk.close()
    shutil.rmtree(disk.root, ignore_errors=True)
    bar.update()

    log(f"c{ct}: L3 (redis) and plain redis-py reference")
    l3_config = {"l2.enabled": False, "l3.enabled": True, "l3.url": server.url, "l3.key_prefix": KEY_PREFIX}
    l3 = one_backend(l3_config | {"l3.timeout_s": args.l3_timeout})
    values = [encode(c) for c in chunks]
    raw = RawRedis(server, values, ct)
    raw_put_s = raw.bench_put(timer, args.repeats)
    refs = {"raw_pipelined": (raw.get_pipelined, values), "raw_sequential": (raw.get_sequential, values)}
    row = bench_backend("L3", l3, chunks, args, timer, get_refs=refs)
    samples = max(args.latency_samples, len(raw.keys))
    raw_lat = latency_ms(timer, f"raw c{ct} get1", raw.client.get, raw.keys, samples, args.seed)
    pipe_s, seq_s = row["ref_get_s"]["raw_pipelined"], row["ref_get_s"]["raw_sequential"]
    row.update(
        {
            "encoded_bytes": raw.nbytes,
            "raw_redis_get_gbps": raw.nbytes / pipe_s / 1e9,
            "raw_redis_get_gbps_basis": "pipelined GETs of all chunks in one batch on a plain redis-py client",
            "raw_redis_get_seq_gbps": raw.nbytes / seq_s / 1e9,
            "raw_redis_put_gbps": raw.nbytes / raw_put_s / 1e9,
            "raw_redis_get_p50_ms": _pct(raw_lat, 50),
            "raw_redis_get_p99_ms": _pct(raw_lat, 99),
            "l3_over_raw": pipe_s / row["get_s"],
            "l3_over_raw_seq": seq_s / row["get_s"],
        }
    )
    log(f"c{ct}: profiling L3 get")
    row["profile"] = profile_l3(l3, raw, chunks, args.repeats)
    raw.close()
    counters = l3.counters()
    if counters["errors"] or counters["corrupt"] or counters["skipped"]:
        raise AssertionError(f"redis backend counted failures during the benchmark: {counters}")
    row["redis_counters"] = counters
    l3.clear()
    l3.close()
    rows.append(row)
    bar.update()
    log(
        f"c{ct}: L3 get {row['get_gbps']:.2f} GB/s vs raw {row['raw_redis_get_gbps']:.2f} GB/s "
        f"({row['l3_over_raw']:.2f}x)"
    )
    return rows


# -- reporting --------------------------------------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]], hit: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        if r["tier"] == "L3":
            out[f"l3_over_raw_c{r['chunk_tokens']}"] = h.check(r["l3_over_raw"], ">=", TARGET_L3_OVER_RAW) | {
                "l3_get_gbps": r["get_gbps"],
                "raw_redis_get_gbps": r["raw_redis_get_gbps"],
            }
    if hit is not None:
        out["l3_hit_speedup_4096"] = h.check(hit["l3_hit_speedup_4096"], ">=", TARGET_HIT_SPEEDUP)
    out["all_pass"] = h.all_pass(out)
    return out


def print_report(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    con = h.console(170)
    title = f"kvtier tiers, real {MODEL} fp32 KV ({result['settings']['bytes_per_token'] // 1024} KiB/token)"
    h.print_table(con, title, COLUMNS, rows)
    con.print(
        "L1 holds chunks by reference (no copy): its GB/s measure bookkeeping. 'cold' = L2 after the page cache "
        "dropped the files (posix_fadvise DONTNEED). raw = plain redis-py on the same value bytes; raw pipe = one "
        "pipelined batch of all chunks."
    )
    for r in rows:
        if p := r.get("profile"):
            con.print(
                f"L3 c{r['chunk_tokens']} batched get {fmt_s(p['get_total_s'])}: one pipelined fetch on plain "
                f"redis-py {fmt_s(p['fetch_s'])} ({100 * p['fetch_share']:.0f} %), kvtier.chunk.decode "
                f"{fmt_s(p['decode_s'])} ({100 * p['decode_share']:.0f} %); encoding the chunks {fmt_s(p['encode_s'])}"
            )
    if hit := result.get("hit"):
        con.print(
            f"L3-only hit at {hit['prefix_tokens']}+{hit['suffix_tokens']} tokens: {fmt_s(result['l3_hit_s'])} vs cold "
            f"{fmt_s(result['cold_s'])} = {result['l3_hit_speedup_4096']:.1f}x (retrieve from L3 alone "
            f"{fmt_s(hit['retrieve_l3_s'])}; same first token: {'yes' if hit['same_first_token'] else 'NO'})"
        )
    con.print("targets:")
    h.print_targets(con, result["targets"])


# -- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    positive = ("repeats", "ttft_repeats", "latency_samples", "chunks", "kv_tokens", "prefix", "suffix")
    parser = h.BenchParser(__doc__, ("seed", *h.MODEL_FLAGS), quick=QUICK, positive=positive)
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
        "~190 MB on a loaded 2-core machine)",
    )
    parser.add_argument("--maxmemory", type=int, help="redis-server --maxmemory in bytes (default: sized to the data)")
    args = parser.parse_args(argv)
    sizes = h.parse_ints(args.chunk_tokens)
    n_chunks = {ct: args.chunks if args.chunks else max(1, args.kv_tokens // ct) for ct in sizes}

    run = h.Run(args, "tiers")
    timer = run.timer
    from kvtier.keys import as_token_array

    model, tokenizer, model_path, ns = h.load_bench_model(args)
    layout = ns.layout
    kv_tokens = max(max(ct * n for ct, n in n_chunks.items()), 0 if args.no_ttft else args.prefix + args.suffix)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and kv_tokens > max_pos:
        parser.error(f"{kv_tokens} tokens of KV needed, the model takes at most {max_pos}")
    all_ids, sources = h.real_tokens(tokenizer, max(kv_tokens, args.prefix + 2 * args.suffix))
    log(f"{len(all_ids)} tokens of text from {', '.join(sources)}; prefill of {kv_tokens} tokens for the KV")
    t0 = time.perf_counter()
    kv_source = compute_kv(model, all_ids[:kv_tokens])
    kv_prefill_s = time.perf_counter() - t0
    tokens = as_token_array(all_ids[:kv_tokens])
    log(f"KV computed in {kv_prefill_s:.1f} s ({kv_tokens * layout.bytes_per_token / 1e6:.0f} MB, {layout})")

    largest = max(ct * n * layout.bytes_per_token for ct, n in n_chunks.items())
    maxmemory = args.maxmemory or max(2 << 30, 3 * largest + (512 << 20))
    rows: list[dict[str, Any]] = []
    hit: dict[str, Any] | None = None
    try:
        stages = 3 * len(sizes) + (0 if args.no_ttft else 1)
        with (
            RedisServer(run.tmp / "redis", maxmemory) as server,
            server.client() as client,
            h.progress(stages, "tiers") as bar,
        ):
            timer.own_pids.add(server.proc.pid)  # the server's CPU is the benchmark's, not another process's
            info = client.info()
            redis_info = {
                k: info.get(k) for k in ("redis_version", "maxmemory", "maxmemory_policy", "io_threads_active")
            }
            log(f"redis-server {redis_info.get('redis_version')} on {server.url} (maxmemory {maxmemory >> 20} MiB)")
            for ct in sizes:
                chunks = make_chunks(ns, tokens, kv_source, ct, n_chunks[ct])
                log(f"c{ct}: {len(chunks)} chunks, {sum(c.payload.nbytes for c in chunks) / 1e6:.0f} MB of payload")
                rows += bench_chunk_size(ct, chunks, args, timer, server, run.tmp, bar)
                chunks = None
                gc.collect()
            client.flushall()
            if not args.no_ttft:
                hit = bench_hit(model, tokenizer, ns, all_ids, kv_source, server, args, timer, bar)
            redis_info["used_memory_peak"] = client.info("memory").get("used_memory_peak")
    finally:
        run.remove_tmp()

    for r in rows:
        assert all(k in r for k in ROW_FIELDS), r
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
            "seed": args.seed,
            "layout": layout.to_dict(),
            "bytes_per_token": layout.bytes_per_token,
            "kv_tokens": kv_tokens,
            "kv_prefill_s": kv_prefill_s,
            "text_sources": sources,
            "redis": redis_info | {"hiredis": _has_hiredis()},
            "units": "GB/s = 1e9 payload bytes per second; raw redis GB/s = encoded value bytes per second; "
            "l3_over_raw = raw pipelined GET time / L3 get time for the same chunks",
        },
        "machine": run.machine(),
        "rows": rows,
        "l3_hit_speedup_4096": hit["l3_hit_speedup_4096"] if hit else None,
        "l3_hit_s": hit["l3_hit_s"] if hit else None,
        "cold_s": hit["cold_s"] if hit else None,
        "hit": hit["hit"] if hit else None,
        "targets": targets(rows, hit),
        "contention": timer.report(blocks=True),
        "runtime_s": run.runtime_s,
    }
    run.finish(result, table=lambda: print_report(rows, result))
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
