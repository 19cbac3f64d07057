"""The kvtier benchmarks' harness: flags, timing on a shared machine, machine info, results, targets, table, plot.

Every script under ``bench/`` builds on this module and on kvtier's public API
only. Nothing here downloads anything or ships text of its own: the benchmark
text is read from files every Debian machine (and every CPython install)
already has.

* flags: :class:`BenchParser` (``--json``, ``--plot``, ``--threads``,
  ``--cache-dir``, ``--tmp-dir``, ``--seed``, the quiet-machine flags, and
  ``--quick``: a script's smallest sizes, for a smoke check), one set of defaults;
* timing: :class:`CleanTimer` waits for a quiet machine, measures other
  processes' CPU during each timed block and re-runs a disturbed one;
* the run: :class:`Run` (wall clock, load average, machine info, timer, temporary
  folder; ``finish`` writes the JSON, prints the table, draws the plot), :func:`write_json`;
* targets: :func:`check` gives ``{"value", "op", "threshold", "pass"}``;
* report: :func:`print_table` (rich, cells formatted by the field's unit), :func:`figure` and
  :func:`grouped_bars` (matplotlib);
* kvtier: :func:`load_bench_model`, :func:`bench_config`, :func:`engine` (through
  ``CacheEngine.from_config`` and ``TierAccess``), real text, prompt pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
GEN = {"max_new_tokens": 1, "do_sample": False}
LICENSES = Path("/usr/share/common-licenses")
GPL3 = LICENSES / "GPL-3"
STDLIB_LICENSE = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"

# -- flags -----------------------------------------------------------------------------------------------------

# destination -> (type, default, help): the flags several benchmarks take, with one set of defaults
_FLAGS: dict[str, tuple[type, Any, str]] = {
    "plot": (Path, None, "write a PNG plot here (matplotlib)"),
    "threads": (int, None, "torch threads, every mode and process (default: torch's own)"),
    "cache_dir": (Path, None, "model cache dir (default: kvtier config's cache_dir)"),
    "tmp_dir": (Path, None, "parent of the temporary chunk folders (default: system tmp)"),
    "seed": (int, 0, "seed of every random choice (default 0)"),
    "idle_threshold": (float, 0.2, "other processes' CPU (cores) that disturbs a timing (default 0.2)"),
    "max_wait": (float, 20.0, "max s to wait for a quiet machine before one timing (default 20)"),
    "wait_budget": (float, 120.0, "max s of such waiting over the run (default 120; 0: no waiting)"),
    "retries": (int, 1, "re-runs of a disturbed timing of >= 0.5 s (default 1)"),
}
TIMER_FLAGS = ("idle_threshold", "max_wait", "wait_budget", "retries")
MODEL_FLAGS = ("threads", "cache_dir", "tmp_dir", *TIMER_FLAGS)


class BenchParser(argparse.ArgumentParser):
    """An argument parser with the common flags ``flags`` (names in ``_FLAGS``), ``--json`` and ``--quick``.

    ``quick`` maps flag destinations to a script's smallest sizes: ``--quick`` applies each one the
    command line left at its default. ``positive`` names flags that must be > 0.
    """

    def __init__(
        self,
        doc: str,
        flags: Sequence[str],
        *,
        quick: Mapping[str, Any],
        positive: Sequence[str] = (),
        json_required: bool = True,
    ) -> None:
        super().__init__(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--json", type=Path, required=json_required, help="write results here (JSON)")
        for name in flags:
            kind, default, text = _FLAGS[name]
            self.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
        preset = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
        self.add_argument("--quick", action="store_true", help=f"smallest sizes, a smoke check ({preset})")
        self.quick, self.positive = dict(quick), tuple(positive)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns = super().parse_args(args, namespace)
        if ns.quick:
            for dest, value in self.quick.items():
                if getattr(ns, dest) == self.get_default(dest):
                    setattr(ns, dest, value)
        if hasattr(ns, "threads") and ns.threads is None:
            import torch

            ns.threads = torch.get_num_threads()
        for dest in self.positive:
            if getattr(ns, dest) is not None and getattr(ns, dest) <= 0:
                self.error(f"--{dest.replace('_', '-')} must be positive")
        return ns


def parse_ints(text: str) -> list[int]:
    """A comma-separated list of positive ints, sorted, without repeats."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive ints, got {text!r}")
    return sorted(set(values))


