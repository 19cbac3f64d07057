"""What both connector sides derive, identically, from vLLM's config and the kvtier config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.adapters.vllm import compat
from kvtier.config import KvtierConfig, load_config
from kvtier.errors import ConfigError
from kvtier.fingerprint import folder_fingerprint
from kvtier.keys import Namespace
from kvtier.layout import KVLayout
from kvtier.models import check_supported, unsupported_reason

if TYPE_CHECKING:
    from kvtier.adapters.vllm.compat import CacheGroup, VllmConfig

#: The keys kvtier takes in ``kv_connector_extra_config``.
EXTRA_KEYS = frozenset({"config", "set", "metrics_port"})


def model_refusal(hf_config: object) -> str | None:
    """Why the vLLM connector cannot serve this model (a transformers config), or None if it can.

    Everything :func:`kvtier.models.unsupported_reason` refuses, and models
    with sliding-window layers: vLLM frees (or reuses) the blocks of tokens
    that fall out of a window, so the connector could not read a whole prefix
    back to store it. (The Hugging Face adapter caches them.)
    """
    reason = unsupported_reason(hf_config)  # type: ignore[arg-type]
    if reason is not None:
        return reason
    plan = check_supported(hf_config)  # type: ignore[arg-type]
    if any(plan.windows):
        kinds = sorted({w for w in plan.windows if w})
        return (
            f"sliding-window attention layers (window {', '.join(map(str, kinds))}): vLLM frees the blocks that leave "
            "a window, so the connector cannot read a whole prefix back; the vLLM connector supports models whose "
            "every layer is full attention (the Hugging Face adapter caches sliding-window models)"
        )
    return None


def describe_groups(groups: list[CacheGroup] | None) -> str:
    """One line naming vLLM's KV-cache groups, e.g. ``FullAttentionSpec x30``; ``none passed`` for None."""
    if groups is None:
        return "none passed"
    return ", ".join(
        f"{g.kind} x{g.num_layers}" + (f" (window {g.sliding_window})" if g.sliding_window else "") for g in groups
    )


def check_kv_cache_groups(groups: list[CacheGroup] | None, num_layers: int) -> None:
    """Accept exactly one full-attention KV-cache group holding every layer; raise ConfigError naming the groups else.

    ``None`` (vLLM handed the connector no ``kv_cache_config``) passes: the
    model check (:func:`model_refusal`) and the worker's registered tensors
    (one per layer, probed) still guard it.
    """
    if groups is None:
        return
    if len(groups) == 1 and groups[0].kind == "FullAttentionSpec" and groups[0].num_layers == num_layers:
        return
    raise ConfigError(
        f"the kvtier connector supports one full-attention KV-cache group holding all {num_layers} layers; "
        f"vLLM made {len(groups)} group(s): {describe_groups(groups)}. Hybrid, sliding-window, Mamba and MLA "
        "caches are not supported by the vLLM connector yet"
    )


@dataclass(frozen=True)
class ConnectorSettings:
    """The kvtier config, the namespace (model fingerprint + layout + tenant), vLLM's block size, the metrics port."""

    config: KvtierConfig
    namespace: Namespace
    block_size: int
    metrics_port: int | None
    model_path: str = ""
    served_names: tuple[str, ...] = ()

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorSettings:
        return cls.from_engine(compat.engine_config(vllm_config))

    @classmethod
    def from_engine(cls, engine: compat.EngineConfig) -> ConnectorSettings:
        """Check what kvtier supports and build the settings; raises ConfigError with the fix where there is one."""
        extra = engine.extra
        unknown = set(extra) - EXTRA_KEYS
        if unknown:
            raise ConfigError(
                f"unknown kv_connector_extra_config keys {sorted(unknown)}; kvtier takes {sorted(EXTRA_KEYS)}"
            )
        overrides = extra.get("set") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f'kv_connector_extra_config "set" must map config keys to values, got {overrides!r}')
        config = load_config(extra.get("config"), overrides=overrides)
        block_size = engine.block_size
        if config.chunk_size % block_size:
            raise ConfigError(
                f"kvtier chunk_size {config.chunk_size} must be a multiple of vLLM's block size {block_size} "
                f"(set chunk_size to e.g. {block_size * max(1, round(config.chunk_size / block_size))})"
            )
        if engine.tensor_parallel_size > 1 or engine.pipeline_parallel_size > 1:
            raise ConfigError("the kvtier connector supports tensor/pipeline parallel size 1 only")
        if engine.cache_dtype != "auto":
            raise ConfigError(
                f"the kvtier connector needs kv_cache_dtype 'auto' (the model dtype), got {engine.cache_dtype}"
            )
        if engine.hf_config is not None:
            refusal = model_refusal(engine.hf_config)
            if refusal is not None:
                raise ConfigError(f"the kvtier connector cannot serve {engine.model_path}: {refusal}")
        layout = KVLayout.from_torch_dtype(engine.num_layers, engine.num_kv_heads, engine.head_dim, engine.dtype)
        fingerprint = folder_fingerprint(engine.model_path, config.cache_dir)
        namespace = Namespace(fingerprint, layout, config.tenant, config.hash)
        port = extra.get("metrics_port")
        return cls(
            config,
            namespace,
            block_size,
            int(port) if port is not None else None,
            model_path=engine.model_path,
            served_names=engine.served_names,
        )
