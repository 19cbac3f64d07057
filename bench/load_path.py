"""The load path's storage half: how fast the disk tier (page cache) and the node tier hand back a long prefix.

    python bench/load_path.py --json bench/results/load_path.json [--plot PATH] [--chunks 10] [--chunk-tokens 256]
                              [--repeats 9] [--quick]

A 2,560-token prefix in SmolLM2-135M's layout (30 layers, 3 KV heads, head
dim 64, fp32: 46,080 B a token, 11.8 MB a 256-token chunk, raw codec) is
stored once in a disk tier (``DiskBackend`` in a temporary folder on the
root filesystem, files in the page cache) and once in a node tier
(``NodeBackend`` in a temporary folder under ``/dev/shm``). The payload is
random: with the raw codec the bytes are copied, never interpreted, so real
KV would time the same. Measured, best of the machine's quiet moments
(``CleanTimer``), median of ``--repeats`` after one warm-up:

* ``get_gbps`` of one batched ``backend.get(all keys)`` (what ``TierStack.get``
  asks a tier), for 1, 2 and 4 reader threads (``read_threads``): payload
  bytes / s, checksum verification included;
* its stages on one thread, per prefix: ``read`` (open, a populated read-only
  mapping of the file, header parse, no copy: what both tiers do, the disk
  tier unless ``map_reads`` is off, then the body is read into fresh memory),
  ``checksum`` (one xxh3-128 pass over the
  bodies), ``decode`` (``decode_payload`` minus its checksum: the tensor
  view), and for the node tier ``index`` (the ledger lookup and touch);
* the whole load into vLLM-CPU blocks (``CacheEngine.retrieve`` with the
  connector's kind of sink), as one retrieve (``load``) and split into
  ``LOAD_PARTS`` chunk-aligned retrieves on as many threads, as the vLLM
  worker runs it (``vllm.load_parts``; ``load_parts``);
* the floors, in the same run: ``memcpy_pre_gbps`` (a copy of the same bytes
  into preallocated, already-touched memory) and ``memcpy_fresh_gbps`` (into
  freshly allocated memory, as a read that returns new tensors must).

Targets (issue 12): disk ≥ 2 GB/s, node ≥ 3 GB/s, at the default thread count.
"""

from __future__ import annotations

import itertools
import mmap
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import harness as h
import numpy as np
import torch
import xxhash

from kvtier.adapters.vllm.paged import CANDIDATES, PagedLayout
from kvtier.chunk import PREFIX_BYTES, Chunk, decode_header, decode_payload, header_length
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout
from kvtier.storage import DiskBackend, NodeBackend
from kvtier.storage.files import read_payload
from kvtier.storage.tiers import TierStack

QUICK = {"chunks": 2, "repeats": 3}
LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M, fp32
NAMESPACE = Namespace("load-path-bench", LAYOUT)
BLOCK_TOKENS = 128  # vLLM-CPU's block size in kvtier serve
THREADS = (1, 2, 4)
LOAD_PARTS = 2  # the vLLM worker's default split of a load (vllm.load_parts)
DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # what the tiers use unless told otherwise
TARGETS = {"l2": 2.0, "node": 3.0}


def make_prefix(n_chunks: int, chunk_tokens: int, seed: int) -> list[Chunk]:
    ns = NAMESPACE
    tokens = np.random.default_rng(seed).integers(0, 49_152, size=n_chunks * chunk_tokens).astype("<u4")
    gen = torch.Generator().manual_seed(seed)
    return [
        Chunk(
            s.key,
            s.parent,
            ns.digest,
            LAYOUT,
            tokens[s.start : s.end].copy(),
            torch.randn(LAYOUT.chunk_shape(s.num_tokens), generator=gen),
        )
        for s in chunk_spans(ns, tokens, chunk_tokens)
    ]


def _map_files(paths: list[Path]) -> list[tuple[Any, Any]]:
    """What the node tier's read does before verifying: open, a populated read-only mapping, the header."""
    out = []
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
            view = memoryview(mm)
            header = decode_header(bytes(view[: header_length(bytes(view[:PREFIX_BYTES]))]))
            out.append((header, view[header.offset :]))
    return out


