"""Every vLLM API kvtier uses beyond the public connector base class, for vLLM 0.32.

The rest of ``kvtier.adapters.vllm`` talks to vLLM only through this module
and ``vllm.distributed.kv_transfer.kv_connector.v1.base`` (``KVConnectorBase_V1``,
``KVConnectorMetadata``, ``KVConnectorRole``). So porting to another vLLM
version changes this file only. What is here:

* the import paths of vLLM's types (for annotations only);
* what kvtier reads off ``VllmConfig`` (:func:`engine_config`), a request
  (:class:`RequestView`), a ``SchedulerOutput`` (:func:`scheduled_requests`) and
  a ``KVConnectorOutput`` (:func:`invalid_block_ids`);
* the cache-write kernel binding (:func:`cache_writer`: the private
  ``_get_attn_isa`` and ``_custom_ops.cpu_attn_reshape_and_cache``);
* vLLM's logging set-up: the env variables it reads and its default
  logging dict-config (:func:`logging_config`), used by ``kvtier serve``;
* quiet waits on vLLM's shared-memory message queues during idle steps
  (:func:`install_quiet_waits`, :func:`quiet_waits`: a wrapper around the
  private ``shm_broadcast.SpinCondition.wait``).

vLLM is imported inside the functions, never at module level, so importing
this module is cheap (``kvtier serve`` does it before vLLM starts).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # vLLM's types, for annotations here and in the other modules (``X as X``: re-exported)
    from vllm.config import VllmConfig as VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks as KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput as SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig as KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput as KVConnectorOutput
    from vllm.v1.request import Request as Request

    from kvtier.adapters.vllm.paged import WriteFn

#: vLLM reads a logging dict-config (JSON) from the file this variable names.
LOGGING_CONFIG_ENV = "VLLM_LOGGING_CONFIG_PATH"
#: "0" turns vLLM's logging set-up off; a config file is then refused.
CONFIGURE_LOGGING_ENV = "VLLM_CONFIGURE_LOGGING"


# -- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """What kvtier reads off vLLM's ``VllmConfig``."""

    extra: dict[str, Any]  # kv_transfer_config.kv_connector_extra_config
    block_size: int
    cache_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    num_layers: int  # on this pipeline rank
    num_kv_heads: int  # on this tensor-parallel rank
    head_dim: int
    dtype: torch.dtype
    model_path: str
    served_names: tuple[str, ...] = ()  # the model names clients send
    hf_config: Any = None  # the model's transformers config (model_config.hf_config)


@dataclass(frozen=True)
class CacheGroup:
    """One of vLLM's KV-cache groups, as kvtier judges it: its spec's kind, its layers, its window."""

    kind: str  # the spec class name: FullAttentionSpec, SlidingWindowSpec, MambaSpec, MLAAttentionSpec, ...
    num_layers: int
    sliding_window: int | None


def cache_groups(kv_cache_config: KVCacheConfig | None) -> list[CacheGroup] | None:
    """vLLM's KV-cache groups (``kv_cache_config.kv_cache_groups``), or None where vLLM passed no config."""
    if kv_cache_config is None:
        return None
    groups = []
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        window = getattr(spec, "sliding_window", None)
        groups.append(CacheGroup(type(spec).__name__, len(group.layer_names), int(window) if window else None))
    return groups


def engine_config(vllm_config: VllmConfig) -> EngineConfig:
    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    return EngineConfig(
        extra=dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {}),
        block_size=int(cache.block_size),
        cache_dtype=str(cache.cache_dtype),
        tensor_parallel_size=int(parallel.tensor_parallel_size),
        pipeline_parallel_size=int(parallel.pipeline_parallel_size),
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        dtype=model.dtype,
        model_path=str(model.model),
        served_names=_names(model.served_model_name),
        hf_config=getattr(model, "hf_config", None),
    )


def _names(served: str | list[str] | None) -> tuple[str, ...]:
    if served is None:
        return ()
    return (served,) if isinstance(served, str) else tuple(served)


def tokenizer_encode(model_path: str) -> Any:
    """Text -> the token ids vLLM's completions endpoint would prompt with (the tokenizer loads on first call)."""
    state: dict[str, Any] = {}

    def encode(text: str) -> list[int]:
        if "tok" not in state:
            from vllm.tokenizers.registry import get_tokenizer

            state["tok"] = get_tokenizer(model_path)
        return list(state["tok"].encode(text))

    return encode


# -- scheduler side: requests and scheduler output ----------------------------------------------------------


