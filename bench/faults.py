"""Fault-and-soak suite: kvtier under the faults a shared cache meets, with one report.

    python bench/faults.py --json bench/results/faults.json [--minutes N] [--secret]

Every case runs real parts: redis-server processes this script starts (through a loopback TCP proxy
that can slow, black-hole or garble the server's replies: tests/redis_servers.py), disk folders in a
temporary directory, writer processes that are SIGKILLed mid-write. The KV of a token is a
deterministic function of the token and its position (:func:`reference_kv`), so every retrieve is
checked against what recomputing would give: ``wrong_kv`` counts retrieves whose KV differs (must be 0
wherever a secret is set; the ``forged_no_secret`` case shows the attack a secret stops).

Cases: ``redis_killed`` (the server stopped mid-run, then started again empty), ``redis_slowed``
(+0.2 s per reply), ``redis_black_hole``, ``redis_garbage`` (replies replaced by random bytes, and
random values stored under real keys), ``writer_sigkill`` (20 writer processes killed mid-store into
one disk folder), ``disk_full`` (a disk budget far below the data), ``flipped_bytes`` (random bytes
flipped in chunk files), ``forged_no_secret`` / ``forged_with_secret`` (self-consistent chunks planted
in Redis under the victim's keys), ``bombs`` (16.9 KB chunks whose headers claim 512 MiB, in Redis and
on disk). With ``--minutes N`` a soak runs a mixed load (4 threads: store, retrieve, lookup) over
l1 + l2 + l3 with a secret while faults from the list above are injected at random.

Per case: wrong_kv, tokens served / asked, retrieve latency p50 / max, exceptions raised to the caller,
budget peak vs budget (l1, l2), RSS, open file descriptors and threads at start and end (the soak also
reports RSS after a warm-up: its growth from there is the leak figure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-Redis helpers the tests use
sys.path.insert(0, str(REPO))

from redis_servers import BlackHoleProxy, RedisServer, free_port  # noqa: E402

from kvtier.chunk import Chunk, encode  # noqa: E402
from kvtier.config import KvtierConfig, load_config  # noqa: E402
from kvtier.engine import CacheEngine  # noqa: E402
from kvtier.keys import Namespace, chunk_spans  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32)  # 2 KiB per token (fp32)
CHUNK = 32  # 64 KiB chunks
SECRET = "faults-bench-secret-" + "s" * 24
NAMESPACE = Namespace("faults-bench-model", LAYOUT)


def reference_kv(tokens: np.ndarray) -> torch.Tensor:
    """[L, 2, H, n, D]: a deterministic function of each token and its position (what recompute would give)."""
    n = len(tokens)
    pos = torch.arange(n, dtype=torch.float64)
    tok = torch.as_tensor(tokens.astype(np.int64), dtype=torch.float64)
    base = torch.sin(tok * 0.0137 + pos * 0.71)  # [n]
    scale = torch.arange(1, LAYOUT.num_layers * 2 * LAYOUT.num_kv_heads * LAYOUT.head_dim + 1, dtype=torch.float64)
    kv = (base[None, :] * scale[:, None] * 1e-3).to(torch.float32)
    shape = (LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.head_dim, n)
    return kv.reshape(shape).permute(0, 1, 2, 4, 3).contiguous()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@dataclass
class CaseReport:
    case: str
    wrong_kv: int = 0
    retrieves: int = 0
    tokens_served: int = 0
    tokens_asked: int = 0
    latency_ms_p50: float = 0.0
    latency_ms_max: float = 0.0
    exceptions: int = 0
    budget_peak: dict[str, int] = field(default_factory=dict)
    budget: dict[str, int] = field(default_factory=dict)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    fds_start: int = 0
    fds_end: int = 0
    threads_start: int = 0
    threads_end: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class Probe:
    """Runs retrieves against an engine, checking each against the reference KV; collects a case's figures."""

    def __init__(self, case: str) -> None:
        self.report = CaseReport(case, rss_start_mb=_rss() / 2**20, fds_start=_fds(), threads_start=_threads())
        self._lat: list[float] = []
        self._lock = threading.Lock()

    def retrieve(self, engine: CacheEngine, tokens: np.ndarray, **kw: object) -> int:
        t0 = time.perf_counter()
        try:
            got = engine.retrieve(tokens, **kw)
        except Exception:
            with self._lock:
                self.report.exceptions += 1
            traceback.print_exc()
            return 0
        elapsed = time.perf_counter() - t0
        wrong = got.num_tokens > 0 and not torch.equal(torch.stack(got.layers), reference_kv(tokens[: got.num_tokens]))
        with self._lock:
            self._lat.append(elapsed)
            self.report.retrieves += 1
            self.report.tokens_served += got.num_tokens
            self.report.tokens_asked += len(tokens)
            self.report.wrong_kv += int(wrong)
        return got.num_tokens

    def store(self, engine: CacheEngine, tokens: np.ndarray) -> None:
        try:
            engine.store(tokens, reference_kv(tokens))
        except Exception:
            with self._lock:
                self.report.exceptions += 1
            traceback.print_exc()

    def budgets(self, engine: CacheEngine) -> None:
        """Sample each budgeted tier's use. Disk and node: the folder's ledger (complete files + reservations in
        flight, every process), the accounting the budget is enforced on; the disk tier's own ``used_bytes``
        counts a chunk being put before its victims are evicted (one chunk over, transiently)."""
        for tier, s in zip(engine.tiers.tiers, engine.tiers.stats(), strict=True):
            if not s.max_bytes:
                continue
            ledger = getattr(tier, "_ledger", None) or getattr(tier, "ledger", None)
            used = s.used_bytes
            if ledger is not None:
                with contextlib.suppress(Exception):
                    _, done, pending = ledger.totals()
                    used = done + pending
            self.report.budget[s.name] = s.max_bytes
            self.report.budget_peak[s.name] = max(self.report.budget_peak.get(s.name, 0), used)

    def finish(self, engine: CacheEngine | None = None, **notes: object) -> CaseReport:
        r = self.report
        if engine is not None:
            self.budgets(engine)
            for s in engine.tiers.stats():
                for name in ("corrupt", "forged", "stale", "rejected_puts", "evictions"):
                    if getattr(s, name):
                        r.counters[f"{s.name}.{name}"] = getattr(s, name)
            for tier in engine.tiers.tiers:
                if hasattr(tier, "counters"):
                    r.counters.update({f"{tier.name}.{k}": v for k, v in tier.counters().items() if v})
            st = engine.stats()
            r.counters.update({f"deadline.{k}": v for k, v in st.deadline_exceeded.items()})
            r.counters.update({f"invalid.{k}": v for k, v in st.invalid_chunks.items()})
        if self._lat:
            r.latency_ms_p50 = statistics.median(self._lat) * 1e3
            r.latency_ms_max = max(self._lat) * 1e3
        r.rss_end_mb, r.fds_end, r.threads_end = _rss() / 2**20, _fds(), _threads()
        r.notes = str(notes.get("notes", r.notes))
        return r


