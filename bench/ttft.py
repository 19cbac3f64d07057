"""Time to first token with and without kvtier, on the real SmolLM2-135M (fp32, CPU).

    python bench/ttft.py --json bench/results/ttft.json [--prefixes 1024,2048,4096]
                         [--suffix 50] [--repeats 3] [--plot bench/results/ttft.png] [--quick]

For each prefix length P the first prompt is P tokens of real English text
(the GPL-3 from /usr/share/common-licenses, then CPython's LICENSE.txt)
followed by the next ``--suffix`` tokens (suffix A); the hits ask a *second*
prompt with the same prefix and a different suffix B (the ``--suffix`` tokens
after A), as a second question about the same document would. So a hit reuses
the P prefix tokens and must still prefill suffix B. One new token is
generated greedily. Measured (seconds, median of ``--repeats`` after one warm-up):

* ``cold_s``              plain ``model.generate`` of prefix+A, no kvtier
* ``cold_with_kvtier_s``  ``CachedModel.generate`` of prefix+A on an empty cache
                          (lookup + prefill + store into L1; disk write-behind is
                          flushed after the timed region)
* ``hit_l1_s``            ``CachedModel.generate`` of prefix+B, prefix chunks in L1
* ``hit_l2_s``            the same in a fresh process, no L1 tier, chunk files
                          dropped from the page cache first
* ``suffix_only_s``       ``model.generate`` of prefix+B with the prefix's KV
                          already in a DynamicCache (deep-copied outside the timed
                          region): the work no KV cache can remove
* ``retrieve_l1_s``       ``engine.retrieve(..., max_tokens=P, out=bufs)`` from L1
                          into a preallocated, touched [L, 2, H, P, D] buffer
* ``retrieve_l1_alloc_s`` the same without ``out`` (fresh tensors)
* ``retrieve_l2_s``       ``engine.retrieve(..., max_tokens=P, out=bufs)`` from disk
                          in the fresh process, page cache dropped, no L1 tier
* ``floor_s``             P * bytes_per_token / memory-copy bandwidth (a warm
                          256 MiB ``dst.copy_(src)``, best of 5, this run)

Every mode runs with the same fixed torch thread count (``--threads``), in the
worker process too. Engines are kvtier defaults (no ``KVTIER_*`` from the shell)
with ``l2.path`` a fresh temporary directory per measurement, removed at the end,
and ``store_partial=false``; the converted model is reused from the kvtier
config's ``cache_dir``. Harness (flags, quiet-machine timer, result): bench/harness.py.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median, pstdev
from typing import Any

import harness as h
import torch
from harness import GEN, MODEL, CleanTimer, fmt_s

ROW_FIELDS = (
    "prefix_tokens",
    "cold_s",
    "cold_with_kvtier_s",
    "hit_l1_s",
    "hit_l2_s",
    "suffix_only_s",
    "retrieve_l1_s",
    "retrieve_l1_alloc_s",
    "retrieve_l2_s",
    "floor_s",
    "kv_bytes",
    "copy_gbps",
    "hit_tokens",
    "cold_over_hit_l1",
    "retrieve_l1_over_floor",
    "cold_with_kvtier_over_cold",
    "same_first_token",
)
COLUMNS = {
    "prefix": "prefix_tokens",
    "cold": "cold_s",
    "cold+kvtier": "cold_with_kvtier_s",
    "hit L1": "hit_l1_s",
    "hit L2": "hit_l2_s",
    "suffix only": "suffix_only_s",
    "retr L1 out=": "retrieve_l1_s",
    "retr L1 alloc": "retrieve_l1_alloc_s",
    "retr L2": "retrieve_l2_s",
    "floor": "floor_s",
    "KV MB": "kv_bytes",
    "hit tok": "hit_tokens",
    "cold/hitL1": "cold_over_hit_l1",
    "retr/floor": "retrieve_l1_over_floor",
    "kvtier/cold": "cold_with_kvtier_over_cold",
    "same tok": "same_first_token",
}
TARGET_PREFIX = 4096
QUICK = {"prefixes": "256", "suffix": 8, "repeats": 1, "wait_budget": 0.0}


def _engine(ns, chunk_dir: Path, *, memory: bool = True):
    # No partial chunks: every hit run must reuse exactly the P prefix tokens, not the
    # trailing partial chunk (suffix B) that the previous timed hit run stored.
    return h.engine(ns, {"l2.path": str(chunk_dir), "store_partial": False}, memory=memory)


def _out_buffers(layout, num_tokens: int) -> torch.Tensor:
    """One [L, 2, H, num_tokens, D] buffer, allocated and touched once (as an engine's KV pool is)."""
    return torch.zeros(layout.chunk_shape(num_tokens), dtype=layout.torch_dtype)


def _before() -> None:
    gc.collect()


# -- the fresh-process L2 worker ---------------------------------------------------------------------------------


def worker(spec_path: str) -> int:
    """Hidden mode: time hit_l2 and retrieve_l2 against an existing chunk directory; print one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    h.quiet()
    h.fix_threads(spec["threads"])
    from kvtier.adapters.hf import CachedModel
    from kvtier.models import load_model

    model, tokenizer = load_model(Path(spec["model_path"]))
    ids = torch.tensor([spec["ids"]], dtype=torch.long)
    prefix, repeats = spec["prefix"], spec["repeats"]
    timer = CleanTimer(**spec["timer"])
    engine = _engine(h.namespace(model), Path(spec["chunk_dir"]), memory=False)
    [disk] = engine.tiers.tiers  # the disk tier alone
    cached = CachedModel(model, tokenizer, engine)
    residency: dict[str, float | None] = {"before_first_drop": h.resident_fraction(disk.files())}

    def drop() -> None:
        gc.collect()
        disk.drop_page_cache()

    with torch.inference_mode():
        # warm the model's code paths (no kvtier) so the timed runs see a warm process, not a cold interpreter
        h.first_token(model, ids[:, :32])
        drop()
        residency["after_drop"] = h.resident_fraction(disk.files())
        hit_s, hit_all, gen, hit_f = timer.timed(
            "hit_l2", lambda: cached.generate(ids, **GEN), repeats=repeats, before=drop
        )
        bufs = _out_buffers(engine.layout, prefix)
        retr_s, retr_all, res, retr_f = timer.timed(
            "retrieve_l2", lambda: engine.retrieve(ids[0], max_tokens=prefix, out=bufs), repeats=repeats, before=drop
        )
    stats = engine.stats()
    engine.close()
    out = {
        "hit_l2_s": hit_s,
        "hit_l2_all": hit_all,
        "hit_l2_reused": gen.reused_tokens,
        "hit_l2_tiers": gen.tiers,
        "hit_l2_first_token": gen.new_tokens[0],
        "retrieve_l2_s": retr_s,
        "retrieve_l2_all": retr_all,
        "retrieve_l2_tokens": res.num_tokens,
        "retrieve_l2_tiers": res.tiers,
        "residency": residency,
        "invalid_chunks": dict(stats.invalid_chunks),
        "foreign_cores": {"hit_l2": hit_f, "retrieve_l2": retr_f},
        "timer": timer.report(),
    }
    print(json.dumps(out))
    return 0


def run_worker(spec: dict[str, Any], tmp: Path, threads: int) -> dict[str, Any]:
    spec_path = tmp / f"worker-{spec['prefix']}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"L2 worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- one prefix length ---------------------------------------------------------------------------------------------


def measure(
    P: int,
    all_ids: list[int],
    args,
    model,
    tokenizer,
    ns,
    model_path: Path,
    tmp: Path,
    copy_bps: float,
    timer: CleanTimer,
    progress,
) -> tuple[dict[str, Any], dict[str, Any]]:
    from kvtier.adapters.hf import CachedModel

    S, R = args.suffix, args.repeats
    ids_a, ids_b = h.prompt_pair(all_ids, P, S)
    ids = torch.tensor([ids_a], dtype=torch.long)
    hit_ids = torch.tensor([ids_b], dtype=torch.long)
    hit_mask = torch.ones_like(hit_ids)
    base = tmp / f"p{P}"
    diag: dict[str, Any] = {"prefix_tokens": P}
    foreign: dict[str, float | None] = {}
    first: dict[str, int] = {}

    def step(label: str, **post: Any) -> None:
        progress.set_postfix_str(f"P={P} {label}" + "".join(f" {k}={v}" for k, v in post.items()))

    # 1. cold vs cold with kvtier, interleaved so slow drift of the machine hits both alike.
    slot: dict[str, Any] = {}
    cold_times, kv_times, store_times, miss_times, cold_f, kv_f = [], [], [], [], [], []

    def new_engine(tag: str):
        def make() -> None:  # a fresh, empty engine, built outside the timed region
            if "engine" in slot:
                slot.pop("engine").close()
                shutil.rmtree(slot.pop("dir"), ignore_errors=True)
            slot["dir"] = base / tag
            shutil.rmtree(slot["dir"], ignore_errors=True)
            slot["engine"] = _engine(ns, slot["dir"])
            slot["cm"] = CachedModel(model, tokenizer, slot["engine"])
            # what kvtier adds before prefill on a miss: the lookup/retrieve that finds nothing (no side effects)
            t0 = time.perf_counter()
            slot["engine"].retrieve(ids[0], max_tokens=ids.shape[1] - 1)
            miss_times.append(time.perf_counter() - t0)
            gc.collect()

        return make

    with torch.inference_mode():
        for i in range(1 + R):
            warm = i == 0
            tag = "warm-up" if warm else f"{i}/{R}"
            step(f"cold {tag}")
            if warm:
                _before()
                first["cold"] = h.first_token(model, ids)
            else:
                dt, first["cold"], f = timer.once(f"P{P} cold#{i}", lambda: h.first_token(model, ids), _before)
                cold_times.append(dt)
                cold_f.append(f)
            progress.update()
            step(f"cold+kvtier {tag}", cold=fmt_s(cold_times[-1]) if cold_times else "-")
            make = new_engine(f"cold{i}")
            if warm:
                make()
                gen = slot["cm"].generate(ids, **GEN)
            else:
                dt, gen, f = timer.once(f"P{P} cold_with_kvtier#{i}", lambda: slot["cm"].generate(ids, **GEN), make)
                kv_times.append(dt)
                kv_f.append(f)
                store_times.append(gen.total_s - gen.ttft_s)
            first["cold_with_kvtier"] = gen.new_tokens[0]
            if gen.reused_tokens:
                raise AssertionError(f"cold_with_kvtier reused {gen.reused_tokens} tokens: the cache was not empty")
            slot["engine"].flush()  # disk write-behind, outside the timed region
            os.sync()  # and its dirty pages, so kernel writeback does not run during the next timing
            progress.update()
        engine, cm = slot["engine"], slot["cm"]  # the last one: its L1 and its disk chunks serve the hits
        chunk_dir = slot["dir"]
        l1 = engine.tiers.names[0]
        foreign["cold"] = max((f for f in cold_f if f is not None), default=None)
        foreign["cold_with_kvtier"] = max((f for f in kv_f if f is not None), default=None)
        diag["cold_all"] = cold_times
        diag["cold_with_kvtier_all"] = kv_times
        diag["kvtier_store_s"] = median(store_times)  # Generation.total_s - ttft_s: the store after generate
        diag["kvtier_miss_retrieve_s"] = median(miss_times)
        # kvtier's own work on a miss, measured directly (immune to the run-to-run noise of a long prefill)
        diag["kvtier_miss_overhead_over_cold"] = (median(store_times) + median(miss_times)) / median(cold_times)
        diag["cold_cv"] = (pstdev(cold_times) / mean(cold_times)) if len(cold_times) > 1 else None
        diag["cold_with_kvtier_over_cold_paired"] = [round(k / c, 4) for k, c in zip(kv_times, cold_times, strict=True)]
        diag["stored_chunks"] = gen.stored.stored_chunks

        # 2. L1 hit: the same prefix with another suffix.
        step("hit L1")
        hit_l1, hit_all, hit, foreign["hit_l1"] = timer.timed(
            f"P{P} hit_l1", lambda: cm.generate(hit_ids, **GEN), repeats=R, before=_before
        )
        first["hit_l1"] = hit.new_tokens[0]
        diag["hit_l1_all"] = hit_all
        diag["hit_l1_ttft_s"] = hit.ttft_s
        diag["hit_l1_tiers"] = hit.tiers
        if hit.tier_tokens.get(l1, 0) != hit.reused_tokens:
            raise AssertionError(f"L1 hit came from {hit.tiers}, not from {l1} only")
        progress.update()

        # 3. retrieve from L1, into preallocated buffers and into fresh tensors.
        step("retrieve L1")
        bufs = _out_buffers(engine.layout, P)
        retr_l1, retr_all, res, foreign["retrieve_l1"] = timer.timed(
            f"P{P} retrieve_l1", lambda: engine.retrieve(ids[0], max_tokens=P, out=bufs), repeats=R, before=_before
        )
        if res.num_tokens != P or res.layers[0].data_ptr() != bufs.data_ptr():
            raise AssertionError(
                f"retrieve into out= returned {res.num_tokens} tokens ({res.tiers}), expected {P} in out"
            )
        retr_alloc, retr_alloc_all, res_alloc, foreign["retrieve_l1_alloc"] = timer.timed(
            f"P{P} retrieve_l1_alloc", lambda: engine.retrieve(ids[0], max_tokens=P), repeats=R, before=_before
        )
        diag["retrieve_l1_all"] = retr_all
        diag["retrieve_l1_alloc_all"] = retr_alloc_all
        progress.update()

        # 4. suffix only: the prefix's KV already in a DynamicCache.
        step("suffix-only (prefix prefill)")
        prefix_cache = model(ids[:, :P], use_cache=True).past_key_values
        # sanity: what kvtier hands back is the KV a prefix-only prefill computes
        diag["kv_max_abs_diff"] = max(
            max(
                (res_alloc.layers[i][0] - prefix_cache.layers[i].keys[0]).abs().max().item(),
                (res_alloc.layers[i][1] - prefix_cache.layers[i].values[0]).abs().max().item(),
            )
            for i in range(engine.layout.num_layers)
        )
        res = res_alloc = None
        holder: dict[str, Any] = {}

        def fresh_copy() -> None:
            holder.clear()
            holder["cache"] = copy.deepcopy(prefix_cache)
            gc.collect()

        step("suffix-only")
        suffix_s, suffix_all, out, foreign["suffix_only"] = timer.timed(
            f"P{P} suffix_only",
            lambda: model.generate(hit_ids, attention_mask=hit_mask, past_key_values=holder["cache"], **GEN),
            repeats=R,
            before=fresh_copy,
        )
        first["suffix_only"] = int(out[0, -1])
        diag["suffix_only_all"] = suffix_all
        holder.clear()
        prefix_cache = out = bufs = None  # free the KV before the next stage
        progress.update()

        engine.close()  # flushes write-behind; L1 gone
        slot.clear()
    os.sync()  # dirty pages cannot be dropped from the page cache: write them out first

    # 5. L2 in a fresh process.
    step("L2 worker (fresh process)")
    spec = {"model_path": str(model_path), "chunk_dir": str(chunk_dir), "ids": ids_b, "prefix": P, "repeats": R}
    l2 = run_worker(spec | {"threads": args.threads, "timer": timer.settings()}, tmp, args.threads)
    timer.absorb(l2["timer"], f"P{P} ")
    first["hit_l2"] = l2["hit_l2_first_token"]
    if l2["retrieve_l2_tokens"] != P:
        raise AssertionError(f"L2 retrieve returned {l2['retrieve_l2_tokens']} tokens ({l2['retrieve_l2_tiers']})")
    if l2["hit_l2_reused"] != hit.reused_tokens:
        raise AssertionError(f"L2 hit reused {l2['hit_l2_reused']} tokens, L1 hit {hit.reused_tokens}")
    foreign.update(l2["foreign_cores"])
    diag.update({k: v for k, v in l2.items() if k not in ("hit_l2_s", "retrieve_l2_s", "foreign_cores", "timer")})
    progress.update()
    shutil.rmtree(base, ignore_errors=True)

    kv_bytes = P * engine.layout.bytes_per_token
    floor = kv_bytes / copy_bps
    cold_s, kv_s = median(cold_times), median(kv_times)
    # first prompt (prefix+A) across its modes, second prompt (prefix+B) across its modes
    same = first["cold"] == first["cold_with_kvtier"] and first["hit_l1"] == first["hit_l2"] == first["suffix_only"]
    diag["first_tokens"] = first
    diag["foreign_cores_max"] = {k: (None if v is None else round(v, 3)) for k, v in foreign.items()}
    row = {
        "prefix_tokens": P,
        "cold_s": cold_s,
        "cold_with_kvtier_s": kv_s,
        "hit_l1_s": hit_l1,
        "hit_l2_s": l2["hit_l2_s"],
        "suffix_only_s": suffix_s,
        "retrieve_l1_s": retr_l1,
        "retrieve_l1_alloc_s": retr_alloc,
        "retrieve_l2_s": l2["retrieve_l2_s"],
        "floor_s": floor,
        "kv_bytes": kv_bytes,
        "copy_gbps": copy_bps / 1e9,
        "hit_tokens": hit.reused_tokens,
        "cold_over_hit_l1": h.ratio(cold_s, hit_l1),
        "retrieve_l1_over_floor": h.ratio(retr_l1, floor),
        "cold_with_kvtier_over_cold": h.ratio(kv_s, cold_s),
        "same_first_token": same,
    }
    assert tuple(row) == ROW_FIELDS
    return row, diag


# -- reporting -----------------------------------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]], diags: list[dict[str, Any]]) -> dict[str, Any]:
    at = next((r for r in rows if r["prefix_tokens"] == TARGET_PREFIX), None)
    note = None
    if at is None:
        at = max(rows, key=lambda r: r["prefix_tokens"])
        note = f"{TARGET_PREFIX} tokens not measured; evaluated at {at['prefix_tokens']} (not the target length)"
    out: dict[str, Any] = {
        "prefix_tokens": at["prefix_tokens"],
        "cold_over_hit_l1": h.check(at["cold_over_hit_l1"], ">=", 30.0),
        "retrieve_l1_over_floor": h.check(at["retrieve_l1_over_floor"], "<=", 2.0),
        "cold_with_kvtier_over_cold": h.check(at["cold_with_kvtier_over_cold"], "<=", 1.03),
    }
    out["all_pass"] = h.all_pass(out) and note is None
    # The 3 % bound is finer than the run-to-run noise of a long CPU prefill on a VM: say how fine the
    # measurement is, and what kvtier's own work on a miss (lookup + store, timed directly) costs.
    diag = next(d for d in diags if d["prefix_tokens"] == at["prefix_tokens"])
    cv, n = diag.get("cold_cv"), len(diag.get("cold_all", []))
    se = cv * (2 / n) ** 0.5 if cv is not None and n > 1 else None  # std error of a ratio of two n-run means
    out["cold_with_kvtier_over_cold"]["evidence"] = {
        "cold_cv": cv,
        "ratio_std_error": se,
        "resolvable_at_3pct": se is not None and 2 * se < 0.03,
        "paired_ratios": diag.get("cold_with_kvtier_over_cold_paired"),
        "kvtier_miss_overhead_over_cold": diag.get("kvtier_miss_overhead_over_cold"),
    }
    if note:
        out["note"] = note
    return out


def print_report(rows: list[dict[str, Any]], tgt: dict[str, Any]) -> None:
    con = h.console(160)
    h.print_table(con, f"kvtier TTFT, {MODEL} fp32, {torch.get_num_threads()} threads (median)", COLUMNS, rows)
    con.print(f"copy bandwidth: {rows[0]['copy_gbps']:.2f} GB/s (256 MiB dst.copy_(src), best of 5)")
    con.print(f"targets at {tgt['prefix_tokens']} tokens:")
    h.print_targets(con, tgt)
    ev = tgt["cold_with_kvtier_over_cold"]["evidence"]
    if ev["cold_cv"] is not None:
        con.print(
            f"  (cold runs vary by {100 * ev['cold_cv']:.1f} % (CV); the ratio's std error is "
            f"{100 * ev['ratio_std_error']:.1f} %, {'fine' if ev['resolvable_at_3pct'] else 'too coarse'} for a 3 % "
            f"bound. kvtier's own work on a miss, timed directly (lookup + store): "
            f"{100 * ev['kvtier_miss_overhead_over_cold']:.2f} % of cold)"
        )
    if "note" in tgt:
        con.print(f"  [yellow]{tgt['note']}[/yellow]")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    series = [
        ("cold (no kvtier)", "cold_s", "#9e9e9e"),
        ("hit L1", "hit_l1_s", "#1f77b4"),
        ("hit L2 (disk, page cache dropped)", "hit_l2_s", "#ff7f0e"),
        ("suffix only (prefix KV given)", "suffix_only_s", "#2ca02c"),
    ]
    title = f"kvtier TTFT — {MODEL} fp32 on CPU, {torch.get_num_threads()} threads"
    with h.figure(path, figsize=(max(6, 2.2 * len(rows) + 2), 4.8)) as (ax,):
        labels = [f"{r['prefix_tokens']} (+{r['hit_tokens'] - r['prefix_tokens'] + 1})" for r in rows]
        h.grouped_bars(ax, labels, [(n, [r[k] for r in rows], c) for n, k, c in series], annotate=fmt_s)
        ax.set_yscale("log")
        ax.set_xlabel("prefix tokens (+ suffix tokens)")
        ax.set_ylabel("time to first token, s (log)")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)


# -- main ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    parser = h.BenchParser(__doc__, ("plot", *h.MODEL_FLAGS), quick=QUICK, positive=("suffix", "repeats"))
    parser.add_argument("--prefixes", default="1024,2048,4096", help="comma-separated prefix lengths (tokens)")
    parser.add_argument("--suffix", type=int, default=50, help="suffix tokens after the prefix (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, median reported")
    args = parser.parse_args(argv)
    prefixes = h.parse_ints(args.prefixes)

    run = h.Run(args, "ttft")
    timer, tmp = run.timer, run.tmp
    model, tokenizer, model_path, ns = h.load_bench_model(args)
    all_ids, sources = h.real_tokens(tokenizer, max(prefixes) + 2 * args.suffix)
    copy_bps = h.copy_bandwidth()
    print(f"{len(all_ids)} tokens of text from {', '.join(sources)}; copy {copy_bps / 1e9:.2f} GB/s", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    diags: list[dict[str, Any]] = []
    try:
        with h.progress((2 * (1 + args.repeats) + 4) * len(prefixes), "ttft") as progress:
            for P in prefixes:
                row, diag = measure(P, all_ids, args, model, tokenizer, ns, model_path, tmp, copy_bps, timer, progress)
                rows.append(row)
                diags.append(diag)
                h.check_threads(args.threads)
    finally:
        run.remove_tmp()

    tgt = targets(rows, diags)
    result = {
        "benchmark": "ttft",
        "model": MODEL,
        "model_path": str(model_path),
        "settings": {
            "prefixes": prefixes,
            "suffix_tokens": args.suffix,
            "repeats": args.repeats,
            "warmup": 1,
            "max_new_tokens": GEN["max_new_tokens"],
            "text_sources": sources,
            "retrieve_max_tokens": "prefix_tokens (retrieve_* time the P-token prefix, as floor_s does)",
        },
        "machine": run.machine(),
        "rows": rows,
        "targets": tgt,
        "diagnostics": diags,
        "contention": timer.report(),
        "runtime_s": run.runtime_s,
    }
    run.finish(result, table=lambda: print_report(rows, tgt), plot=lambda p: plot(rows, p))
    bad = [r["prefix_tokens"] for r in rows if not r["same_first_token"]]
    if bad:
        print(f"WARNING: the first generated token differs between modes at prefix {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
