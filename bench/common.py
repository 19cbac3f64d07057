"""Helpers shared by the kvtier benchmarks: real text, memory bandwidth, page-cache residency, machine info.

Nothing here downloads anything or ships text of its own: the benchmark text is
read from files every Debian machine (and every CPython install) already has.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import median

import torch

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def text_sources() -> list[Path]:
    """Real English text available offline: the GPL-3 (Debian), then CPython's LICENSE.txt."""
    candidates = [GPL3, Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    return [p for p in candidates if p.is_file()]


def real_tokens(tokenizer, min_tokens: int) -> tuple[list[int], list[str]]:
    """At least ``min_tokens`` token ids of real English text, tokenized once.

    Texts from :func:`text_sources` are concatenated in order (cycling through
    them again only if all of them together are still too short). Returns the
    ids and the names of the files used.
    """
    sources = text_sources()
    if not sources:
        raise RuntimeError(
            "no offline text found (neither /usr/share/common-licenses/GPL-3 nor the stdlib LICENSE.txt)"
        )
    texts: list[str] = []
    used: list[str] = []
    # Cheap over-estimate of what is needed: ~3 characters per token for English with a BPE vocabulary.
    i = 0
    while True:
        path = sources[i % len(sources)]
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        used.append(str(path))
        i += 1
        if sum(len(t) for t in texts) >= 3 * min_tokens or i >= 64:
            ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
            if len(ids) >= min_tokens:
                return list(ids), used
            if i >= 64:
                raise RuntimeError(f"could not assemble {min_tokens} tokens of text (got {len(ids)})")


def copy_bandwidth(nbytes: int = 256 << 20, tries: int = 5) -> tuple[float, float]:
    """Memory-copy bandwidth in bytes/s: ``dst.copy_(src)`` of warm float32 tensors, best of ``tries``.

    Bytes counted once (what is copied), not read + write. Returns (bytes_per_s, best_seconds).
    """
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32)
    dst = torch.empty(n, dtype=torch.float32)
    src.uniform_()  # touch every page of both
    dst.zero_()
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return n * 4 / best, best


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 1, before: Callable[[], object] | None = None):
    """Run ``fn`` ``warmup`` + ``repeats`` times; return (median seconds, all timed seconds, last result).

    ``before`` runs before every call, outside the timed region (cache drops, copies, gc).
    """
    times: list[float] = []
    result = None
    for i in range(warmup + repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return median(times), times, result


# -- page-cache residency (mincore) ----------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(paths: Iterable[Path]) -> float | None:
    """Fraction of the files' pages that sit in the page cache (via mincore), or None if it cannot tell."""
    page = mmap.PAGESIZE
    total = resident = 0
    try:
        for path in paths:
            size = os.path.getsize(path)
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr in (None, _MAP_FAILED):
                    return None
                try:
                    pages = (size + page - 1) // page
                    vec = (ctypes.c_ubyte * pages)()
                    if _libc.mincore(addr, size, vec) != 0:
                        return None
                    total += pages
                    resident += sum(b & 1 for b in vec)
                finally:
                    _libc.munmap(addr, size)
            finally:
                os.close(fd)
    except OSError:
        return None
    return resident / total if total else None


# -- machine description ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int) -> dict[str, object]:
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "transformers_version": transformers.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mem_total_gib": mem_total_gib(),
    }


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def fmt_s(x: float | None) -> str:
    """Seconds in a readable unit."""
    if x is None:
        return "-"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive ints, got {text!r}")
    return values


def unique_sorted(values: Sequence[int]) -> list[int]:
    return sorted(set(values))


# -- CPU used by other processes (the machine may be shared) ---------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall s, busy CPU s of the whole machine, steal s, CPU s of this process and its reaped children)."""
    wall = time.monotonic()
    busy = steal = 0.0
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice (guest is already in user)
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6) if i < len(fields)) / _CLK_TCK
        steal = (fields[7] if len(fields) > 7 else 0) / _CLK_TCK
    except (OSError, ValueError):
        pass
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return wall, busy, steal, own