def _config(work: Path, *, l3_url: str | None = None, secret: bool = True, **overrides: object) -> KvtierConfig:
    values: dict[str, object] = {
        "chunk_size": CHUNK,
        "store_partial": False,
        "l1.enabled": False,
        "l2.enabled": False,
        "l2.path": str(work / "chunks"),
        "l3.enabled": l3_url is not None,
        "l3.key_prefix": "faults",
        "l3.timeout_s": 0.5,
        "l3.connect_timeout_s": 0.5,
        "l3.retry_interval_s": 0.5,
        "l3.retrieve_deadline_s": 1.0,
        "l3.lookup_deadline_s": 0.5,
    }
    if l3_url is not None:
        values["l3.url"] = l3_url
    if secret:
        secret_file = work / "secret"
        if not secret_file.exists():
            secret_file.write_text(SECRET)
            secret_file.chmod(0o600)
        values["security.secret_file"] = str(secret_file)
    values.update(overrides)
    return load_config(env={}, overrides=values)


def _engine(config: KvtierConfig) -> CacheEngine:
    return CacheEngine.from_config(config, NAMESPACE).start()


def _prompts(rng: random.Random, count: int, chunks: int) -> list[np.ndarray]:
    return [np.array([rng.randrange(50_000) for _ in range(chunks * CHUNK)], dtype=np.uint32) for _ in range(count)]


