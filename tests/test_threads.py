"""kvtier's background threads leave the core an engine pinned its compute thread to."""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvtier.threads import lower_current_thread, machine_cpus, parse_cpu_list, spread, thread_pool


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,6,8-9\n") == {0, 1, 2, 3, 6, 8, 9}
    assert parse_cpu_list("5") == {5}
    for bad in ("3-1", "x", "-2"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_threads_started_from_a_pinned_thread_run_on_every_cpu() -> None:
    cpus = machine_cpus()
    assert cpus is not None and len(cpus) >= 2
    seen: dict[str, set[int]] = {}

    def pinned_engine_thread() -> None:  # what vLLM does to its main thread: one core
        os.sched_setaffinity(0, {min(cpus)})
        plain = threading.Thread(target=lambda: seen.setdefault("plain", os.sched_getaffinity(0)))
        plain.start()
        plain.join()
        spread_thread = threading.Thread(target=spread(lambda: seen.setdefault("spread", os.sched_getaffinity(0))))
        spread_thread.start()
        spread_thread.join()
        with thread_pool(1, "test") as pool:
            seen["pool"] = pool.submit(os.sched_getaffinity, 0).result()

    t = threading.Thread(target=pinned_engine_thread)
    t.start()
    t.join()
    assert seen["plain"] == {min(cpus)}  # inherited: why kvtier's threads must spread themselves
    assert seen["spread"] == set(cpus)
    assert seen["pool"] == set(cpus)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread niceness is Linux's")
def test_store_threads_run_niced_and_leave_the_rest_of_the_process_alone() -> None:
    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice_of_this_thread()
    seen: dict[str, int] = {}
    niced = threading.Thread(target=spread(lambda: seen.setdefault("niced", nice_of_this_thread()), nice=5))
    plain = threading.Thread(target=spread(lambda: seen.setdefault("plain", nice_of_this_thread())))
    for t in (niced, plain):
        t.start()
        t.join()
    assert seen == {"niced": min(19, base + 5), "plain": base}
    assert nice_of_this_thread() == base  # the caller (the engine's thread) keeps its priority
    lower_current_thread(0)  # 0: nothing changes
    assert nice_of_this_thread() == base


def test_the_tier_stacks_write_behind_runs_at_the_configured_niceness(tmp_path) -> None:
    from kvtier.config import load_config
    from kvtier.storage import TierAccess, build_tiers

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("per-thread niceness is Linux's")
    config = load_config(overrides={"l2.path": str(tmp_path / "l2"), "node.enabled": False, "store_nice": 7})
    stack = build_tiers(config, TierAccess.shared())
    stack.start()
    try:
        assert stack._writer is not None
        tid = stack._writer.native_id
        assert tid is not None
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        deadline = time.monotonic() + 10  # the thread lowers itself once it runs: wait for it to have started
        while os.getpriority(os.PRIO_PROCESS, tid) == base and time.monotonic() < deadline:
            time.sleep(0.001)
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, base + 7)
    finally:
        stack.close()
