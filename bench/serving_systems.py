"""The three serving stacks bench/serving.py compares, started the same way and with the same vLLM flags.

* ``kvtier``: ``kvtier serve`` of this checkout (its connector, its Prometheus
  metrics on a port of its own). Every start reuses one chunk folder
  (``l2.path``), so whatever outlives the engine is kept; ``--kvtier-set``
  settings (e.g. a node memory tier's) go to every start. ``restart_all`` also
  runs ``--kvtier-full-reset`` (a shell command, e.g. one that removes a node
  tier's files), so that only the disk tier is left.
* ``lmcache``: LMCache 0.5.6 in its multi-process mode: ``lmcache server``
  (memory tier, and a disk tier: the ``fs`` L2 adapter in its own folder) and
  vLLM from LMCache's venv (bench/peers/lmcache_venv.sh) with
  ``LMCacheMPConnector``. ``restart_engine`` restarts vLLM only, ``restart_all``
  the server too (its memory tier is lost, its disk folder kept).
* ``apc``: ``kvtier serve --no-kvtier``: vLLM with its own prefix cache only.

vLLM's argv and environment come from ``kvtier serve`` for all three (the
LMCache stack asks ``kvtier.serve.prepare`` for the ``--no-kvtier`` command and
runs it with LMCache's interpreter), plus ``VLLM_SERVER_DEV_MODE=1`` so that
``/reset_prefix_cache`` exists. Each start logs to its own file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import harness as h
import httpx
from chat_workload import HIT_TOKENS, MetricsReader, Server, checkout_env, hit_tokens, kvtier_command, total
from harness import MODEL
from serving_stats import Load, kvtier_loads, lmcache_loads, lmcache_prefetches

SYSTEMS = ("kvtier", "lmcache", "apc")
DEFAULT_LMCACHE_VENV = Path.home() / ".cache" / "kvtier" / "peers" / "lmcache-0.5.6"
LMCACHE_CHUNK = 256  # LMCache's chunk size here; kvtier's default chunk_size is 256 too


@dataclass
class StackOptions:
    """What every stack of one benchmark run shares."""

    log_dir: Path
    stem: str
    tmp: Path  # cache folders live under it
    kv_cache_gib: int
    gpu_blocks: int | None  # vLLM's --num-gpu-blocks-override (its own KV pool), None: from kv_cache_gib
    max_model_len: int
    cache_gb: float  # kvtier's l1.max_bytes and LMCache's --l1-size-gb
    startup_timeout: float
    kvtier_set: list[str] = field(default_factory=list)
    kvtier_full_reset: str | None = None
    lmcache_venv: Path = DEFAULT_LMCACHE_VENV
    vllm_extra: list[str] = field(default_factory=list)  # more vLLM server flags, the same for every system

    def vllm_args(self) -> list[str]:
        args = ["--enable-prompt-tokens-details", "--disable-uvicorn-access-log", *self.vllm_extra]
        return args + (["--num-gpu-blocks-override", str(self.gpu_blocks)] if self.gpu_blocks else [])


@dataclass(frozen=True)
class Mark:
    """Where the logs and kvtier's metrics stood before a request (see :meth:`Stack.loads_since`)."""

    offsets: dict[str, int]
    metrics: dict[str, float]


@dataclass
class LoadReport:
    """What a stack loaded from its cache between a mark and now."""

    loads: list[Load]
    tiers: dict[str, int]  # kvtier: hit tokens per tier (its Prometheus metrics); LMCache: l1/l2 from its log
    lines: list[str]  # the log lines the loads come from


class Stack(Protocol):
    name: str
    base: str  # vLLM's URL
    starts: list[dict[str, Any]]  # one record per start (which, startup s, log)

    def start(self) -> None: ...  # everything (cache process + vLLM)
    def restart_engine(self) -> None: ...  # vLLM only; whatever the cache keeps outside it stays
    def restart_all(self) -> None: ...  # everything; only the disk tier stays
    def stop(self) -> None: ...
    def mark(self) -> Mark: ...
    def loads_since(self, mark: Mark) -> LoadReport: ...
    def settle(self) -> None: ...  # wait for background stores to land
    def describe(self) -> dict[str, Any]: ...
    def pids(self) -> list[int]: ...  # every process the stack runs now
    def disk_files(self) -> list[Path]: ...  # the files of its disk tier (none for apc)