class RequestView:
    """The parts of a vLLM ``Request`` the scheduler side reads (the request keeps growing as it decodes)."""

    __slots__ = ("_r",)

    def __init__(self, request: Request) -> None:
        self._r = request

    @property
    def id(self) -> str:
        return self._r.request_id

    @property
    def cache_salt(self) -> str | None:
        return self._r.cache_salt

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens so far."""
        return self._r.num_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return self._r.num_prompt_tokens

    @property
    def num_computed_tokens(self) -> int:
        return self._r.num_computed_tokens

    def tokens(self, end: int) -> list[int]:
        """The first ``end`` token ids (prompt, then generated)."""
        return list(self._r.all_token_ids[:end])

    def unsupported(self) -> str | None:
        """Why kvtier must not serve or store this request (its KV depends on more than the token ids)."""
        r = self._r
        if getattr(r, "lora_request", None) is not None:
            return "LoRA request"
        if getattr(r, "mm_features", None):
            return "multimodal inputs"
        if getattr(r, "prompt_embeds", None) is not None:
            return "prompt embeddings"
        return None


@dataclass(frozen=True)
class ScheduledRequest:
    """One request scheduled in a step.

    ``block_ids``: all the request's blocks when ``replace`` (a new or resumed
    request), else the blocks added this step (often none).
    """

    req_id: str
    num_computed_tokens: int  # before this step, local prefix-cache and external hits included
    num_scheduled_tokens: int
    block_ids: list[int]
    replace: bool


def scheduled_requests(so: SchedulerOutput) -> Iterator[ScheduledRequest]:
    """The requests of a step: new ones first, then running and resumed ones (one KV cache group)."""
    for new in so.scheduled_new_reqs:
        scheduled = so.num_scheduled_tokens.get(new.req_id, 0)
        yield ScheduledRequest(new.req_id, new.num_computed_tokens, scheduled, list(new.block_ids[0]), True)
    cached = so.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        new_ids = cached.new_block_ids[i]
        yield ScheduledRequest(
            req_id,
            cached.num_computed_tokens[i],
            so.num_scheduled_tokens.get(req_id, 0),
            list(new_ids[0]) if new_ids else [],
            req_id in cached.resumed_req_ids,
        )


def scheduled_tokens(so: SchedulerOutput) -> int:
    """How many tokens the step computes (0: no forward runs, vLLM only polls the connector)."""
    return int(so.total_num_scheduled_tokens)


def invalid_block_ids(output: KVConnectorOutput) -> set[int]:
    """The blocks the worker reported from ``get_block_ids_with_load_errors`` this step."""
    return set(output.invalid_block_ids or ())


def finished_loads(output: KVConnectorOutput) -> set[str]:
    """The requests whose asynchronous load the worker reported over this step (filled or not)."""
    return set(output.finished_recving or ())


def block_ids(blocks: KVCacheBlocks) -> list[int]:
    """All block ids of a request's allocation (one KV cache group)."""
    return list(blocks.get_block_ids()[0])


# -- worker side: the cache-write kernel ----------------------------------------------------------------------


def cache_writer(sample: torch.Tensor, head_dim: int) -> WriteFn | None:
    """vLLM's own cache-write kernel for layer tensors like ``sample``, or None where kvtier has no binding.

    Bound for the CPU build only (``CPU_ATTN``: ``sample`` is
    ``[num_blocks, H, block_size, 2*D]``, the kernel picked per ISA as vLLM
    picks it for this dtype and shape). A GPU build needs its kernel bound here.
    """
    if sample.device.type != "cpu":
        return None
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads, block_size = sample.shape[1], sample.shape[2]
    isa = _get_attn_isa(sample.dtype, block_size, head_dim)

    def write(key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor, slots: torch.Tensor) -> None:
        kc, vc = layer.view(layer.shape[0], heads, 2 * block_size, head_dim).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

    return write


# -- logging --------------------------------------------------------------------------------------------------


def configures_logging(env: Mapping[str, str]) -> bool:
    """Whether vLLM applies a logging config in processes with environment ``env`` (``VLLM_CONFIGURE_LOGGING``)."""
    try:
        return bool(int(env.get(CONFIGURE_LOGGING_ENV, "1")))
    except ValueError:
        return True


def logging_config(kvtier_level: str) -> dict[str, Any]:
    """vLLM's default logging dict-config, plus a ``kvtier`` logger at ``kvtier_level`` on a handler like vLLM's.

    The result is what vLLM would apply by itself in this environment
    (``VLLM_LOGGING_LEVEL``, ``VLLM_LOGGING_STREAM``, colour), so vLLM's own
    output is unchanged when it is handed back through :data:`LOGGING_CONFIG_ENV`.
    """
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    handler = dict(config["handlers"]["vllm"], level=kvtier_level)
    config["handlers"]["kvtier"] = handler
    config["loggers"]["kvtier"] = {"handlers": ["kvtier"], "level": kvtier_level, "propagate": False}
    return config


# -- quiet waits on vLLM's message queues ---------------------------------------------------------------------

_quiet = False  # this process's next shared-memory-queue waits go straight to vLLM's idle (sleeping) wait
_installed: bool | None = None  # None: not tried yet


def install_quiet_waits() -> bool:
    """Let :func:`quiet_waits` put this process's vLLM message-queue reads to sleep; False if this vLLM lacks the hook.

    vLLM's engine core and its worker process pass each step over shared
    memory (``shm_broadcast.MessageQueue``); a reader that read a message in
    the last second (``SpinCondition.busy_loop_s``, 1 s, no setting or env
    variable changes it in vLLM 0.32) spins on ``sched_yield`` instead of
    sleeping on the queue's notify socket. While every request waits for its
    kvtier load, vLLM runs empty steps back to back, and the engine core spent
    one whole core spinning on the worker's reply: on a two-core machine, half
    of what the load threads could use. The wrapper only marks the queue as
    idle for that wait (``last_read`` far in the past), so vLLM's own idle
    path runs: a zmq poll that the writer's notify (sent with every message)
    wakes. Idempotent.
    """
    global _installed
    if _installed is not None:
        return _installed
    try:
        from vllm.distributed.device_communicators import shm_broadcast

        cond = shm_broadcast.SpinCondition
        original = cond.wait
        if not hasattr(cond, "record_read"):  # what resets last_read after each read
            raise AttributeError("SpinCondition.record_read")
    except (ImportError, AttributeError):
        _installed = False
        return False

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        if _quiet and getattr(self, "is_reader", False) and getattr(self, "poller", None) is not None:
            self.last_read = float("-inf")  # idle: poll the notify socket (record_read resets it after the read)
        return original(self, timeout_ms)

    wait.__wrapped__ = original  # type: ignore[attr-defined]
    cond.wait = wait
    _installed = True
    return True


def quiet_waits(on: bool) -> None:
    """Whether this process's next message-queue waits sleep (see :func:`install_quiet_waits`) or spin (vLLM's way)."""
    global _quiet
    _quiet = on
