"""``kvtier stats`` and ``kvtier clear``: look at or empty the persistent tiers of a cache that may be live.

Both work next to running engines. ``stats`` opens every tier read-only
(:meth:`TierAccess.inspect`): it never writes, evicts, touches or deletes a
file, never removes another process's in-flight ``.tmp`` files, and creates
no folder (a cache folder that does not exist is an empty tier). ``clear``
removes the chunks of the tiers it names, and only those: the node tier's and
the disk tier's files (through their ledgers, so live writers' budgets stay
right), and in Redis only the keys of the configured prefix and tenant. The
memory tier (``l1``) lives inside each engine process and is neither
counted nor cleared here. The node tier counts when the config enables it
(``kvtier serve`` turns it on by itself: pass ``--set node.enabled=true
--set node.max_bytes=…`` to look at it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError

if TYPE_CHECKING:  # storage (torch) is imported on use: `kvtier --help` and `serve` stay light
    from kvtier.storage import StorageBackend, TierAccess

PERSISTENT_TIERS = ("node", "l2", "l3")


@dataclass(frozen=True)
class TierReport:
    """One persistent tier as ``stats`` shows it."""

    name: str
    where: str  # folder, or redacted URL with prefix and tenant
    entries: int | None  # None: not countable from here (Redis: shared, server-managed)
    used_bytes: int | None
    max_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def describe(config: KvtierConfig, name: str) -> str:
    """Where tier ``name`` keeps its chunks, for humans (credentials redacted)."""
    if name == "node":
        return f"node memory {config.node_dir}"
    if name == "l2":
        return f"disk {config.chunk_dir}"
    if name == "l3":
        from kvtier.storage.urls import redact

        return f"redis {redact(config.l3.url)} (prefix {config.l3.key_prefix}, tenant {config.tenant or '_'})"
    raise ConfigError(f"unknown persistent tier {name!r}; known: {', '.join(PERSISTENT_TIERS)}")


def enabled_tiers(config: KvtierConfig) -> list[str]:
    """The persistent tiers ``config`` enables, in order (``node.enabled`` None counts as off)."""
    return [name for name in PERSISTENT_TIERS if getattr(config, name).enabled is True]


def _open(config: KvtierConfig, access: TierAccess, only: Sequence[str] = PERSISTENT_TIERS) -> list[StorageBackend]:
    """Start the enabled persistent tiers named in ``only`` (the others are not even opened)."""
    from kvtier.storage import build_backends

    off = {name: getattr(config, name).model_copy(update={"enabled": False}) for name in PERSISTENT_TIERS}
    config = config.model_copy(update={name: section for name, section in off.items() if name not in only})
    if not enabled_tiers(config):
        return []
    backends = build_backends(config, access)
    for backend in backends:
        backend.start()
    return backends


def stats(config: KvtierConfig) -> list[TierReport]:
    """A read-only look at every enabled persistent tier. Raises StorageError if one cannot be opened."""
    from kvtier.storage import TierAccess

    reports = []
    for backend in _open(config, TierAccess.inspect()):
        s = backend.stats()
        shared = backend.name == "l3"
        reports.append(
            TierReport(
                backend.name,
                describe(config, backend.name),
                None if shared else s.entries,
                None if shared else s.used_bytes,
                s.max_bytes,
            )
        )
        backend.close()
    return reports


def clear(config: KvtierConfig, tiers: Sequence[str]) -> dict[str, int]:
    """Remove every chunk of the named persistent tiers (each must be enabled); returns chunks removed per tier."""
    unknown = [t for t in tiers if t not in enabled_tiers(config)]
    if unknown:
        raise ConfigError(
            f"cannot clear {', '.join(unknown)}: the enabled persistent tiers are {enabled_tiers(config)}"
        )
    from kvtier.storage import TierAccess

    removed = {}
    for backend in _open(config, TierAccess(memory=False, read_only=False, watch=False), only=tiers):
        removed[backend.name] = backend.clear()
        backend.close()
    return removed
