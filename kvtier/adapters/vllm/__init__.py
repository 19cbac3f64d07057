"""kvtier as a vLLM KV connector.

Load it in vLLM with::

    kv_transfer_config = {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.adapters.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": "/path/kvtier.toml", "set": {"l2.max_bytes": "20GB"}},
    }

or run ``kvtier serve``, which does this for you. ``paged`` (layout
conversions) imports without vLLM; ``KvtierConnector`` needs vLLM installed
(the ``vllm`` extra) and is imported on first access.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvtierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvtierConnector":
        from kvtier.adapters.vllm.connector import KvtierConnector

        return KvtierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