# -- text ------------------------------------------------------------------------------------------------------


def license_files() -> list[Path]:
    """The distinct text files of /usr/share/common-licenses (symlinks resolved, duplicates dropped), sorted."""
    seen: set[Path] = set()
    out: list[Path] = []
    for path in sorted(LICENSES.iterdir()) if LICENSES.is_dir() else []:
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            out.append(real)
    return out


def real_tokens(tokenizer, min_tokens: int) -> tuple[list[int], list[str]]:
    """At least ``min_tokens`` token ids of real English text (the GPL-3, then CPython's LICENSE.txt, cycled).

    Returns the ids and the names of the files used.
    """
    sources = [p for p in (GPL3, STDLIB_LICENSE) if p.is_file()]
    if not sources:
        raise RuntimeError(f"no offline text found (neither {GPL3} nor {STDLIB_LICENSE})")
    texts: list[str] = []
    for i in range(64):
        texts.append(sources[i % len(sources)].read_text(encoding="utf-8", errors="replace"))
        # ~3 characters a token for English with a BPE vocabulary: tokenize once there is enough
        if sum(len(t) for t in texts) >= 3 * min_tokens or i == 63:
            ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
            if len(ids) >= min_tokens:
                return list(ids), [str(sources[j % len(sources)]) for j in range(len(texts))]
    raise RuntimeError(f"could not assemble {min_tokens} tokens of text")


def prompt_pair(ids: Sequence[int], prefix: int, suffix: int) -> tuple[list[int], list[int]]:
    """Prefix + suffix A (the tokens after the prefix) and prefix + suffix B (the ``suffix`` tokens after A):
    two questions about one document, so a hit reuses the prefix and still prefills B."""
    return list(ids[: prefix + suffix]), list(ids[:prefix]) + list(ids[prefix + suffix : prefix + 2 * suffix])


# -- kvtier ----------------------------------------------------------------------------------------------------


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
    import torch

    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"could not set torch to {threads} threads (has {torch.get_num_threads()})")


def check_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch thread count changed to {torch.get_num_threads()} during the run")


def load_bench_model(args: argparse.Namespace):
    """The benchmarks' model (fp32, CPU), torch pinned to ``--threads``: (model, tokenizer, model folder, namespace).

    The converted model is reused from ``--cache-dir`` (default: the kvtier config's, environment included).
    """
    quiet()
    fix_threads(args.threads)
    from kvtier.config import load_config
    from kvtier.models import load_model, resolve_model

    model_path = resolve_model(MODEL, args.cache_dir or load_config().cache_dir)
    model, tokenizer = load_model(model_path)
    print(f"{MODEL} from {model_path}; {args.threads} torch threads", file=sys.stderr)
    return model, tokenizer, model_path, namespace(model)


def bench_config(overrides: Mapping[str, Any] | None = None):
    """A kvtier config of defaults + ``overrides`` only: whatever ``KVTIER_*`` the shell has does not apply."""
    from kvtier.config import load_config

    return load_config(env={}, overrides=dict(overrides or {}))


def namespace(model):
    """The model's namespace under :func:`bench_config` (the tenant and hash every bench engine uses)."""
    from kvtier.adapters.hf import hf_namespace

    config = bench_config()
    return hf_namespace(model, tenant=config.tenant, hash_name=config.hash)


def engine(ns, overrides: Mapping[str, Any], *, memory: bool = True):
    """A started ``CacheEngine`` over :func:`bench_config` (``overrides``); ``memory=False``: no L1 tier."""
    from kvtier.engine import CacheEngine
    from kvtier.storage import TierAccess

    return CacheEngine.from_config(bench_config(overrides), ns, access=TierAccess(memory=memory)).start()


def first_token(model, ids) -> int:
    """The first greedy token after ``ids`` ([1, N]) from a plain ``model.generate`` (no kvtier)."""
    import torch

    return int(model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)[0, -1])


# -- memory bandwidth and page-cache residency -----------------------------------------------------------------


def copy_bandwidth(nbytes: int = 256 << 20, tries: int = 5) -> float:
    """Memory-copy bandwidth in bytes/s: ``dst.copy_(src)`` of warm float32 tensors, best of ``tries``
    (bytes counted once: what is copied, not read + write)."""
    import torch

    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32).uniform_()  # touch every page of both
    dst = torch.zeros(n, dtype=torch.float32)
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return n * 4 / best


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