def read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def group_pids(pgids: set[int]) -> list[int]:
    """The processes whose process group is in ``pgids`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) in pgids:
            out.append(int(stat.parent.name))
    return out


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def reset_prefix_cache(base: str) -> bool:
    """Empty vLLM's own prefix cache (not the connector's): ``POST /reset_prefix_cache`` (dev mode)."""
    with httpx.Client(timeout=30) as client:
        for _ in range(20):  # refused while blocks are held (a request that just finished): retry
            resp = client.post(base + "/reset_prefix_cache")
            if resp.status_code == 200 and resp.json().get("success"):
                return True
            time.sleep(0.25)
    return False


class _VllmStack:
    """A vLLM server (one per start) and the bookkeeping every stack shares."""

    name = "base"

    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.server: Server | None = None
        self.starts: list[dict[str, Any]] = []
        self.base = ""

    def _log(self, what: str) -> Path:
        return self.opts.log_dir / f"{self.opts.stem}.{self.name}.{len(self.starts) + 1}-{what}.log"

    def _start_vllm(self, argv: list[str], env: dict[str, str], why: str, port: int) -> None:
        log = self._log(f"vllm-{why}")
        print(f"  [{self.name}] starting vLLM ({why}; log {log})", flush=True)
        server = Server(argv, log, port, self.opts.startup_timeout, env=env)
        server.__enter__()
        self.server, self.base = server, server.base
        self.starts.append({"what": f"vllm-{why}", "startup_s": round(server.startup_s or 0, 1), "log": str(log)})

    def _stop_vllm(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    def _servers(self) -> list[Server]:
        return [self.server] if self.server is not None else []

    def pids(self) -> list[int]:
        return group_pids({s.proc.pid for s in self._servers() if s.proc is not None})

    def disk_files(self) -> list[Path]:
        return []

    @property
    def vllm_log(self) -> Path:
        assert self.server is not None
        return self.server.log_path


class KvtierStack(_VllmStack):
    name = "kvtier"

    def __init__(self, opts: StackOptions) -> None:
        super().__init__(opts)
        self.chunks = opts.tmp / "kvtier-chunks"
        self.meter: MetricsReader | None = None
        self.metrics_port: int | None = None

    def settings(self) -> list[str]:
        return [f"l2.path={self.chunks}", f"l1.max_bytes={int(self.opts.cache_gb * 1e9)}", *self.opts.kvtier_set]

    def command(self, port: int | str, metrics_port: int | str) -> list[str]:
        argv = kvtier_command("serve", "--port", str(port), "--kv-cache-gib", str(self.opts.kv_cache_gib))
        argv += ["--max-model-len", str(self.opts.max_model_len), "--served-model-name", MODEL]
        argv += ["--metrics-port", str(metrics_port)]
        for kv in self.settings():
            argv += ["--set", kv]
        return [*argv, "--", *self.opts.vllm_args()]

    def _up(self, why: str) -> None:
        self.metrics_port = h.free_port()
        port = h.free_port()
        env = checkout_env() | {"VLLM_SERVER_DEV_MODE": "1"}
        self._start_vllm(self.command(port, self.metrics_port), env, why, port)
        self.meter = MetricsReader(self.metrics_port)

    def _down(self) -> None:
        if self.meter is not None:
            self.meter.close()
            self.meter = None
        self._stop_vllm()

    def start(self) -> None:
        self._up("start")

    def restart_engine(self) -> None:
        self.settle()
        self._down()
        self._up("engine-restart")

    def restart_all(self) -> None:
        self.settle()
        self._down()
        if self.opts.kvtier_full_reset:
            print(f"  [kvtier] full reset: {self.opts.kvtier_full_reset}", flush=True)
            subprocess.run(self.opts.kvtier_full_reset, shell=True, check=True, env=checkout_env())
        self._up("full-restart")

    def stop(self) -> None:
        self._down()

    def mark(self) -> Mark:
        return Mark({"vllm": size(self.vllm_log)}, self.meter.read() if self.meter else {})

    def loads_since(self, mark: Mark) -> LoadReport:
        time.sleep(0.3)  # the worker logs the load after it returns; let the line reach the file
        text = read_from(self.vllm_log, mark.offsets["vllm"])
        tiers = hit_tokens(mark.metrics, self.meter.read()) if self.meter else {}
        lines = [ln for ln in text.splitlines() if "from kvtier" in ln and "loaded" in ln]
        return LoadReport(kvtier_loads(text), tiers, lines)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until kvtier's write-behind queue is empty (its ``kvtier_write_queue_chunks`` gauge)."""
        if self.meter is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if total(self.meter.read(), "kvtier_write_queue_chunks") == 0:
                return
            time.sleep(0.2)
        print("  [kvtier] write-behind queue not empty after 30 s", flush=True)

    def describe(self) -> dict[str, Any]:
        return {
            "command": shlex.join(self.command("<port>", "<metrics port>")),
            "chunk_dir": str(self.chunks),
            "kvtier_set": self.settings(),
            "full_reset": self.opts.kvtier_full_reset,
            "hit_tokens_metric": HIT_TOKENS,
        }

    def disk_files(self) -> list[Path]:
        return files_under(self.chunks)