def _read_files(paths: list[Path]) -> list[tuple[Any, Any]]:
    """What the disk tier's read does before verifying: open, the header, the body read into fresh memory."""
    out = []
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            head = f.read(1 << 16)
            needed = header_length(head[:PREFIX_BYTES])
            if needed > len(head):
                head += f.read(needed - len(head))
            header = decode_header(head)
            out.append((header, read_payload(f, head, header)))
    return out


class PagedBlocks:
    """Preallocated, touched vLLM-CPU KV blocks for one prefix: ``[num_blocks, H, block_size, 2*D]`` per layer."""

    def __init__(self, num_tokens: int) -> None:
        self.block_ids = list(range(-(-num_tokens // BLOCK_TOKENS)))
        shape = (len(self.block_ids), LAYOUT.num_kv_heads, BLOCK_TOKENS, 2 * LAYOUT.head_dim)
        self.layers = [torch.zeros(shape) for _ in range(LAYOUT.num_layers)]
        self.paged = PagedLayout(
            "cpu-k-transposed",
            BLOCK_TOKENS,
            LAYOUT.num_kv_heads,
            LAYOUT.head_dim,
            CANDIDATES["cpu-k-transposed"],
            write=lambda *a: None,  # scatter writes through the view; the kernel is only for probing
        )

    def scatter(self, start: int, kv: torch.Tensor) -> None:
        self.paged.scatter(self.layers, self.block_ids, start, kv)


def whole_load(engine: CacheEngine, tokens: np.ndarray, blocks: PagedBlocks) -> int:
    """``CacheEngine.retrieve`` with the connector's kind of sink; returns the tokens filled."""

    def sink(start: int, end: int, kv: torch.Tensor) -> bool:
        blocks.scatter(start, kv)
        return True

    return engine.retrieve(tokens, sink=sink).num_tokens


def parted_load(engine: CacheEngine, tokens: np.ndarray, blocks: PagedBlocks, pool: ThreadPoolExecutor) -> int:
    """:func:`whole_load` split into ``LOAD_PARTS`` chunk-aligned retrieves run at once (the vLLM worker's way)."""
    size = engine.chunk_size
    chunks = -(-len(tokens) // size)
    bounds = [min(len(tokens), chunks * i // LOAD_PARTS * size) for i in range(LOAD_PARTS + 1)]

    def part(lo: int, hi: int) -> int:
        def sink(start: int, end: int, kv: torch.Tensor) -> bool:
            blocks.scatter(start, kv)
            return True

        return engine.retrieve(tokens, start=lo, max_tokens=hi, sink=sink).num_tokens - lo

    return sum(pool.map(lambda b: part(*b), [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]))


def bench_tier(name: str, backend, chunks: list[Chunk], timer: h.CleanTimer, repeats: int) -> dict[str, Any]:
    keys = [c.key for c in chunks]
    nbytes = sum(c.payload.nbytes for c in chunks)
    row: dict[str, Any] = {"tier": name, "chunks": len(chunks), "payload_bytes": nbytes}
    got = backend.get(keys)
    assert all(g is not None and torch.equal(g.payload, c.payload) for g, c in zip(got, chunks, strict=True))
    del got
    for threads in THREADS:
        backend.read_threads = threads
        med, times, _, _ = timer.timed(f"{name}/get/t{threads}", lambda: backend.get(keys), repeats=repeats)
        row[f"get_t{threads}_gbps"] = nbytes / med / 1e9
        row[f"get_t{threads}_best_gbps"] = nbytes / min(times) / 1e9
    backend.read_threads = DEFAULT_THREADS
    row["get_gbps"] = row[f"get_t{DEFAULT_THREADS}_gbps"]
    paths = sorted(Path(backend.root).glob("*/*.kvc"))
    assert len(paths) == len(chunks)
    reader = _map_files if isinstance(backend, NodeBackend) or backend.map_reads else _read_files
    read_s, _, items, _ = timer.timed(f"{name}/read", lambda: reader(paths), repeats=repeats)
    sum_s, _, _, _ = timer.timed(
        f"{name}/checksum", lambda: [xxhash.xxh3_128(body).digest() for _, body in items], repeats=repeats
    )
    dec_s, _, _, _ = timer.timed(
        f"{name}/decode", lambda: [decode_payload(hd, body) for hd, body in items], repeats=repeats
    )
    blocks = PagedBlocks(sum(c.num_tokens for c in chunks))
    decoded = [decode_payload(hd, body).payload for hd, body in items]
    starts = np.cumsum([0] + [c.num_tokens for c in chunks])[:-1]
    sc_s, _, _, _ = timer.timed(
        f"{name}/scatter",
        lambda: [blocks.scatter(int(at), kv) for at, kv in zip(starts, decoded, strict=True)],
        repeats=repeats,
    )
    stages = {"read": read_s, "checksum": sum_s, "decode": max(0.0, dec_s - sum_s), "scatter": sc_s}
    if isinstance(backend, NodeBackend):
        index_s, _, _, _ = timer.timed(
            f"{name}/index", lambda: (backend.ledger.parents(keys), backend.ledger.touch(keys)), repeats=repeats
        )
        stages["index"] = index_s
    tokens = np.concatenate([c.tokens for c in chunks])
    engine = CacheEngine(NAMESPACE, TierStack([backend], write_queue_bytes=1 << 20), chunk_size=chunks[0].num_tokens)
    assert whole_load(engine, tokens, blocks) == len(tokens)
    expected = torch.cat([c.payload for c in chunks], dim=3)
    assert torch.equal(blocks.paged.read(blocks.layers, blocks.block_ids, 0, len(tokens)), expected)
    load_s, load_times, _, _ = timer.timed(f"{name}/load", lambda: whole_load(engine, tokens, blocks), repeats=repeats)
    row["load_ms"] = load_s * 1e3
    row["load_gbps"] = nbytes / load_s / 1e9
    row["load_best_gbps"] = nbytes / min(load_times) / 1e9
    with ThreadPoolExecutor(LOAD_PARTS) as pool:
        for layer in blocks.layers:
            layer.zero_()
        assert parted_load(engine, tokens, blocks, pool) == len(tokens)
        assert torch.equal(blocks.paged.read(blocks.layers, blocks.block_ids, 0, len(tokens)), expected)
        parts_s, parts_times, _, _ = timer.timed(
            f"{name}/load-parts", lambda: parted_load(engine, tokens, blocks, pool), repeats=repeats
        )
    row["load_parts_ms"] = parts_s * 1e3
    row["load_parts_gbps"] = nbytes / parts_s / 1e9
    row["load_parts_best_gbps"] = nbytes / min(parts_times) / 1e9
    row["stages_ms"] = {k: v * 1e3 for k, v in stages.items()}
    row["stages_gbps"] = {k: nbytes / v / 1e9 if v > 0 else None for k, v in stages.items()}
    return row


def memcpy_floors(nbytes: int, timer: h.CleanTimer, repeats: int) -> dict[str, float]:
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.zeros_like(src)
    pre, _, _, _ = timer.timed("memcpy/pre", lambda: dst.copy_(src), repeats=repeats)
    fresh, _, _, _ = timer.timed("memcpy/fresh", lambda: torch.empty_like(src).copy_(src), repeats=repeats)
    return {"memcpy_pre_gbps": nbytes / pre / 1e9, "memcpy_fresh_gbps": nbytes / fresh / 1e9}


def print_report(result: dict[str, Any]) -> None:
    con = h.console()
    rows = result["rows"]
    cols: dict[str, Any] = {"tier": "tier", "MB": lambda r: f"{r['payload_bytes'] / 1e6:.0f}"}
    for t in THREADS:
        cols[f"get GB/s t{t}"] = lambda r, t=t: f"{r[f'get_t{t}_gbps']:.2f}"
    for stage in ("read", "checksum", "decode", "scatter", "index"):
        cols[f"{stage} ms (GB/s)"] = lambda r, s=stage: (
            (f"{r['stages_ms'][s]:.1f} ({g:.1f})" if (g := r["stages_gbps"][s]) else f"{r['stages_ms'][s]:.1f}")
            if s in r["stages_ms"]
            else "-"
        )
    cols["whole load ms (GB/s)"] = lambda r: f"{r['load_ms']:.1f} ({r['load_gbps']:.2f})"
    cols[f"load, {LOAD_PARTS} parts ms (GB/s)"] = lambda r: f"{r['load_parts_ms']:.1f} ({r['load_parts_gbps']:.2f})"
    title = f"load path, {rows[0]['chunks']} chunks of {result['settings']['chunk_tokens']} tokens"
    h.print_table(con, title, cols, rows)
    f = result["floors"]
    con.print(f"memcpy floor: {f['memcpy_pre_gbps']:.2f} GB/s preallocated, {f['memcpy_fresh_gbps']:.2f} GB/s fresh")
    h.print_targets(con, result["targets"])


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    with h.figure(path, ncols=1, figsize=(7, 4), title="a 2,560-token prefix: tier get and whole load (GB/s)") as (ax,):
        series = [(f"get, {t} thread(s)", [r[f"get_t{t}_gbps"] for r in rows], None) for t in THREADS]
        series.append(("whole load into vLLM blocks", [r["load_gbps"] for r in rows], None))
        series.append((f"whole load, {LOAD_PARTS} parts", [r["load_parts_gbps"] for r in rows], None))
        h.grouped_bars(ax, [r["tier"] for r in rows], series, annotate=lambda v: f"{v:.1f}")
        f = result["floors"]
        ax.axhline(f["memcpy_fresh_gbps"], ls="--", c="gray", lw=1, label="memcpy, fresh memory")
        ax.axhline(f["memcpy_pre_gbps"], ls=":", c="black", lw=1, label="memcpy, preallocated")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = h.BenchParser(
        __doc__, ("plot", "seed", "threads", "tmp_dir", *h.TIMER_FLAGS), quick=QUICK, positive=("chunks",)
    )
    parser.add_argument("--chunks", type=int, default=10, help="chunks in the prefix (default 10)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="tokens a chunk (default 256)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per measurement (median)")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"), help="parent of the node tier's folder")
    args = parser.parse_args(argv)
    run = h.Run(args, "load-path")
    chunks = make_prefix(args.chunks, args.chunk_tokens, args.seed)
    nbytes = sum(c.payload.nbytes for c in chunks)
    budget = 4 * nbytes
    shm = Path(tempfile.mkdtemp(prefix="kvtier-load-path-", dir=args.shm_dir))
    rows = []
    try:
        disk = DiskBackend(run.tmp / "l2", budget)
        node = NodeBackend(shm / "node", budget)
        for name, backend in (("l2", disk), ("node", node)):
            backend.start()
            t0 = time.perf_counter()
            assert all(backend.put(chunks))
            put_s = time.perf_counter() - t0
            row = bench_tier(name, backend, chunks, run.timer, args.repeats)
            row["put_gbps"] = nbytes / put_s / 1e9
            rows.append(row)
            backend.close()
        floors = memcpy_floors(nbytes, run.timer, args.repeats)
    finally:
        run.remove_tmp()
        shutil.rmtree(shm, ignore_errors=True)
    result = {
        "benchmark": "load_path",
        "settings": {
            "chunks": args.chunks,
            "chunk_tokens": args.chunk_tokens,
            "repeats": args.repeats,
            "layout": LAYOUT.to_dict(),
            "codec": "raw",
            "default_read_threads": DEFAULT_THREADS,
            "load_parts": LOAD_PARTS,
            "units": "GB/s = 1e9 payload bytes per second",
        },
        "machine": run.machine(),
        "rows": rows,
        "floors": floors,
        "targets": {
            **{f"{r['tier']}_get_gbps": h.check(r["get_gbps"], ">=", TARGETS[r["tier"]]) for r in rows},
            **{f"{r['tier']}_load_gbps": h.check(r["load_gbps"], ">=", TARGETS[r["tier"]]) for r in rows},
            **{f"{r['tier']}_load_parts_gbps": h.check(r["load_parts_gbps"], ">=", TARGETS[r["tier"]]) for r in rows},
        },
        "contention": run.timer.report(blocks=True),
        "runtime_s": run.runtime_s,
    }
    run.finish(result, table=lambda: print_report(result), plot=lambda p: plot(result, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
