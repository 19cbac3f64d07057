"""Replay a prefix-block trace through kvtier's eviction policies and Belady's bound.

    python bench/eviction.py --trace FILE [--capacities 0.01,0.02,0.05,0.1,0.2] --json OUT [--plot PNG]
    python bench/eviction.py --ops-bench 1000000 [--policies lru,adaptive] [--json OUT]

Trace: Mooncake format, one JSON object a line with ``timestamp`` (ms),
``input_length`` (tokens) and ``hash_ids`` (one id per 512-token block;
equal ids = the same prefix, so ids form a prefix tree). The last block of
a request holds the remaining ``input_length - 512 * (n - 1)`` tokens.

Each request, in order: its hit is the run of consecutive blocks from the
first that the cache holds (counted in blocks and in tokens); the hit blocks
are read (a prefix hit, as ``CacheEngine.retrieve`` reads them), then the
request's blocks the cache lacks are inserted root first, as
``CacheEngine.store`` does; a block whose parent was refused is refused too
(``TierStack``). Capacity is a share of the trace's distinct blocks; every
block costs 1. The online policies run through
:class:`kvtier.eviction.BudgetIndex`, the very index the ``l1`` tier uses,
with the policy classes the tiers build (``make_policy``).

``belady``: the offline optimum for this cache: MIN with bypass (on a miss,
the block whose next use is farthest away goes, the newcomer included;
never-used-again blocks are not kept), ties going to the deeper block. A
parent is used whenever its child is, so its next use is never later than
the child's: the victim is always a leaf and the cache stays
prefix-closed, so its block hits are exactly its prefix-run hits, and no
policy can hit more blocks (the capacity is in blocks, all of size 1).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvtier.eviction import DEFAULT_POLICY, BudgetIndex, make_admission, make_policy, policy_names

BLOCK_TOKENS = 512
DEFAULT_CAPACITIES = (0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class Request:
    time_s: float
    blocks: tuple[int, ...]
    tokens: tuple[int, ...]  # per block


def load_trace(path: Path) -> list[Request]:
    """The requests of a Mooncake-format JSONL trace; ValueError on a malformed line."""
    requests: list[Request] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ids = tuple(int(h) for h in obj["hash_ids"])
                length = int(obj.get("input_length", BLOCK_TOKENS * len(ids)))
                ts = float(obj.get("timestamp", 0)) / 1000.0
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a trace record ({exc})") from exc
            if not ids:
                continue
            last = length - BLOCK_TOKENS * (len(ids) - 1)
            if not 1 <= last <= BLOCK_TOKENS:  # input_length disagrees with the block count: whole blocks
                last = BLOCK_TOKENS
            requests.append(Request(ts, ids, (BLOCK_TOKENS,) * (len(ids) - 1) + (last,)))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


@dataclass
class Result:
    block_hits: int = 0
    block_refs: int = 0
    token_hits: int = 0
    token_refs: int = 0
    refused: int = 0

    def row(self, policy: str, frac: float, blocks: int) -> dict[str, object]:
        return {
            "policy": policy,
            "capacity_frac": frac,
            "capacity_blocks": blocks,
            "block_hit_rate": self.block_hits / self.block_refs,
            "token_hit_rate": self.token_hits / self.token_refs,
            "admission_refused": self.refused,
        }


def replay(requests: Sequence[Request], capacity: int, policy: str, admission: str = "always") -> Result:
    """Replay through ``BudgetIndex(capacity, make_policy(policy), make_admission(admission))``."""
    index = BudgetIndex(capacity, make_policy(policy, clock=lambda: 0.0), make_admission(admission))
    res = Result()
    for req in requests:
        ids, toks = req.blocks, req.tokens
        m = 0
        while m < len(ids) and ids[m] in index:
            m += 1
        res.block_hits += m
        res.block_refs += len(ids)
        res.token_hits += sum(toks[:m])
        res.token_refs += sum(toks)
        if m:
            index.hit(ids[:m], now=req.time_s)
        refused: set[int] = set()
        for j in range(m, len(ids)):
            key = ids[j]
            parent = ids[j - 1] if j else None
            if key in index:
                continue
            if parent is not None and parent in refused:
                refused.add(key)
                index.sighted(key)
                continue
            if index.insert(key, parent, 1, tokens=toks[j], now=req.time_s) is None:
                refused.add(key)
    res.refused = index.admission_refused
    return res


def belady(requests: Sequence[Request], capacity: int) -> Result:
    """MIN with bypass over blocks of size 1 (see the module docstring)."""
    uses: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        for b in req.blocks:
            uses.setdefault(b, []).append(i)
    cursor = dict.fromkeys(uses, 0)  # index into uses[b] of its next use
    depth: dict[int, int] = {}
    nxt: dict[int, float] = {}  # resident block -> its next use
    heap: list[tuple[float, int, int]] = []  # (-next use, -depth, block), lazily invalidated
    res = Result()
    inf = math.inf

    def advance(b: int, i: int) -> float:
        u = uses[b]
        c = cursor[b]
        while c < len(u) and u[c] <= i:
            c += 1
        cursor[b] = c
        return u[c] if c < len(u) else inf

    for i, req in enumerate(requests):
        ids, toks = req.blocks, req.tokens
        m = 0
        while m < len(ids) and ids[m] in nxt:
            m += 1
        res.block_hits += m
        res.block_refs += len(ids)
        res.token_hits += sum(toks[:m])
        res.token_refs += sum(toks)
        for j in range(m):
            b = ids[j]
            nxt[b] = advance(b, i)
            heapq.heappush(heap, (-nxt[b], -j, b))
        for j in range(m, len(ids)):
            b = ids[j]
            if b in nxt:  # resident below a hole: used now, next use moves on
                nxt[b] = advance(b, i)
                heapq.heappush(heap, (-nxt[b], -depth[b], b))
                continue
            nu = advance(b, i)
            if nu == inf:
                break  # its descendants in this request are never used again either
            if len(nxt) >= capacity:
                while heap and (heap[0][2] not in nxt or -heap[0][0] != nxt[heap[0][2]]):
                    heapq.heappop(heap)
                if not heap or -heap[0][0] <= nu:
                    break  # bypass: the newcomer is the farthest; so are its descendants
                _, _, victim = heapq.heappop(heap)
                del nxt[victim]
            nxt[b] = nu
            depth[b] = j
            heapq.heappush(heap, (-nu, -j, b))
    return res


def run_trace(args: argparse.Namespace) -> dict[str, object]:
    requests = load_trace(args.trace)
    distinct = len({b for r in requests for b in r.blocks})
    caps = [float(c) for c in args.capacities.split(",")]
    for c in caps:
        if not 0 < c <= 1:
            raise SystemExit(f"capacity {c} is not a share in (0, 1]")
    policies = args.policies.split(",") if args.policies else ["lru", "lfu", "arc", "s3fifo", DEFAULT_POLICY]
    for p in policies:
        if p.split("+")[0] not in policy_names():
            raise SystemExit(f"unknown policy {p!r}; known: {', '.join(policy_names())}")
    rows: list[dict[str, object]] = []
    for frac in caps:
        blocks = max(1, round(frac * distinct))
        t0 = time.perf_counter()
        rows.append(belady(requests, blocks).row("belady", frac, blocks))
        timings = {"belady": time.perf_counter() - t0}
        for p in policies:
            name, _, adm = p.partition("+")
            t0 = time.perf_counter()
            rows.append(replay(requests, blocks, name, adm or "always").row(p, frac, blocks))
            timings[p] = time.perf_counter() - t0
        print(
            f"capacity {frac:g} ({blocks} blocks): " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
            file=sys.stderr,
        )
    return {
        "trace": str(args.trace),
        "requests": len(requests),
        "distinct_blocks": distinct,
        "rows": rows,
        "default_policy": DEFAULT_POLICY,
    }


def print_table(out: dict[str, object]) -> None:
    rows = out["rows"]
    assert isinstance(rows, list)
    caps = sorted({r["capacity_frac"] for r in rows})
    names = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["capacity_frac"]): r for r in rows}
    print(f"trace {out['trace']}: {out['requests']} requests, {out['distinct_blocks']} distinct blocks")
    print("block hit rate (token hit rate)")
    print(f"{'policy':<22}" + "".join(f"{c:>16.0%}" for c in caps))
    for n in names:
        cells = "".join(
            f"{by[n, c]['block_hit_rate']:>8.2%} ({by[n, c]['token_hit_rate']:.1%})".rjust(16) for c in caps
        )
        print(f"{n:<22}" + cells)
    d = out["default_policy"]
    print(
        f"{d} / lru:".ljust(22)
        + "".join(f"{by[d, c]['block_hit_rate'] / max(by['lru', c]['block_hit_rate'], 1e-12):>15.2f}x" for c in caps)
    )
    gap = []
    for c in caps:
        lo, hi, x = by["lru", c]["block_hit_rate"], by["belady", c]["block_hit_rate"], by[d, c]["block_hit_rate"]
        gap.append((x - lo) / (hi - lo) if hi > lo else float("nan"))
    print("gap closed:".ljust(22) + "".join(f"{g:>16.0%}" for g in gap))


def plot(out: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    assert isinstance(rows, list)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["capacity_frac"], r["block_hit_rate"]) for r in rows if r["policy"] == name)
        style = "k--" if name == "belady" else "-"
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("capacity (% of distinct blocks)")
    ax.set_ylabel("block hit rate (%)")
    ax.set_title(Path(str(out["trace"])).name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ops_bench(n: int, policies: Sequence[str], chain: int = 32) -> list[dict[str, object]]:
    """Per-operation cost at ``n`` resident chunks: chains of ``chain`` blocks under a full budget.

    Fills the index to ``n`` chunks (the budget), then times hits (a prefix
    of 8 keys of a random resident chain: 8 accesses) and inserts of new
    chains (each insert evicts one leaf), all through ``BudgetIndex``.
    """
    import random

    rows = []
    for name in policies:
        rng = random.Random(1)
        index = BudgetIndex(n, make_policy(name, clock=lambda: 0.0))
        nxt = 0
        chains: list[list[int]] = []
        while len(index.policy) < n:
            keys = list(range(nxt, nxt + chain))
            nxt += chain
            for j, k in enumerate(keys):
                index.insert(k, keys[j - 1] if j else None, 1, tokens=512)
            chains.append(keys)
        ops = 200_000
        t0 = time.perf_counter()
        hits = 0
        for _ in range(ops // 8):
            keys = chains[rng.randrange(len(chains))][:8]
            index.hit(keys)
            hits += 8
        t_hit = (time.perf_counter() - t0) / hits
        t0 = time.perf_counter()
        inserted = 0
        while inserted < ops:
            keys = list(range(nxt, nxt + chain))
            nxt += chain
            for j, k in enumerate(keys):
                index.insert(k, keys[j - 1] if j else None, 1, tokens=512)
            inserted += chain
            chains[rng.randrange(len(chains))] = keys
        t_ins = (time.perf_counter() - t0) / inserted
        row = {"policy": name, "resident": len(index.policy), "access_us": t_hit * 1e6, "insert_us": t_ins * 1e6}
        print(
            f"{name:<10} {row['resident']:>9} resident: access {row['access_us']:.2f} us, "
            f"insert (with eviction) {row['insert_us']:.2f} us"
        )
        rows.append(row)
        del index, chains
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trace", type=Path, help="Mooncake-format JSONL trace")
    ap.add_argument("--capacities", default=",".join(str(c) for c in DEFAULT_CAPACITIES))
    ap.add_argument(
        "--policies",
        default=None,
        help="comma list (default: lru,lfu,arc,s3fifo,adaptive); NAME+second_sight adds admission",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="hit rate vs capacity PNG (default: next to --json)")
    ap.add_argument("--ops-bench", type=int, metavar="N", help="time per-op cost at N resident chunks instead")
    args = ap.parse_args(argv)
    if args.ops_bench:
        rows = ops_bench(args.ops_bench, (args.policies or f"lru,{DEFAULT_POLICY}").split(","))
        if args.json:
            args.json.write_text(json.dumps({"ops_bench": rows}, indent=1) + "\n")
        return 0
    if args.trace is None:
        ap.error("--trace is required (or --ops-bench)")
    try:
        out = run_trace(args)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"eviction bench: {exc}") from exc
    print_table(out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    png = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if png:
        plot(out, png)
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
