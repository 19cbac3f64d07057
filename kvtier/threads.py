"""kvtier's background threads: where they may run.

An engine may pin its compute thread to one core: vLLM's CPU worker binds
each OpenMP thread, the main one included, to a core of its own
(``VLLM_CPU_OMP_THREADS_BIND``). A thread inherits the affinity of the thread
that starts it, so kvtier's load, store, read and write-behind threads,
started from that main thread, would all share its one core: a lone load of
a 2,560-token hit then ran ~10x slower inside vLLM than in a quiet process,
and every store slowed the forward pass of the thread it shared a core with.

Every long-lived kvtier thread therefore calls :func:`spread_current_thread`
first: it may run on any CPU the machine lets the process use, and the
kernel's scheduler places it. Where affinity cannot be set (not Linux, or a
CPU set that refuses it) the thread keeps what it inherited.

Stores are background work: nothing waits for them but the next request that
could hit. The threads that build and write stored chunks (the vLLM worker's
store thread, the tier stack's write-behind) can therefore run at a lower OS
priority (:func:`lower_current_thread`, ``store_nice`` in the config), so that
on a machine with few cores they take the CPU the engine's forward pass
leaves idle instead of sharing it with the prefill.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

log = logging.getLogger("kvtier")

_CGROUP_CPUS = (Path("/sys/fs/cgroup/cpuset.cpus.effective"), Path("/sys/fs/cgroup/cpuset/cpuset.effective_cpus"))


def parse_cpu_list(text: str) -> set[int]:
    """``"0-3,6,8-9"`` (the kernel's CPU list format) -> {0, 1, 2, 3, 6, 8, 9}; ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return cpus


@cache
def machine_cpus() -> frozenset[int] | None:
    """The CPUs this process may use at all (its cgroup's CPU set, else every online CPU); None off Linux."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    for path in _CGROUP_CPUS:
        try:
            cpus = parse_cpu_list(path.read_text())
        except (OSError, ValueError):
            continue
        if cpus:
            return frozenset(cpus)
    return frozenset(range(os.cpu_count() or 1))


def spread_current_thread() -> None:
    """Let the calling thread run on every CPU of :func:`machine_cpus` (a no-op where that cannot be set)."""
    cpus = machine_cpus()
    if cpus is None:
        return
    try:
        if os.sched_getaffinity(0) != cpus:
            os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a CPU set narrower than the cgroup's says, or a sandbox: keep the inherited one
        log.debug("kvtier thread keeps its inherited CPU affinity: %s", exc)


def lower_current_thread(nice: int) -> None:
    """Add ``nice`` (0-19) to the calling thread's OS niceness, capped at 19 (a no-op for 0 or off Linux).

    Linux keeps a niceness per thread (``setpriority`` on the thread's id), so
    the rest of the process keeps its priority. Raising niceness needs no
    privilege; where it is refused anyway the thread keeps its priority.
    """
    if nice <= 0 or not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.debug("kvtier thread keeps its OS priority: %s", exc)


def spread(target: Callable[[], None], *, nice: int = 0) -> Callable[[], None]:
    """``target`` run after :func:`spread_current_thread` and ``lower_current_thread(nice)``
    (for ``threading.Thread(target=...)``)."""

    def run() -> None:
        spread_current_thread()
        lower_current_thread(nice)
        target()

    return run


def thread_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are spread (see :func:`spread_current_thread`)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=spread_current_thread)
