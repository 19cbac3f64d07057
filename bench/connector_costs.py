"""What the vLLM connector costs per request outside vLLM: how long a finished request's blocks stay held by its
store, and what a scheduler-side lookup costs with populated tiers.

    python bench/connector_costs.py [--json PATH] [--stores 6] [--requests 60]

* ``store``: the worker side (``WorkerSide``, SmolLM2-135M's layout: 30 layers,
  3 KV heads, head dim 64, fp32, vLLM-CPU's block packing with 128-token
  blocks) with l1, a node tier (its own folder under ``/dev/shm``) and an l2
  folder stores ``--stores`` finished 1,577-token requests (1,561 prompt
  tokens and 16 answer tokens, 13 blocks): ``held_ms`` from the store's queueing
  to the moment vLLM may free the blocks (``take_finished`` reports it),
  ``landed_ms`` until every tier has it (``flush``). Medians after the first.
* ``lookup``: ``--requests`` such requests stored through the worker side
  (a 2-layer layout: a lookup reads only the tiers' indexes), then the
  scheduler side's ``matched`` of a cold 1,561-token prompt (255 partial-chunk
  candidates) and of a stored one; median of 20. vLLM asks this of the waiting
  queue's head every step until its blocks fit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvtier.adapters.vllm.compat import RequestView
from kvtier.adapters.vllm.metadata import StoreOp
from kvtier.adapters.vllm.paged import CANDIDATES, probe_layout
from kvtier.adapters.vllm.scheduler import SchedulerSide
from kvtier.adapters.vllm.settings import ConnectorSettings
from kvtier.adapters.vllm.worker import WorkerSide
from kvtier.config import load_config
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

BS, PROMPT, ANSWER = 128, 1561, 16
VIEW = CANDIDATES["cpu-k-transposed"]


class _Request:
    """The attributes of a vLLM ``Request`` that ``RequestView`` reads."""

    def __init__(self, req_id: str, tokens: list[int]) -> None:
        self.request_id, self.all_token_ids, self.cache_salt = req_id, tokens, None
        self.num_prompt_tokens, self.num_computed_tokens = len(tokens), 0
        self.lora_request, self.mm_features, self.prompt_embeds = None, [], None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def _sides(root: Path, layers: int, heads: int, head_dim: int, blocks: int) -> tuple[ConnectorSettings, WorkerSide]:
    def write(key, value, layer, slots):  # vLLM-CPU's cache-write kernel for this packing
        k, v = VIEW(layer, heads, head_dim)
        k[slots // BS, :, slots % BS] = key
        v[slots // BS, :, slots % BS] = value

    config = load_config(
        env={},
        overrides={
            "cache_dir": str(root),
            "l1.max_bytes": "4GB",
            "l2.path": str(root / "l2"),
            "node.enabled": "true",
            "node.path": str(root / "node"),
            "node.max_bytes": "4GB",
        },
    )
    settings = ConnectorSettings(config, Namespace("bench", KVLayout(layers, heads, head_dim)), BS, None)
    worker = WorkerSide(settings)
    worker.layers = [torch.randn(blocks, heads, BS, 2 * head_dim) for _ in range(layers)]
    worker.paged = probe_layout(worker.layers[0], heads, head_dim, BS, write)
    return settings, worker


def _op(i: int) -> StoreOp:
    tokens = list(range(i * 10_000, i * 10_000 + PROMPT + ANSWER))
    return StoreOp(f"r{i}", tokens, list(range(1, 14)), None, True, PROMPT)


def store_costs(stores: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir="/dev/shm"))
    try:
        _, worker = _sides(root, 30, 3, 64, 33)
        held, landed = [], []
        for i in range(stores):
            t0 = time.perf_counter()
            worker.store(_op(i))
            while not worker.take_finished()[0]:
                time.sleep(0.0005)
            held.append(time.perf_counter() - t0)
            worker.flush(60)
            landed.append(time.perf_counter() - t0)
        worker.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "held_ms": 1e3 * statistics.median(held[1:]),
        "landed_ms": 1e3 * statistics.median(landed[1:]),
        "held_all_ms": [round(1e3 * t, 1) for t in held],
    }


def lookup_costs(requests: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir="/dev/shm"))
    try:
        settings, worker = _sides(root, 2, 1, 8, 64)
        for i in range(requests):
            worker.store(_op(i))
        worker.flush(120)
        scheduler = SchedulerSide(settings)

        def median_ms(tokens: list[int]) -> tuple[tuple[int, bool], float]:
            times = []
            for j in range(20):
                view = RequestView(_Request(f"q{j}", tokens))
                t0 = time.perf_counter()
                got = scheduler.matched(view, 0)
                times.append(time.perf_counter() - t0)
            return got, 1e3 * statistics.median(times)

        miss, miss_ms = median_ms(list(range(900_000, 900_000 + PROMPT)))
        hit, hit_ms = median_ms(_op(0).tokens[: PROMPT + ANSWER] + [1] * 23)
        scheduler.close()
        worker.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"requests": requests, "miss_ms": miss_ms, "miss": miss, "hit_ms": hit_ms, "hit": hit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--stores", type=int, default=6)
    p.add_argument("--requests", type=int, default=60)
    args = p.parse_args(argv)
    out = {"store": store_costs(args.stores), "lookup": lookup_costs(args.requests)}
    s, lk = out["store"], out["lookup"]
    n = PROMPT + ANSWER
    print(f"store of a {n}-token request: blocks held {s['held_ms']:.1f} ms, landed {s['landed_ms']:.1f} ms")
    print(
        f"scheduler lookup, {lk['requests']} requests stored: miss {lk['miss_ms']:.2f} ms {lk['miss']}, "
        f"hit {lk['hit_ms']:.2f} ms {lk['hit']}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
