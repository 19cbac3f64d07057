"""The one place where the configured tiers become backends: used by the engine, the adapters and the CLI.

A process says *how* it opens the tiers with a :class:`TierAccess`, never
which engine or process role it is: vLLM's scheduler is an observer
(``TierAccess.observer()``), its worker shares a disk folder with the
scheduler (``TierAccess.shared()``), ``kvtier stats`` inspects
(``TierAccess.inspect()``). Each tier is named after its config section
(``l1``, ``node``, ``l2``, ``l3``, in that order): that one name is what
metrics, logs, ``LookupResult.tier_tokens`` and the docs use.

The shared tiers (``node``, ``l2``, ``l3``) read and write under one
:class:`~kvtier.security.ChunkPolicy` (:func:`chunk_policy`), held by the
stack as ``TierStack.policy``: engines register their namespace there, and
with ``[security]`` set every chunk they write is signed and every chunk they
read must carry its tenant's MAC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.codec import get_codec
from kvtier.errors import ConfigError
from kvtier.metrics import KvtierMetrics
from kvtier.security import ChunkPolicy, load_secret
from kvtier.storage.base import StorageBackend
from kvtier.storage.cpu import MemoryBackend
from kvtier.storage.disk import DiskBackend
from kvtier.storage.files import FolderAccess
from kvtier.storage.node import NodeBackend
from kvtier.storage.tiers import TierStack

if TYPE_CHECKING:  # config validates redis URLs with kvtier.storage.urls: no import cycle at load time
    from kvtier.config import KvtierConfig


@dataclass(frozen=True)
class TierAccess:
    """How this process opens the configured tiers.

    ``memory``: build the in-process tier (``l1``) if the config enables it.
    ``read_only``: tiers shared with other processes (``node``, ``l2``,
    ``l3``) are never written, evicted, touched or deleted, and nothing is
    created (an observer cannot fight a writer's budget).
    ``watch``: the disk folder notices what other processes write (the node
    tier always does: its index is the shared ledger).
    """

    memory: bool = True
    read_only: bool = False
    watch: bool = False

    @classmethod
    def observer(cls) -> TierAccess:
        """Lookups only, next to a writer in another process (vLLM's scheduler)."""
        return cls(memory=False, read_only=True, watch=True)

    @classmethod
    def shared(cls) -> TierAccess:
        """A writer whose disk folder other processes read or write too (vLLM's worker)."""
        return cls(memory=True, read_only=False, watch=True)

    @classmethod
    def inspect(cls) -> TierAccess:
        """A one-shot look at the shared tiers (``kvtier stats``): read-only, no in-process memory tier."""
        return cls(memory=False, read_only=True, watch=False)


def chunk_policy(config: KvtierConfig) -> ChunkPolicy:
    """The chunk policy of ``config``'s ``[security]`` section (its secrets read now).

    Raises ConfigError naming the setting (never the value) when a secret
    cannot be read, is unset or too short.
    """
    sec = config.security
    try:
        secret = load_secret(sec.secret_file, sec.secret_env)
        old = [load_secret(secret_file=p) for p in sec.old_secret_files]
        old += [load_secret(secret_env=e) for e in sec.old_secret_envs]
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"security: cannot load a chunk-signing secret: {why}") from None
    return ChunkPolicy(secret, [s for s in old if s is not None], encrypt=sec.encrypt)


def _folder_access(group: str | None) -> FolderAccess:
    try:
        return FolderAccess.for_group(int(group) if group is not None and group.isdigit() else group)
    except ValueError as exc:
        raise ConfigError(f"l2.shared_group: {exc}") from None


def build_backends(
    config: KvtierConfig, access: TierAccess = TierAccess(), *, policy: ChunkPolicy | None = None
) -> list[StorageBackend]:
    """The backends ``config`` enables, fastest first, opened as ``access`` says (not started).

    ``policy``: the shared tiers' chunk policy (default: :func:`chunk_policy` of ``config``).
    Raises ValueError if that leaves no tier, ConfigError if a secret cannot be loaded.
    """
    if policy is None:
        policy = chunk_policy(config)
    backends: list[StorageBackend] = []
    if config.l1.enabled and access.memory:
        backends.append(
            MemoryBackend(
                int(config.l1.max_bytes),
                codec=get_codec(config.l1.codec),
                name="l1",
                eviction=config.l1.policy,
                admission=config.l1.admission,
            )
        )
    if config.node.enabled:
        assert config.node.max_bytes is not None  # the config refuses an enabled node tier without a budget
        backends.append(
            NodeBackend(
                config.node_dir,
                int(config.node.max_bytes),
                codec=get_codec(config.node.codec),
                name="node",
                read_only=access.read_only,
                policy=policy,
                eviction=config.node.policy,
            )
        )
    if config.l2.enabled:
        backends.append(
            DiskBackend(
                config.chunk_dir,
                int(config.l2.max_bytes),
                fsync=config.l2.fsync,
                codec=get_codec(config.l2.codec),
                name="l2",
                watch=access.watch,
                read_only=access.read_only,
                policy=policy,
                eviction=config.l2.policy,
                access=_folder_access(config.l2.shared_group),
                map_reads=config.l2.map_reads,
            )
        )
    if config.l3.enabled:
        from kvtier.storage.redis import RedisBackend  # redis-py is optional

        try:
            l3 = RedisBackend(
                config.l3,
                tenant=config.tenant,
                codec=get_codec(config.l3.codec),
                name="l3",
                read_only=access.read_only,
                policy=policy,
            )
        except OSError as exc:  # the password file
            raise ConfigError(f"l3.password_file: cannot read it: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        backends.append(l3)
    if not backends:
        enabled = "node, l2 or l3" if not access.memory else "l1, node, l2 or l3"
        raise ValueError(f"no tier to open: enable at least one of {enabled}")
    return backends


def build_tiers(
    config: KvtierConfig, access: TierAccess = TierAccess(), *, metrics: KvtierMetrics | None = None
) -> TierStack:
    """A :class:`TierStack` over :func:`build_backends` (not started), holding their chunk policy.

    With ``[events]`` enabled and a writing ``access``, the stack publishes its tier events (the
    publisher binds its endpoint here: zmq.ZMQError if it cannot). A read-only process never publishes.
    """
    policy = chunk_policy(config)
    backends = build_backends(config, access, policy=policy)
    events = None
    if config.events.enabled and not access.read_only:
        from kvtier.storage.events import EventPublisher

        e = config.events
        events = EventPublisher(
            e.endpoint,
            topic=e.topic,
            replay_endpoint=e.replay_endpoint,
            connect=e.connect,
            buffer_steps=e.buffer_steps,
            hwm=e.hwm,
            max_queue=e.max_queue,
        )
    return TierStack(
        backends,
        write_queue_bytes=int(config.write_queue_bytes),
        metrics=metrics,
        events=events,
        policy=policy,
        store_nice=config.store_nice,
    )
