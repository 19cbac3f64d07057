"""Write a synthetic Mooncake-format prefix trace (for checking that eviction policies generalise).

    python bench/make_trace.py --out trace.jsonl [--seed 7] [--sessions 3000] [--rate 4] ...

The workload is a mix, each part with its own parameters:

* *shared documents*: ``--docs`` documents (``--doc-blocks`` blocks each,
  geometric around the mean) whose popularity follows a Zipf law
  (``--zipf``) that drifts: every ``--drift-s`` seconds the ranking is
  reshuffled in part, so what was hot goes cold;
* *sessions*: each new session (Poisson, ``--rate`` per second) opens on a
  shared document with probability ``--doc-share``, else on a private
  prompt; it lasts a geometric number of turns (mean ``--turns``), each
  turn extends the previous prompt by a few blocks (its reply and the new
  message), after a lognormal think time (median ``--think-s``);
* the last block of every prompt is partial (so it is never reused exactly).

Block ids are assigned so that equal ids mean equal prefixes (a prefix tree).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from pathlib import Path

BLOCK = 512


def generate(args: argparse.Namespace) -> list[dict[str, object]]:
    rng = random.Random(args.seed)
    next_id = 0
    children: dict[tuple[int | None, object], int] = {}

    def block(parent: int | None, label: object) -> int:
        nonlocal next_id
        k = (parent, label)
        if k not in children:
            children[k] = next_id
            next_id += 1
        return children[k]

    def chain(parent: int | None, labels: list[object]) -> list[int]:
        out = []
        for lab in labels:
            parent = block(parent, lab)
            out.append(parent)
        return out

    docs = [
        chain(None, [("doc", d, j) for j in range(max(1, int(rng.expovariate(1 / args.doc_blocks)) + 1))])
        for d in range(args.docs)
    ]
    order = list(range(args.docs))
    weights = [1 / (r + 1) ** args.zipf for r in range(args.docs)]
    events: list[tuple[float, int, int]] = []  # (time, session, turn)
    sessions: dict[int, list[int]] = {}
    turns_left: dict[int, int] = {}
    t = 0.0
    for s in range(args.sessions):
        t += rng.expovariate(args.rate)
        heapq.heappush(events, (t, s, 0))
    out: list[dict[str, object]] = []
    last_drift = 0.0
    while events:
        t, s, turn = heapq.heappop(events)
        while t - last_drift > args.drift_s:  # part of the popularity ranking is reshuffled
            last_drift += args.drift_s
            k = max(2, args.docs // 4)
            idx = rng.sample(range(args.docs), k)
            vals = [order[i] for i in idx]
            rng.shuffle(vals)
            for i, v in zip(idx, vals, strict=True):
                order[i] = v
        if turn == 0:
            if rng.random() < args.doc_share:
                d = order[rng.choices(range(args.docs), weights)[0]]
                base = docs[d] + chain(docs[d][-1], [("q", s, j) for j in range(rng.randint(1, 3))])
            else:
                base = chain(
                    None, [("p", s, j) for j in range(max(1, int(rng.expovariate(1 / args.prompt_blocks)) + 1))]
                )
            sessions[s] = base
            turns_left[s] = max(1, int(rng.expovariate(1 / max(args.turns - 1, 1e-9)) + 1)) if args.turns > 1 else 1
        else:
            sessions[s] = sessions[s] + chain(sessions[s][-1], [("t", s, turn, j) for j in range(rng.randint(1, 4))])
        ids = sessions[s]
        tail = block(ids[-1], ("tail", s, turn))  # the partial last block: this request's own
        length = BLOCK * len(ids) + rng.randint(1, BLOCK - 1)
        record = {"timestamp": int(t * 1000), "input_length": length, "output_length": 64, "hash_ids": [*ids, tail]}
        out.append(record)
        turns_left[s] -= 1
        if turns_left[s] > 0:
            think = rng.lognormvariate(math.log(args.think_s), args.think_sigma)
            heapq.heappush(events, (t + think, s, turn + 1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sessions", type=int, default=2500)
    ap.add_argument("--rate", type=float, default=3.0, help="new sessions per second")
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--doc-blocks", type=float, default=12.0)
    ap.add_argument("--zipf", type=float, default=0.9)
    ap.add_argument("--drift-s", type=float, default=200.0)
    ap.add_argument("--doc-share", type=float, default=0.5)
    ap.add_argument("--prompt-blocks", type=float, default=6.0)
    ap.add_argument("--turns", type=float, default=3.0)
    ap.add_argument("--think-s", type=float, default=40.0)
    ap.add_argument("--think-sigma", type=float, default=1.0)
    args = ap.parse_args()
    reqs = generate(args)
    with open(args.out, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    print(f"{args.out}: {len(reqs)} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