@contextlib.contextmanager
def _redis(work: Path, name: str, *args: str) -> Iterator[tuple[RedisServer, BlackHoleProxy]]:
    with RedisServer(work / name, None, *args) as server, BlackHoleProxy(server.port) as proxy:
        yield server, proxy


# -- the cases ---------------------------------------------------------------------------------------------------


def case_redis_killed(work: Path) -> CaseReport:
    probe = Probe("redis_killed")
    rng = random.Random(1)
    prompts = _prompts(rng, 6, 4)
    port = free_port()
    server = RedisServer(work / "killed", port).start()
    engine = _engine(_config(work, l3_url=server.url))
    try:
        for p in prompts:
            probe.store(engine, p)
        engine.flush(10)
        for p in prompts:
            probe.retrieve(engine, p)
        server.stop()  # killed: every call fails fast (refused), the breaker opens
        for p in prompts * 3:
            probe.retrieve(engine, p)
            probe.store(engine, p)
        server = RedisServer(work / "killed", port).start()  # back, empty
        time.sleep(0.6)  # past retry_interval_s: the next call probes
        for p in prompts:
            probe.store(engine, p)
        engine.flush(10)
        served = [probe.retrieve(engine, p) for p in prompts]
        probe.report.extra["served_after_restart"] = float(sum(served))
    finally:
        engine.close()
        server.stop()
    return probe.finish(engine, notes="killed mid-run, restarted empty; stores after the restart are served again")


def case_redis_proxy_fault(work: Path, name: str) -> CaseReport:
    probe = Probe(name)
    rng = random.Random(2)
    prompts = _prompts(rng, 6, 8)
    with _redis(work, name) as (server, proxy):
        engine = _engine(_config(work, l3_url=proxy.url))
        try:
            for p in prompts:
                probe.store(engine, p)
            engine.flush(10)
            if name == "redis_slowed":
                proxy.reply_delay_s = 0.2
            elif name == "redis_black_hole":
                proxy.black_hole.set()
            else:
                proxy.garbage.set()
            for p in prompts * 2:
                probe.retrieve(engine, p)
                probe.store(engine, p)
            proxy.reply_delay_s = 0.0
            proxy.black_hole.clear()
            proxy.garbage.clear()
            if name == "redis_garbage":  # garbage values under real keys too: corrupt, counted, never served
                with server.client() as client:
                    for key in list(client.scan_iter(match=b"faults:*"))[:20]:
                        client.set(key, random.randbytes(rng.randrange(10, 70_000)))
            time.sleep(0.6)
            for p in prompts:
                probe.retrieve(engine, p)
        finally:
            engine.close()
    return probe.finish(engine, notes={"redis_slowed": "+0.2 s per reply; retrieve deadline 1.0 s"}.get(name, ""))


_WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from bench.faults import _config, _engine, _prompts, reference_kv
import random
from pathlib import Path
engine = _engine(_config(Path(sys.argv[1]), **{"l2.enabled": True}))
rng = random.Random(int(sys.argv[3]))
print("ready", flush=True)
while True:
    p = _prompts(rng, 1, 4)[0]
    engine.store(p, reference_kv(p))
    engine.flush(10)