# -- machine ---------------------------------------------------------------------------------------------------


def _first_line_value(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git(*cmd: str) -> str | None:
    """A git command's output in the kvtier checkout, or None."""
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(threads: int | None = None, packages: Sequence[str] = ()) -> dict[str, Any]:
    """CPU, memory and Python; with ``threads`` torch's and transformers' settings; with ``packages`` their
    versions and the checkout's commit."""
    mem = _first_line_value("/proc/meminfo", "MemTotal:")
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _first_line_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "mem_total_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "python": sys.version.split()[0],
    }
    if threads is not None:
        import torch
        import transformers

        info |= {
            "torch_version": torch.__version__,
            "torch_threads": threads,
            "torch_interop_threads": torch.get_num_interop_threads(),
            "transformers_version": transformers.__version__,
            "platform": platform.platform(),
        }
    if packages:
        from importlib.metadata import PackageNotFoundError, version

        versions = {}
        for pkg in packages:
            with contextlib.suppress(PackageNotFoundError):
                versions[pkg] = version(pkg)
        info |= {"versions": versions, "git_commit": git("rev-parse", "--short", "HEAD")}
    return info


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it is free on loopback, else a free port the kernel picks."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred or 0))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- CPU used by other processes (the machine may be shared) ---------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")
Snapshot = tuple[float, float, float, float]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_snapshot(own_pids: Iterable[int] = ()) -> Snapshot:
    """(wall s, busy CPU s of the whole machine, steal s, CPU s of this process, its reaped children and
    ``own_pids``: processes the benchmark runs, such as a server it started)."""
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
    own = t.user + t.system + t.children_user + t.children_system + sum(process_cpu_s(p) for p in own_pids)
    return wall, busy, steal, own


def foreign_cores(a: Snapshot, b: Snapshot) -> float:
    """Average number of cores busy with work that is not the benchmark's between two snapshots (incl. steal)."""
    wall = b[0] - a[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((b[1] - a[1]) + (b[2] - a[2]) - (b[3] - a[3])) / wall)


