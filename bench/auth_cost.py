"""What chunk authentication and encryption at rest (issue 15) cost on the load and store paths.

    python bench/auth_cost.py --json bench/results/auth_cost.json [--tokens 256] [--repeats 15]

One chunk of SmolLM2-135M's fp32 layout (30 layers x 3 kv heads x 64 head dim, 45 KiB per token) with
random KV, encoded raw as the tiers store it; timed: ``decode_header`` + ``decode_payload`` of the
encoded bytes (the work a tier does per chunk read, file or network I/O excluded) and ``encode_parts``
(per chunk written), without a secret (xxh3 checksum only), with one (keyed BLAKE3 MAC too), and with
``security.encrypt`` (MAC + AES-256-GCM of the body: the decrypted body is a new copy). Medians
of ``--repeats``; the chunk is in memory (hot caches), so these are the CPU costs alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.chunk import Chunk, decode_header, decode_payload, encode_parts
from kvtier.keys import Namespace, chunk_spans
from kvtier.layout import KVLayout
from kvtier.security import ChunkPolicy, Secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    layout = KVLayout(30, 3, 64)
    ns = Namespace("smollm2-135m-layout", layout)
    tokens = np.arange(args.tokens, dtype=np.uint32)
    span = chunk_spans(ns, tokens, args.tokens)[0]
    chunk = Chunk(span.key, None, ns.digest, layout, tokens, torch.randn(layout.chunk_shape(args.tokens)))
    signing = ChunkPolicy(Secret(b"bench-secret-" + b"x" * 19))
    signing.register(ns.digest, None, layout, args.tokens)
    encrypting = ChunkPolicy(Secret(b"bench-secret-" + b"x" * 19), encrypt=True)
    encrypting.register(ns.digest, None, layout, args.tokens)
    rows = []
    modes = (("no secret (checksum)", None), ("secret (checksum + MAC)", signing), ("secret + encrypt", encrypting))
    for name, policy in modes:
        head, body = encode_parts(chunk, policy=policy)
        data = bytearray(head + bytes(body))
        view = memoryview(data)
        reads, writes = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            header = decode_header(view, policy=policy)
            decode_payload(header, view[header.offset :])
            reads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encode_parts(chunk, policy=policy)
            writes.append(time.perf_counter() - t0)
        read, write = statistics.median(reads), statistics.median(writes)
        rows.append(
            {
                "mode": name,
                "chunk_bytes": len(data),
                "read_ms": read * 1e3,
                "read_gbps": len(data) / read / 1e9,
                "write_ms": write * 1e3,
                "write_gbps": len(data) / write / 1e9,
            }
        )
    print(f"{'mode':<26} {'chunk MB':>9} {'read ms':>8} {'read GB/s':>10} {'write ms':>9} {'write GB/s':>11}")
    for r in rows:
        print(
            f"{r['mode']:<26} {r['chunk_bytes'] / 1e6:>9.1f} {r['read_ms']:>8.2f} {r['read_gbps']:>10.2f} "
            f"{r['write_ms']:>9.2f} {r['write_gbps']:>11.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
