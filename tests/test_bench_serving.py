"""bench/serving_stats.py: the serving benchmark's pure helpers, on exact inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from serving_stats import (
    Load,
    Prefetch,
    Request,
    arrival_offsets,
    gaps,
    gaps_around,
    kvtier_loads,
    lmcache_loads,
    lmcache_prefetches,
    load_summary,
    round_robin,
    summarize_level,
)

KVTIER_LOG = """\
INFO 17:00:01 [kvtier.vllm] request chatcmpl-a: loaded 0 tokens [0, 0) from kvtier (none) in 0.4 ms
INFO 17:00:02 [kvtier.vllm] request chatcmpl-b: loaded 2560 tokens [0, 2560) from kvtier (l2) in 812.5 ms
INFO 17:00:03 [kvtier.vllm] request chatcmpl-c: loaded 256 tokens [2304, 2560) from kvtier (l1+l2) in 10.0 ms
"""
LMCACHE_LOG = """\
[2026-12-03 17:00:00,001] LMCache INFO: Prefetch request completed (L1+L2): 10/10 retained keys (0 L1, 10 L2) \
in 295.5 ms (external_request_id=chatcmpl-x, prefetch_request_id=1)
[2026-12-03 17:00:00,002] LMCache INFO: Prefetch request completed (L1+L2): 1/1 retained keys (1 L1, 0 L2) in 3.8 ms
[2026-12-03 17:00:00,300] LMCache INFO: Retrieved 2560 tokens in 0.033 seconds (engine_driven_transfer.py:515)
[2026-12-03 17:00:00,400] LMCache INFO: Retrieved 0 tokens in 0.001 seconds
"""


def test_kvtier_loads_skip_misses_and_keep_tiers():
    assert kvtier_loads(KVTIER_LOG) == [Load(2560, 0.8125, "l2"), Load(256, 0.01, "l1+l2")]


def test_lmcache_loads_and_prefetches():
    assert lmcache_loads(LMCACHE_LOG) == [Load(2560, 0.033, "lmcache")]
    assert lmcache_prefetches(LMCACHE_LOG) == [Prefetch(0, 10, 0.2955), Prefetch(1, 0, 0.0038)]


def test_load_summary_counts_bytes_over_seconds():
    s = load_summary([Load(2560, 0.5, "l2"), Load(2560, 0.5, "l1")], bytes_per_token=46080)
    assert s["load_tokens"] == 5120
    assert s["load_bytes"] == 5120 * 46080
    assert s["load_gbps"] == pytest.approx(5120 * 46080 / 1.0 / 1e9)
    assert s["load_sources"] == ["l1", "l2"]
    assert load_summary([], 46080)["load_gbps"] is None


def test_gaps_around_splits_by_when_a_gap_ended():
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 10.0, 11.0, 20.0]
    g = gaps_around(times, start=4.5, end=11.0, skip=1)
    assert g.baseline == [1.0, 1.0, 1.0]  # gaps ending at 2, 3, 4 (the one ending at 1 skipped)
    assert g.window == [5.0, 1.0, 1.0]  # ending at 9, 10, 11; the one ending at 20 is past the window
    assert g.p50_s == 1.0 and g.max_s == 5.0
    assert gaps([1.0, 1.5, 3.0]) == [0.5, 1.5]


def test_arrivals_and_order():
    assert arrival_offsets(4, 0.5) == [0.0, 2.0, 4.0, 6.0]
    assert round_robin(2, 2) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    with pytest.raises(ValueError):
        arrival_offsets(3, 0)


def test_summarize_level_uses_returning_rounds_and_the_span():
    reqs = [
        Request(0, 0, sent=0.0, ttft_s=4.0, done=5.0, completion_tokens=3, token_times=(4.0, 4.5, 5.0)),
        Request(1, 0, sent=1.0, ttft_s=6.0, done=8.0, completion_tokens=3, token_times=(7.0, 7.5, 8.0)),
        Request(0, 1, sent=8.0, ttft_s=1.0, done=10.0, completion_tokens=3, token_times=(9.0, 9.5, 10.0)),
        Request(1, 1, sent=9.0, ttft_s=None, done=None, completion_tokens=0, token_times=(), error="boom"),
    ]
    s = summarize_level(reqs)
    assert s["ttft_mean_s"] == 1.0 and s["requests_returning"] == 1
    assert s["ttft_round0_mean_s"] == 5.0
    assert s["itl_p50_s"] == 0.5
    assert s["output_tokens"] == 9 and s["span_s"] == 10.0 and s["output_tokens_per_sec"] == 0.9
    assert s["requests"] == 4 and s["errors"] == 1