class CleanTimer:
    """Times calls on a possibly shared machine: waits for other processes to go quiet, measures their CPU
    use during each timed call, and re-runs a call that other processes disturbed.

    * before each timed block, waits (at most ``max_wait`` s, and ``wait_budget`` s over the whole run) for
      a 0.5 s window in which other processes use < ``threshold`` cores;
    * for blocks of at least ``min_check_s`` the foreign CPU during the block itself is measured (shorter
      ones are below the kernel's tick resolution: the pre-call window stands in); a block disturbed by
      >= ``threshold`` cores is re-run, at most ``retries`` times.

    ``own_pids`` are processes whose CPU counts as the benchmark's own (a server it started).
    """

    def __init__(
        self, *, threshold: float, max_wait: float, wait_budget: float, retries: int, min_check_s: float = 0.5
    ) -> None:
        self.threshold = threshold
        self.max_wait = max_wait
        self.wait_budget = wait_budget
        self.retries = retries
        self.min_check_s = min_check_s
        self.own_pids: set[int] = set()
        self.waited = 0.0
        self.reruns = 0
        self.events: list[dict[str, Any]] = []

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CleanTimer:
        return cls(
            threshold=args.idle_threshold, max_wait=args.max_wait, wait_budget=args.wait_budget, retries=args.retries
        )

    def settings(self) -> dict[str, float]:
        """What a timer in another process needs to go on with this one's budget (``CleanTimer(**settings)``)."""
        return {
            "threshold": self.threshold,
            "max_wait": self.max_wait,
            "wait_budget": max(0.0, self.wait_budget - self.waited),
            "retries": self.retries,
        }

    def _snapshot(self) -> Snapshot:
        return cpu_snapshot(self.own_pids)

    def _wait_for_quiet(self) -> float | None:
        """Wait (within the budgets) for a quiet 0.5 s window; its foreign cores, or None if not waited."""
        allowed = min(self.max_wait, self.wait_budget - self.waited)
        if allowed <= 0:
            return None
        start = time.monotonic()
        while True:
            a = self._snapshot()
            time.sleep(0.5)
            f = foreign_cores(a, self._snapshot())
            waited = time.monotonic() - start
            if f < self.threshold or waited >= allowed:
                self.waited += waited
                return f

    def _record(self, label: str, dt: float, foreign: float | None, attempt: int, disturbed: bool) -> None:
        self.events.append(
            {
                "label": label,
                "s": dt,
                "foreign_cores": None if foreign is None else round(foreign, 3),
                "attempts": attempt + 1,
                "disturbed": disturbed,
            }
        )

    def timed(
        self,
        label: str,
        fn: Callable[[], Any],
        *,
        repeats: int,
        warmup: int = 1,
        before: Callable[[], object] | None = None,
    ) -> tuple[float, list[float], Any, float | None]:
        """``warmup`` untimed calls, then ``repeats`` timed ones, back to back after one quiet-machine gate
        (a gate before each short call would time a CPU just woken from sleep, not a serving loop).
        ``before`` runs before every call, outside the timed region.

        Returns (median s, all s, last result, foreign cores over the block).
        """
        attempt = 0
        while True:
            pre = self._wait_for_quiet()
            a = self._snapshot()
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
            b = self._snapshot()
            long_enough = b[0] - a[0] >= self.min_check_s
            foreign = foreign_cores(a, b) if long_enough else pre
            disturbed = foreign is not None and foreign >= self.threshold
            if not disturbed or attempt >= self.retries or not long_enough:
                break
            attempt += 1
            self.reruns += 1
        for i, dt in enumerate(times):
            self._record(f"{label}#{i + 1}" if repeats > 1 or warmup else label, dt, foreign, attempt, disturbed)
        return median(times), times, result, foreign

    def once(
        self, label: str, fn: Callable[[], Any], before: Callable[[], object] | None = None
    ) -> tuple[float, Any, float | None]:
        """One timed call (``before`` outside the timed region): (seconds, result, foreign cores)."""
        _, (dt,), result, foreign = self.timed(label, fn, repeats=1, warmup=0, before=before)
        return dt, result, foreign

    def absorb(self, report: Mapping[str, Any], prefix: str) -> None:
        """Add what a timer in another process (``report(events=True)``) waited, re-ran and timed."""
        self.waited += report["waited_s"]
        self.reruns += report["reruns"]
        self.events.extend({**e, "label": f"{prefix}{e['label']}"} for e in report["events"])

    def report(self, *, blocks: bool = False) -> dict[str, Any]:
        """The contention summary, with every timed call (``events``) or, with ``blocks``, grouped per block
        (``label#i`` -> ``label``: blocks of single-chunk gets have hundreds of calls)."""
        disturbed = [e["label"] for e in self.events if e["disturbed"]]
        out: dict[str, Any] = {
            "threshold_cores": self.threshold,
            "waited_s": round(self.waited, 1),
            "reruns": self.reruns,
            "timed_calls": len(self.events),
            "disturbed_calls": disturbed,
        }
        if not blocks:
            return out | {"events": self.events}
        grouped: dict[str, dict[str, Any]] = {}
        for e in self.events:
            g = grouped.setdefault(
                e["label"].split("#")[0], {"calls": 0, "disturbed": False, "foreign_cores": e["foreign_cores"]}
            )
            g["calls"] += 1
            g["disturbed"] = g["disturbed"] or e["disturbed"]
        out["disturbed_calls"] = sorted({x.split("#")[0] for x in disturbed})
        return out | {"blocks": grouped}

    def warn_if_disturbed(self) -> None:
        disturbed = sorted({e["label"].split("#")[0] for e in self.events if e["disturbed"]})
        if disturbed:
            print(
                f"WARNING: other processes used >= {self.threshold} cores during {', '.join(disturbed)} "
                f"(after {self.reruns} re-runs); those numbers are pessimistic",
                file=sys.stderr,
            )


# -- the run and its result ------------------------------------------------------------------------------------