class ApcStack(_VllmStack):
    name = "apc"

    def command(self, port: int | str) -> list[str]:
        argv = kvtier_command("serve", "--port", str(port), "--kv-cache-gib", str(self.opts.kv_cache_gib))
        argv += ["--max-model-len", str(self.opts.max_model_len), "--served-model-name", MODEL, "--no-kvtier"]
        return [*argv, "--", *self.opts.vllm_args()]

    def _up(self, why: str) -> None:
        port = h.free_port()
        self._start_vllm(self.command(port), checkout_env() | {"VLLM_SERVER_DEV_MODE": "1"}, why, port)

    def start(self) -> None:
        self._up("start")

    def restart_engine(self) -> None:
        self._stop_vllm()
        self._up("engine-restart")

    def restart_all(self) -> None:  # nothing outlives vLLM: the same as restarting it
        self.restart_engine()

    def stop(self) -> None:
        self._stop_vllm()

    def mark(self) -> Mark:
        return Mark({}, {})

    def loads_since(self, mark: Mark) -> LoadReport:
        return LoadReport([], {}, [])

    def settle(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"command": shlex.join(self.command("<port>"))}


class LmcacheStack(_VllmStack):
    name = "lmcache"

    def __init__(self, opts: StackOptions) -> None:
        super().__init__(opts)
        self.l2_dir = opts.tmp / "lmcache-l2"
        self.cache_server: Server | None = None
        self.zmq_port = self.http_port = 0
        self.python = opts.lmcache_venv / "bin" / "python"
        if not self.python.exists():
            raise RuntimeError(f"no LMCache venv at {opts.lmcache_venv}: run bench/peers/lmcache_venv.sh")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return env | {"LMCACHE_TRACK_USAGE": "false", "LMCACHE_DISABLE_BANNER": "1"}

    def server_command(self, zmq_port: int | str, http_port: int | str) -> list[str]:
        return [
            str(self.opts.lmcache_venv / "bin" / "lmcache"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(zmq_port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--chunk-size",
            str(LMCACHE_CHUNK),
            "--l1-size-gb",
            f"{self.opts.cache_gb:g}",
            "--eviction-policy",
            "LRU",
            "--supported-transfer-mode",
            "engine_driven",
            "--shm-name",
            f"lmcache_l1_{zmq_port}",
            "--l2-adapter",
            json.dumps({"type": "fs", "base_path": str(self.l2_dir)}),
        ]

    def vllm_command(self, port: int | str, zmq_port: int | str) -> tuple[list[str], dict[str, str]]:
        """``kvtier serve --no-kvtier``'s vLLM command and environment, run by LMCache's interpreter with its
        connector."""
        from kvtier import serve
        from kvtier.config import load_config

        options = serve.ServeOptions(
            port=int(port) if str(port).isdigit() else 0,
            max_model_len=self.opts.max_model_len,
            kv_cache_gib=self.opts.kv_cache_gib,
            kvtier=False,
            served_model_name=MODEL,
            vllm_args=tuple(self.opts.vllm_args()),
        )
        argv, env = serve.prepare(load_config(), None, {}, options)
        transfer = {
            "kv_connector": "LMCacheMPConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector",
            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": zmq_port},
        }
        argv = [str(self.python), *argv[1:], "--disable-hybrid-kv-cache-manager"]
        argv += ["--kv-transfer-config", json.dumps(transfer, separators=(",", ":"))]
        env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        env |= self._env() | {"LMCACHE_MP_TRANSFER_MODE": "engine_driven", "VLLM_SERVER_DEV_MODE": "1"}
        return argv, env

    def _server_up(self) -> None:
        self.zmq_port, self.http_port = h.free_port(), h.free_port()
        log = self._log("lmcache-server")
        print(f"  [lmcache] starting lmcache server (log {log})", flush=True)
        server = Server(
            self.server_command(self.zmq_port, self.http_port),
            log,
            self.http_port,
            self.opts.startup_timeout,
            env=self._env(),
            health="/healthcheck",
        )
        server.__enter__()
        self.cache_server = server
        self.starts.append({"what": "lmcache-server", "startup_s": round(server.startup_s or 0, 1), "log": str(log)})

    def _server_down(self) -> None:
        server, self.cache_server = self.cache_server, None
        if server is not None:
            server.stop()

    def _vllm_up(self, why: str) -> None:
        port = h.free_port()
        argv, env = self.vllm_command(port, self.zmq_port)
        self._start_vllm(argv, env, why, port)

    def start(self) -> None:
        self._server_up()
        self._vllm_up("start")

    def restart_engine(self) -> None:
        self.settle()
        self._stop_vllm()
        self._vllm_up("engine-restart")

    def restart_all(self) -> None:
        self.settle()
        self._stop_vllm()
        self._server_down()
        self._server_up()
        self._vllm_up("full-restart")

    def stop(self) -> None:
        self._stop_vllm()
        self._server_down()

    def mark(self) -> Mark:
        assert self.cache_server is not None
        return Mark({"server": size(self.cache_server.log_path)}, {})

    def loads_since(self, mark: Mark) -> LoadReport:
        assert self.cache_server is not None
        time.sleep(0.3)
        text = read_from(self.cache_server.log_path, mark.offsets["server"])
        loads = lmcache_loads(text)
        # a prefetch that read chunks from the disk tier is part of that load (kvtier's disk reads are inside its
        # load time too); one that found every chunk in memory is the lookup's, as kvtier's lookups are not timed
        from_disk = [p for p in lmcache_prefetches(text) if p.l2_chunks]
        loads += [Load(0, p.seconds, "lmcache-l2-prefetch") for p in from_disk]
        tiers: dict[str, int] = {}
        got = sum(x.tokens for x in loads)
        if got:
            l2 = min(got, sum(p.l2_chunks for p in from_disk) * LMCACHE_CHUNK)
            tiers = {k: v for k, v in (("l1", got - l2), ("l2", l2)) if v}
        lines = [ln for ln in text.splitlines() if "Retrieved" in ln or "Prefetch request completed" in ln]
        return LoadReport(loads, tiers, lines)

    def _servers(self) -> list[Server]:
        return [s for s in (self.cache_server, self.server) if s is not None]

    def disk_files(self) -> list[Path]:
        return files_under(self.l2_dir)

    def settle(self) -> None:
        time.sleep(2.0)  # LMCache's stores and L2 writes are asynchronous and expose no queue gauge

    def describe(self) -> dict[str, Any]:
        argv, env = self.vllm_command("<port>", "<zmq port>")
        keys = ("LMCACHE_MP_TRANSFER_MODE", "LMCACHE_TRACK_USAGE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_SERVER_DEV_MODE")
        version = None
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            version = subprocess.run(
                [str(self.python), "-c", "import importlib.metadata as m; print(m.version('lmcache'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        return {
            "server_command": shlex.join(self.server_command("<zmq port>", "<http port>")),
            "vllm_command": shlex.join(argv),
            "env": {k: env[k] for k in keys if k in env},
            "venv": str(self.opts.lmcache_venv),
            "lmcache_version": version,
            "l2_dir": str(self.l2_dir),
        }


def make_stack(name: str, opts: StackOptions) -> Stack:
    return {"kvtier": KvtierStack, "lmcache": LmcacheStack, "apc": ApcStack}[name](opts)