"""


def case_writer_sigkill(work: Path) -> CaseReport:
    probe = Probe("writer_sigkill")
    kills = 20
    for i in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(work), str(REPO), str(i % 3)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(random.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    engine = _engine(_config(work, **{"l2.enabled": True}))
    try:
        for seed in range(3):  # the prompts the writers stored (same seeds), and more
            for p in _prompts(random.Random(seed), 30, 4):
                probe.retrieve(engine, p)
    finally:
        engine.close()
    return probe.finish(engine, notes=f"{kills} writer processes SIGKILLed mid-store into one disk folder")


def case_disk_full(work: Path) -> CaseReport:
    probe = Probe("disk_full")
    budget = 1_000_000  # ~15 chunks
    engine = _engine(_config(work, **{"l2.enabled": True, "l2.max_bytes": budget, "l1.enabled": True,
                                      "l1.max_bytes": 600_000}))  # fmt: skip
    rng = random.Random(4)
    results = []
    try:
        for p in _prompts(rng, 40, 4):
            probe.store(engine, p)
            r = engine.store(p, reference_kv(p))
            results.append(r)
            probe.budgets(engine)
            probe.retrieve(engine, p)
        engine.flush(10)
        refused = sum(sum((r.background_rejected(timeout=10) or {}).values()) for r in results)
        probe.report.extra["background_refusals_reported"] = float(refused)
    finally:
        engine.close()
    return probe.finish(engine, notes="l2 budget 1 MB and l1 0.6 MB for 10 MB of stores: refusals reported")


def case_flipped_bytes(work: Path) -> CaseReport:
    probe = Probe("flipped_bytes")
    rng = random.Random(5)
    prompts = _prompts(rng, 10, 4)
    config = _config(work, **{"l2.enabled": True})
    engine = _engine(config)
    for p in prompts:
        probe.store(engine, p)
    engine.flush(10)
    engine.close()
    files = sorted((work / "chunks").glob("*/*.kvc"))
    for path in rng.sample(files, len(files) // 2):
        data = bytearray(path.read_bytes())
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    engine = _engine(config)
    try:
        for p in prompts:
            probe.retrieve(engine, p)
    finally:
        engine.close()
    return probe.finish(engine, notes=f"1-3 bits flipped in {len(files) // 2} of {len(files)} chunk files")


def _forge(engine: CacheEngine, tokens: np.ndarray) -> list[tuple[bytes, bytes]]:
    """(redis key, value) of self-consistent chunks for ``tokens`` with KV the attacker chose (all 7.0)."""
    l3 = engine.tiers.tiers[-1]
    out = []
    for span in chunk_spans(NAMESPACE, tokens, CHUNK):
        payload = torch.full(LAYOUT.chunk_shape(span.num_tokens), 7.0)
        chunk = Chunk(span.key, span.parent, NAMESPACE.digest, LAYOUT, tokens[span.start : span.end].copy(), payload)
        out.append((l3.redis_key(span.key), encode(chunk)))
    return out


def case_forged(work: Path, secret: bool) -> CaseReport:
    probe = Probe("forged_with_secret" if secret else "forged_no_secret")
    rng = random.Random(6)
    with _redis(work, f"forged-{secret}") as (server, _):
        engine = _engine(_config(work, l3_url=server.url, secret=secret))
        try:
            for p in _prompts(rng, 10, 4):
                with server.client() as client:
                    for key, value in _forge(engine, p):
                        client.set(key, value)
                probe.retrieve(engine, p)
        finally:
            engine.close()
    note = "the secret refuses every forgery" if secret else "no secret: the forgeries are served (the attack)"
    return probe.finish(engine, notes=note)


def case_bombs(work: Path) -> CaseReport:
    sys.path.insert(0, str(REPO / "tests"))
    from test_limits import BOMB_LAYOUT, _bomb

    probe = Probe("bombs")
    rng = random.Random(7)
    times: list[float] = []
    with _redis(work, "bombs") as (server, _):
        engine = _engine(_config(work, l3_url=server.url, **{"l2.enabled": True}))
        l3 = engine.tiers.tiers[-1]
        try:
            for p in _prompts(rng, 20, 1):
                span = chunk_spans(NAMESPACE, p, CHUNK)[0]
                bomb = _bomb(span.key, None, NAMESPACE.digest, BOMB_LAYOUT, 256)
                with server.client() as client:
                    client.set(l3.redis_key(span.key), bomb)
                t0 = time.perf_counter()
                probe.retrieve(engine, p)
                times.append(time.perf_counter() - t0)
            probe.report.extra["bomb_bytes"] = float(len(bomb))
            probe.report.extra["reject_ms_p50"] = statistics.median(times) * 1e3
            probe.report.extra["reject_ms_max"] = max(times) * 1e3
        finally:
            engine.close()
    return probe.finish(engine, notes="16.9 KB chunks claiming 512 MiB (zstd) planted in Redis under real keys")


# -- the soak ----------------------------------------------------------------------------------------------------


def soak(work: Path, minutes: float, seed: int = 0) -> CaseReport:
    sys.path.insert(0, str(REPO / "tests"))
    from test_limits import BOMB_LAYOUT, _bomb

    probe = Probe("soak")
    rng = random.Random(seed)
    prompts = _prompts(rng, 64, 6)
    end = time.monotonic() + minutes * 60
    warm_at = time.monotonic() + min(60.0, minutes * 60 * 0.15)
    faults: dict[str, int] = {}
    with _redis(work, "soak", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru") as (server, proxy):
        config = _config(
            work,
            l3_url=proxy.url,
            **{"l1.enabled": True, "l1.max_bytes": 4_000_000, "l2.enabled": True, "l2.max_bytes": 8_000_000},
        )
        engine = _engine(config)
        stop = threading.Event()
        rss_warm: list[float] = []

        def worker(wid: int) -> None:
            r = random.Random(seed * 100 + wid)
            while not stop.is_set():
                p = r.choice(prompts)
                cut = r.randrange(CHUNK, len(p) + 1)
                op = r.random()
                if op < 0.4:
                    probe.store(engine, p[:cut])
                elif op < 0.9:
                    probe.retrieve(engine, p[:cut])
                else:
                    try:
                        engine.lookup(p[:cut])
                    except Exception:
                        probe.report.exceptions += 1
                probe.budgets(engine)

        def inject() -> None:
            kind = rng.choice(["slow", "black_hole", "garbage", "restart", "flip", "forge", "bomb", "none"])
            faults[kind] = faults.get(kind, 0) + 1
            if kind == "slow":
                proxy.reply_delay_s = 0.2
                time.sleep(rng.uniform(0.5, 3))
                proxy.reply_delay_s = 0.0
            elif kind == "black_hole":
                proxy.black_hole.set()
                time.sleep(rng.uniform(0.5, 3))
                proxy.black_hole.clear()
            elif kind == "garbage":
                proxy.garbage.set()
                time.sleep(rng.uniform(0.2, 1))
                proxy.garbage.clear()
            elif kind == "restart":
                server.stop()
                time.sleep(rng.uniform(0.2, 2))
                server.start()
            elif kind == "flip":
                files = list((work / "chunks").glob("*/*.kvc"))
                for path in rng.sample(files, min(3, len(files))):
                    with contextlib.suppress(OSError):
                        data = bytearray(path.read_bytes())
                        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                        path.write_bytes(bytes(data))
            elif kind == "forge":
                with contextlib.suppress(Exception), server.client() as client:
                    for key, value in _forge(engine, rng.choice(prompts))[:3]:
                        client.set(key, value)
            elif kind == "bomb":
                p = rng.choice(prompts)
                span = chunk_spans(NAMESPACE, p, CHUNK)[0]
                with contextlib.suppress(Exception), server.client() as client:
                    client.set(engine.tiers.tiers[-1].redis_key(span.key), _bomb(span.key, None, NAMESPACE.digest,
                                                                                  BOMB_LAYOUT, 256))  # fmt: skip

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        try:
            while time.monotonic() < end:
                time.sleep(rng.uniform(1, 4))
                if not rss_warm and time.monotonic() >= warm_at:
                    rss_warm.append(_rss() / 2**20)
                    probe.report.extra["fds_warm"] = float(_fds())
                    probe.report.extra["threads_warm"] = float(_threads())
                inject()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            engine.flush(30)
            engine.close()
        probe.report.extra["rss_warm_mb"] = rss_warm[0] if rss_warm else probe.report.rss_start_mb
        for k, v in faults.items():
            probe.report.extra[f"fault_{k}"] = float(v)
    report = probe.finish(engine, notes=f"{minutes} min, 4 threads, l1+l2+l3 with a secret, faults every 1-4 s")
    report.extra["rss_growth_after_warmup_pct"] = (report.rss_end_mb / report.extra["rss_warm_mb"] - 1) * 100
    return report


# -- main --------------------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Path], CaseReport]] = {
    "redis_killed": case_redis_killed,
    "redis_slowed": lambda w: case_redis_proxy_fault(w, "redis_slowed"),
    "redis_black_hole": lambda w: case_redis_proxy_fault(w, "redis_black_hole"),
    "redis_garbage": lambda w: case_redis_proxy_fault(w, "redis_garbage"),
    "writer_sigkill": case_writer_sigkill,
    "disk_full": case_disk_full,
    "flipped_bytes": case_flipped_bytes,
    "forged_no_secret": lambda w: case_forged(w, False),
    "forged_with_secret": lambda w: case_forged(w, True),
    "bombs": case_bombs,
}


def _table(reports: list[CaseReport]) -> str:
    head = (
        f"{'case':<20} {'wrong':>5} {'served/asked':>15} {'p50 ms':>8} {'max ms':>8} {'exc':>4} "
        f"{'budget peak/budget':>22} {'RSS MB':>13} {'fds':>9} {'threads':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        budget = ", ".join(f"{t}:{r.budget_peak.get(t, 0) / 1e6:.2f}/{b / 1e6:.2f}" for t, b in r.budget.items()) or "-"
        lines.append(
            f"{r.case:<20} {r.wrong_kv:>5} {f'{r.tokens_served}/{r.tokens_asked}':>15} {r.latency_ms_p50:>8.1f} "
            f"{r.latency_ms_max:>8.1f} {r.exceptions:>4} {budget:>22} "
            f"{f'{r.rss_start_mb:.0f}->{r.rss_end_mb:.0f}':>13} {f'{r.fds_start}->{r.fds_end}':>9} "
            f"{f'{r.threads_start}->{r.threads_end}':>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the report")
    parser.add_argument("--minutes", type=float, default=0.0, help="also run a soak this long (0: none)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)  # the faults log loudly by design; the report is the output
    reports: list[CaseReport] = []
    for name in [c for c in args.cases.split(",") if c]:
        with tempfile.TemporaryDirectory(prefix=f"kvtier-faults-{name}-") as tmp:
            t0 = time.monotonic()
            report = CASES[name](Path(tmp))
            report.extra["seconds"] = time.monotonic() - t0
            reports.append(report)
            print(f"{name}: done in {report.extra['seconds']:.1f}s", file=sys.stderr, flush=True)
    if args.minutes > 0:
        with tempfile.TemporaryDirectory(prefix="kvtier-faults-soak-") as tmp:
            reports.append(soak(Path(tmp), args.minutes))
    table = _table(reports)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cases": [asdict(r) for r in reports], "table": table}, indent=1) + "\n")
    secret_cases = [r for r in reports if r.case != "forged_no_secret"]
    return 0 if all(r.wrong_kv == 0 and r.exceptions == 0 for r in secret_cases) else 1


if __name__ == "__main__":
    sys.exit(main())