class Run:
    """One benchmark run: its flags, wall clock, load average at start and end, quiet-machine timer and
    temporary folder (under ``--tmp-dir``; ``remove_tmp`` at the end)."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.loadavg_start = loadavg()
        self.timer = CleanTimer.from_args(args)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"kvtier-{name}-", dir=args.tmp_dir))

    @property
    def runtime_s(self) -> float:
        return time.perf_counter() - self.t0

    def machine(self, **extra: Any) -> dict[str, Any]:
        info = machine_info(self.args.threads) | {"loadavg_start": self.loadavg_start, "loadavg_end": loadavg()}
        return info | extra

    def remove_tmp(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(
        self, result: Mapping[str, Any], *, table: Callable[[], None], plot: Callable[[Path], None] | None = None
    ) -> None:
        """Write ``result`` to ``--json``, print the table, draw ``--plot``, say where they went, warn of
        contention."""
        args = self.args
        write_json(args.json, result)
        table()
        drawn = plot is not None and getattr(args, "plot", None) is not None
        if drawn:
            plot(args.plot)
        print(f"wrote {args.json}" + (f" and {args.plot}" if drawn else "") + f"; total runtime {self.runtime_s:.0f} s")
        self.timer.warn_if_disturbed()


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- targets ---------------------------------------------------------------------------------------------------


def check(value: float | None, op: str, threshold: float) -> dict[str, Any]:
    """A target record: ``value`` ``op`` (">=" or "<=") ``threshold``, and whether it passes."""
    ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"value": value, "op": op, "threshold": threshold, "pass": ok}


def all_pass(targets: Mapping[str, Any]) -> bool:
    """Whether every measured target record (``pass`` not None) passes."""
    return all(t["pass"] for t in targets.values() if isinstance(t, dict) and t.get("pass") is not None)


def mark(ok: bool | None) -> str:
    return "[dim]n/a[/dim]" if ok is None else "[green]PASS[/green]" if ok else "[red]FAIL[/red]"


# -- report ----------------------------------------------------------------------------------------------------


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cell(key: str, value: Any) -> str:
    """A table cell by the field's unit: ``*_s`` seconds, ``*_bytes`` MB, yes/NO, ints with separators,
    other numbers to 4 significant digits, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "[red]NO[/red]"
    if isinstance(value, int | float) and key.endswith("_s"):
        return fmt_s(value)
    if isinstance(value, int | float) and key.endswith("_bytes"):
        return f"{value / 1e6:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def console(min_width: int = 150):
    """A rich console on stdout, at least ``min_width`` wide (wide tables stay readable in a log file)."""
    from rich.console import Console

    return Console(file=sys.stdout, width=max(min_width, Console(file=sys.stdout).width))


def print_table(
    con, title: str, columns: Mapping[str, str | Callable[[Mapping[str, Any]], str]], rows: Sequence[Mapping]
) -> None:
    """A rich table, one row per result row: ``columns`` maps a column title to a row field (shown by
    :func:`cell`) or to a function of the row. Text columns are left-justified, numbers right."""
    from rich.table import Table

    table = Table(title=title)
    for name, key in columns.items():
        sample = next((r.get(key) for r in rows if r.get(key) is not None), None) if isinstance(key, str) else None
        table.add_column(name, justify="left" if isinstance(sample, str) else "right")
    for r in rows:
        table.add_row(*(key(r) if callable(key) else cell(key, r.get(key)) for key in columns.values()))
    con.print(table)


def print_targets(con, targets: Mapping[str, Any], extra: Callable[[Mapping[str, Any]], str] | None = None) -> None:
    """One line per target record: ``name = value (target op threshold): PASS`` (+ ``extra(record)``)."""
    for name, t in targets.items():
        if not isinstance(t, dict) or "pass" not in t:
            continue
        if t["pass"] is None:
            con.print(f"  {name}: [dim]{t.get('note', 'not measured')}[/dim]")
            continue
        line = f"  {name} = {t['value']:.4g} (target {t['op']} {t['threshold']}): {mark(t['pass'])}"
        con.print(line + (extra(t) if extra is not None else ""))


@contextlib.contextmanager
def figure(path: Path, *, ncols: int = 1, figsize: tuple[float, float], title: str | None = None) -> Iterator[list]:
    """Axes of a one-row matplotlib figure (Agg) that is saved to ``path`` (120 dpi) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def grouped_bars(
    ax,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float], str | None]],
    *,
    annotate: Callable[[float], str] | None = None,
) -> None:
    """One group of bars per label, one bar per (name, values, color) series; ``annotate`` labels each bar."""
    width = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name, color=color)
        for b, v in zip(bars, values, strict=True) if annotate else ():
            ax.annotate(
                annotate(v),
                (b.get_x() + b.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(list(range(len(labels))), labels)
    ax.legend(fontsize=8)


def progress(total: int, desc: str):
    """A tqdm progress bar on stderr, one step per stage."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="step")
