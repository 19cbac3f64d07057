"""kvtier as a vLLM KV connector.

Load it in vLLM with::

    kv_transfer_config = {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.adapters.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": "/path/kvtier.toml", "set": {"l2.max_bytes": "20GB"}},
    }

or run ``kvtier serve``, which does this for you (and makes the connector's
logs show up in vLLM's output; with ``LLM(...)`` configure logging yourself,
see :mod:`.connector`). ``KvtierConnector`` needs vLLM installed (the
``vllm`` extra) and is imported on first access; importing this package
changes nothing, logging included.

Modules, one job each: ``connector`` (the facade vLLM loads), ``settings``
(what both sides derive from vLLM's and kvtier's config), ``tenants``
(``cache_salt`` -> tenant engine), ``metadata`` (the step's loads and stores),
``scheduler`` and ``worker`` (the two sides), ``stats`` (worker counters,
``/metrics``), ``paged`` (vLLM's paged blocks <-> chunks; no vLLM import) and
``compat``: the only module that uses vLLM beyond the public connector base
class, so a new vLLM version is a change there.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvtierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvtierConnector":
        from kvtier.adapters.vllm.connector import KvtierConnector

        return KvtierConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
