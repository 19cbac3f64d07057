"""The step metadata the scheduler side sends the worker side (pickled by vLLM with each step).

Only what is here crosses between the processes: the worker never sees a
vLLM ``Request``, so each op carries its token ids, block ids and salt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadOp:
    """Write kvtier's KV for positions [start, end) of ``tokens`` into the request's blocks.

    ``tokens`` may go past ``end``, to the end of the chunk that holds position ``end - 1`` (a partial chunk's key
    covers all of its tokens); nothing past ``end`` is written.
    """

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    cache_salt: str | None


@dataclass
class StoreOp:
    """Store the chunks of ``tokens`` (all computed) read from the request's blocks.

    ``final``: the request has finished and its blocks are held for this store;
    the worker reports it in ``get_finished`` so vLLM frees them.
    ``prompt_tokens``: how many of ``tokens`` are the prompt. When the prompt
    ends inside a chunk and generated tokens follow, the worker also stores the
    prompt's own trailing partial chunk, so that the same prompt sent again hits
    all of it (but its last token) instead of stopping at its last full chunk.
    """

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    cache_salt: str | None
    final: bool = False
    prompt_tokens: int | None = None


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """One step's work for the worker: loads before the forward, stores after it.

    ``idle``: the step runs no forward (vLLM schedules no tokens, e.g. every
    request waits for its load): the worker may then wait briefly for its
    threads instead of returning at once (see ``WorkerSide.take_finished``).
    """

    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    idle: bool = False
