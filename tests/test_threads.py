"""kvtier's background threads leave the core an engine pinned its compute thread to."""

from __future__ import annotations

import os
import threading

import pytest

from kvtier.threads import machine_cpus, parse_cpu_list, spread, thread_pool


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