def foreign_cores(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Average number of cores busy with work that is not this process between two snapshots (incl. steal)."""
    wall = b[0] - a[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((b[1] - a[1]) + (b[2] - a[2]) - (b[3] - a[3])) / wall)


def wait_idle(max_wait: float, threshold: float, window: float = 0.5) -> tuple[float, float]:
    """Wait (up to ``max_wait`` s) for a ``window`` in which other processes use < ``threshold`` cores.

    Returns (seconds waited, foreign cores in the last window).
    """
    start = time.monotonic()
    while True:
        a = cpu_snapshot()
        time.sleep(window)
        f = foreign_cores(a, cpu_snapshot())
        waited = time.monotonic() - start
        if f < threshold or waited >= max_wait:
            return waited, f


class CleanTimer:
    """Times calls on a possibly shared machine: waits for other processes to go quiet, measures their CPU
    use during each timed call, and re-runs a call that other processes disturbed.

    * before each timed call, waits (at most ``max_wait`` s, and ``wait_budget`` s over the whole run) for
      a 0.5 s window in which other processes use < ``threshold`` cores;
    * for calls of at least ``min_check_s`` the foreign CPU during the call itself is measured (shorter
      calls are below the kernel's tick resolution: the pre-call window stands in); a call disturbed by
      >= ``threshold`` cores is re-run, at most ``retries`` times.
    """

    def __init__(
        self, *, threshold: float, max_wait: float, wait_budget: float, retries: int, min_check_s: float = 0.5
    ) -> None:
        self.threshold = threshold
        self.max_wait = max_wait
        self.wait_budget = wait_budget
        self.retries = retries
        self.min_check_s = min_check_s
        self.waited = 0.0
        self.reruns = 0
        self.events: list[dict[str, object]] = []

    def _wait_for_quiet(self):
        """Wait (within the budgets) for the machine to go idle; returns wait_idle's snapshot or None."""
        allowed = min(self.max_wait, self.wait_budget - self.waited)
        if allowed <= 0:
            return None
        waited, pre = wait_idle(allowed, self.threshold)
        self.waited += waited
        return pre

    def once(self, label: str, fn: Callable[[], object], before: Callable[[], object] | None = None):
        """One timed call: (seconds, result, foreign cores)."""
        attempt = 0
        while True:
            pre = self._wait_for_quiet()
            if before is not None:
                before()
            a = cpu_snapshot()
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            b = cpu_snapshot()
            foreign = foreign_cores(a, b) if dt >= self.min_check_s else pre
            disturbed = foreign is not None and foreign >= self.threshold
            if not disturbed or attempt >= self.retries or dt < self.min_check_s:
                break
            attempt += 1
            self.reruns += 1
        self.events.append(
            {
                "label": label,
                "s": dt,
                "foreign_cores": None if foreign is None else round(foreign, 3),
                "attempts": attempt + 1,
                "disturbed": disturbed,
            }
        )
        return dt, result, foreign

    def timed(
        self,
        label: str,
        fn: Callable[[], object],
        *,
        repeats: int,
        warmup: int = 1,
        before: Callable[[], object] | None = None,
    ):
        """``warmup`` untimed calls, then ``repeats`` timed ones, back to back after one quiet-machine gate
        (a gate before each short call would time a CPU just woken from sleep, not a serving loop).

        Returns (median s, all s, last result, foreign cores over the block). A disturbed block of at
        least ``min_check_s`` is re-run, at most ``retries`` times.
        """
        attempt = 0
        while True:
            pre = self._wait_for_quiet()
            a = cpu_snapshot()
            result = None
            for _ in range(warmup):
                if before is not None:
                    before()
                result = fn()
            times: list[float] = []
            for _ in range(repeats):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - t0)
            b = cpu_snapshot()
            long_enough = b[0] - a[0] >= self.min_check_s
            foreign = foreign_cores(a, b) if long_enough else pre
            disturbed = foreign is not None and foreign >= self.threshold
            if not disturbed or attempt >= self.retries or not long_enough:
                break
            attempt += 1
            self.reruns += 1
        for i, dt in enumerate(times):
            self.events.append(
                {
                    "label": f"{label}#{i + 1}",
                    "s": dt,
                    "foreign_cores": None if foreign is None else round(foreign, 3),
                    "attempts": attempt + 1,
                    "disturbed": disturbed,
                }
            )
        return median(times), times, result, foreign

    def summary(self) -> dict[str, object]:
        disturbed = [e["label"] for e in self.events if e["disturbed"]]
        return {
            "threshold_cores": self.threshold,
            "waited_s": round(self.waited, 1),
            "reruns": self.reruns,
            "timed_calls": len(self.events),
            "disturbed_calls": disturbed,
        }


def quiet() -> None:
    """Silence transformers' progress bars and advice so stderr carries only the benchmark's progress."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    logging.getLogger("kvtier").setLevel(logging.WARNING)


def fix_threads(threads: int) -> None:
    """Pin torch to ``threads`` threads (the same in every mode and process of a benchmark)."""
    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"could not set torch to {threads} threads (has {torch.get_num_threads()})")
