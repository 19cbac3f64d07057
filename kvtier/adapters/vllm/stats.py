"""The worker's counters (logged at shutdown) and kvtier's own ``/metrics`` endpoint, besides vLLM's."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kvtier.metrics import KvtierMetrics

log = logging.getLogger("kvtier.vllm")


@dataclass
class WorkerStats:
    loaded_tokens: int = 0
    failed_loads: int = 0
    stored_chunks: int = 0

    def __str__(self) -> str:
        return (
            f"loaded {self.loaded_tokens} tokens, {self.failed_loads} failed loads, stored {self.stored_chunks} chunks"
        )


class MetricsEndpoint:
    """Serves ``metrics`` (the worker's tiers) on 127.0.0.1:``port``; nothing when ``port`` is None."""

    def __init__(self, metrics: KvtierMetrics, port: int | None) -> None:
        self._server: Any = None
        if port is not None:
            self._server = metrics.serve(port)
            log.info("kvtier metrics on http://127.0.0.1:%d/metrics", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
