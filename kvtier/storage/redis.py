"""L3: chunks in Redis (standalone or Redis Cluster), shared by every process and machine that reaches it.

Each chunk is one string value under ``<key_prefix>:<tenant or "_">:<chunk key hex>``
holding the encoded chunk (``kvtier.chunk.encode(chunk, codec)``, see
:mod:`kvtier.chunk`). Every read checks the framing, the stored key, the length
and the payload checksum; a value that fails is a miss, counted in
``corrupt``, logged, and deleted.

Budget: Redis manages its own memory (``maxmemory`` and its eviction policy),
so this backend emulates no eviction. ``stats()`` reports ``max_bytes=0``
(no client-side budget) and, for ``entries`` / ``used_bytes``, the chunks and
bytes *this process* has written — not what the server holds, which other
processes share and Redis may evict or expire at any time (ask the server:
``INFO memory``, ``DBSIZE``). An evicted chunk is a hole in a prefix; the
engine's lookup stops there.

Failures: every Redis error (connection refused, timeout, ``-ERR``, cluster
down) is caught and answered as a miss (``contains`` False, ``get`` None,
``put`` False), counted in ``errors`` and logged at most once per
``retry_interval_s`` (and at most once a second). After a failure a circuit breaker answers every call
as a miss, without touching the network, for ``retry_interval_s``; then one
call probes Redis again. A dead or black-holed Redis therefore costs at most
one ``timeout_s`` per interval. redis-py's own retries are off (each call
makes one attempt); its connection pool reconnects on its own. ``put``
refused by a full Redis (``OOM``, under ``maxmemory-policy noeviction``) is
a rejected put, not a failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from kvtier.chunk import Chunk, decode_header, decode_payload
from kvtier.codec import Codec, get_codec
from kvtier.errors import ChunkFormatError
from kvtier.keys import DIGEST_SIZE, ChunkKey
from kvtier.storage.base import BackendStats, encode_or_none

if TYPE_CHECKING:
    from kvtier.config import L3Config

log = logging.getLogger(__name__)

T = TypeVar("T")

_STANDALONE_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
_HEALTH_CHECK_INTERVAL_S = 30
_SCAN_BATCH = 500
_MIN_LOG_INTERVAL_S = 1.0
_GLOB_SPECIAL = "\\*?[]"
_GET_BATCH = 4  # chunks per GET pipeline (4 x 256 tokens of SmolLM2 fp32 = 47 MB)


class RedisBackend:
    """Chunks as Redis string values. Thread-safe; the constructor does no I/O (``start`` connects)."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "kvtier",
        tenant: str | None = None,
        ttl_s: int | None = None,
        connect_timeout_s: float = 0.5,
        timeout_s: float = 0.5,
        max_connections: int = 16,
        retry_interval_s: float = 2.0,
        codec: Codec | None = None,
        name: str = "redis",
    ) -> None:
        if not key_prefix:
            raise ValueError("key_prefix must be non-empty")
        if tenant is not None and not tenant:
            raise ValueError("tenant must be None or a non-empty string")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")
        if connect_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError("connect_timeout_s and timeout_s must be positive")
        if max_connections <= 0:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        if retry_interval_s < 0:
            raise ValueError(f"retry_interval_s must be >= 0, got {retry_interval_s}")
        _require_redis_py()
        self._cluster_nodes, self._cluster_auth = _parse_url(url)
        self.name = name
        self.url = url
        self.key_prefix = key_prefix
        self.tenant = tenant
        self.ttl_s = ttl_s
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.retry_interval_s = retry_interval_s
        self.codec = codec  # None: raw payload bytes
        self._base = f"{key_prefix}:{tenant or '_'}:".encode()
        self._lock = threading.Lock()  # counters and breaker state
        self._connect_lock = threading.Lock()
        # One call holds at most one connection per node, so this keeps the pools within max_connections:
        # a caller waits for a slot (up to timeout_s) instead of redis-py failing with "too many connections".
        self._slots = threading.BoundedSemaphore(max_connections)
        self._client: Any = None
        self._started = False
        self._retry_at = 0.0  # monotonic time before which the breaker answers misses
        self._tripped = False
        self._last_log = float("-inf")
        self._n = dict.fromkeys(
            (
                "hits",
                "misses",
                "errors",
                "corrupt",
                "skipped",
                "stored",
                "rejected",
                "bytes_read",
                "bytes_written",
            ),
            0,
        )

    @classmethod
    def from_config(cls, cfg: L3Config, tenant: str | None) -> RedisBackend:
        """A backend for ``cfg`` whose keys live under ``<cfg.key_prefix>:<tenant or "_">:``."""
        return cls(
            cfg.url,
            key_prefix=cfg.key_prefix,
            tenant=tenant,
            ttl_s=cfg.ttl_s,
            connect_timeout_s=cfg.connect_timeout_s,
            timeout_s=cfg.timeout_s,
            max_connections=cfg.max_connections,
            retry_interval_s=cfg.retry_interval_s,
            codec=get_codec(cfg.codec),
        )

    @property
    def cluster(self) -> bool:
        return self._cluster_nodes is not None

    def redis_key(self, key: ChunkKey) -> bytes:
        """The Redis key of a chunk key (binary-safe, tenant-scoped)."""
        return self._base + key.hex().encode()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the client and PING the server once. Idempotent.

        Never raises for an unreachable Redis: the failure is counted and
        logged, the breaker opens, and later calls reconnect on their own.
        """
        with self._lock:
            if self._started:
                return
            self._started = True
        if self._call("ping", lambda client: client.ping()) is not None:
            log.info("redis tier %s: connected (keys %s*)", _redact(self.url), self._base.decode())

    def close(self) -> None:
        """Disconnect. Idempotent; calls after ``close`` answer misses without I/O."""
        with self._lock:
            self._started = False
        with self._connect_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _make_client(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        common: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout_s,
            "socket_timeout": self.timeout_s,
            "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
            "max_connections": self.max_connections,
        }
        no_retry = Retry(NoBackoff(), 0)  # one attempt per call: the breaker, not redis-py, decides when to retry
        if self._cluster_nodes is None:
            return redis.Redis.from_url(self.url, retry=no_retry, **common)
        from redis.cluster import ClusterNode, RedisCluster

        user, password, tls = self._cluster_auth
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self._cluster_nodes],
            retry=no_retry,
            username=user,
            password=password,
            ssl=tls,
            **common,
        )

    def _get_client(self) -> Any:
        with self._connect_lock:
            if self._client is None:
                self._client = self._make_client()  # RedisCluster discovers the topology here (I/O, may raise)
            return self._client

    # -- failure handling --------------------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Whether a call may go to Redis now (breaker closed, or this call is the probe after an interval)."""
        with self._lock:
            if not self._started:
                return False
            now = time.monotonic()
            if now < self._retry_at:
                self._n["skipped"] += 1
                return False
            if self._tripped:
                self._retry_at = now + self.retry_interval_s  # others keep skipping while this probe runs
            return True

    def _call(self, op: str, fn: Callable[[Any], T]) -> T | None:
        """``fn(client)``, or None if the breaker is open, no connection slot frees up, or Redis fails."""
        import redis
        from redis.exceptions import RedisClusterException

        if not self._admit():
            return None
        if not self._slots.acquire(timeout=self.timeout_s):
            with self._lock:
                self._n["skipped"] += 1
            return None
        try:
            result = fn(self._get_client())
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._failed(op, exc)
            return None
        finally:
            self._slots.release()
        self._succeeded()
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._n["errors"] += 1
            self._tripped = True
            self._retry_at = now + self.retry_interval_s
            quiet = now - self._last_log < max(self.retry_interval_s, _MIN_LOG_INTERVAL_S)
            if not quiet:
                self._last_log = now
        if not quiet:
            log.warning(
                "redis tier %s: %s failed (%s: %s); answering misses for %.1fs",
                _redact(self.url),
                op,
                type(exc).__name__,
                exc,
                self.retry_interval_s,
            )

    def _succeeded(self) -> None:
        with self._lock:
            recovered, self._tripped = self._tripped, False
            self._retry_at = 0.0
        if recovered:
            log.info("redis tier %s: reachable again", _redact(self.url))

    def _pipeline(self, client: Any, build: Callable[[Any], None], *, raise_on_error: bool = True) -> list[Any]:
        pipe = client.pipeline(transaction=False)  # in cluster mode the pipeline splits commands by node
        try:
            build(pipe)
            return pipe.execute(raise_on_error=raise_on_error)
        finally:
            pipe.reset()

    # -- protocol ----------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys exist in Redis: one pipelined EXISTS per key, one round trip per node."""
        if not keys:
            return []

        def build(pipe: Any) -> None:
            for k in keys:
                pipe.exists(self.redis_key(k))

        found = self._call("contains", lambda c: self._pipeline(c, build))
        if found is None:
            return [False] * len(keys)
        return [bool(n) for n in found]

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        """Pipelined GETs (MGET would fail across cluster slots); every value is verified before it is returned.

        The returned chunks own their memory (a copy of the received payload).
        """
        if not keys:
            return []
        # Redis answers a pipeline only once it has run all of it: a 4096-token prefix in one pipeline means
        # ~190 MB before the first byte (and in Redis's output buffer), which can outlast timeout_s. Small
        # pipelines keep the first byte near and the buffer small; a failed one ends the prefix there.
        values: list[bytes | None] = []
        for start in range(0, len(keys), _GET_BATCH):
            part = keys[start : start + _GET_BATCH]

            def build(pipe: Any, part: Sequence[ChunkKey] = part) -> None:
                for k in part:
                    pipe.get(self.redis_key(k))

            got = self._call("get", lambda c, build=build: self._pipeline(c, build))
            if got is None:
                values.extend([None] * (len(keys) - len(values)))
                break
            values.extend(got)
        found: list[Chunk | None] = []
        bad: list[ChunkKey] = []
        for key, value in zip(keys, values, strict=True):
            chunk = self._decode(key, value) if value is not None else None
            if value is not None and chunk is None:
                bad.append(key)
            found.append(chunk)
        with self._lock:
            self._n["hits"] += sum(c is not None for c in found)
            self._n["misses"] += sum(v is None for v in values)
            self._n["bytes_read"] += sum(len(v) for v in values if v is not None)
        if bad:
            self.delete(bad)
        return found

    def _decode(self, key: ChunkKey, value: bytes) -> Chunk | None:
        try:
            view = memoryview(value)
            header = decode_header(view)
            if header.key != key:
                raise ChunkFormatError(f"value holds chunk {header.key.hex()[:16]}")
            if len(value) != header.offset + header.payload_len:
                raise ChunkFormatError(f"value is {len(value)} bytes, header says {header.offset + header.payload_len}")
            return decode_payload(header, view[header.offset :])  # raw: shares the received bytes, no copy
        except (ChunkFormatError, ValueError) as exc:
            log.warning("redis tier: dropping chunk %s: %s", key.hex()[:16], exc)
            with self._lock:
                self._n["corrupt"] += 1
            return None

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Pipelined SETs (with EX when ``ttl_s`` is set); False where Redis failed or refused (OOM)."""
        if not chunks:
            return []
        from redis.exceptions import OutOfMemoryError

        encoded = [encode_or_none(c, self.codec, self.name) for c in chunks]
        refused = [i for i, v in enumerate(encoded) if v is None]
        if refused:  # the codec cannot encode them: refused like a full tier
            with self._lock:
                self._n["rejected"] += len(refused)
            kept = [i for i, v in enumerate(encoded) if v is not None]
            stored = self.put([chunks[i] for i in kept]) if kept else []
            ok = [False] * len(chunks)
            for i, s in zip(kept, stored, strict=True):
                ok[i] = s
            return ok
        values = [v for v in encoded if v is not None]

        def build(pipe: Any) -> None:
            for chunk, value in zip(chunks, values, strict=True):
                pipe.set(self.redis_key(chunk.key), value, ex=self.ttl_s)

        def run(client: Any) -> list[Any]:
            replies = self._pipeline(client, build, raise_on_error=False)
            failure = next(
                (r for r in replies if isinstance(r, Exception) and not isinstance(r, OutOfMemoryError)), None
            )
            if failure is not None:
                raise failure  # a real failure: count it and open the breaker (OOM only means "full")
            return replies

        replies = self._call("put", run)
        ok = [r is True for r in replies] if replies is not None else [False] * len(chunks)
        with self._lock:
            self._n["stored"] += sum(ok)
            self._n["rejected"] += len(ok) - sum(ok)
            self._n["bytes_written"] += sum(len(v) for v, stored in zip(values, ok, strict=True) if stored)
        return ok

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """UNLINK keys (one per command, so cluster slots never cross); how many were present."""
        if not keys:
            return 0

        def build(pipe: Any) -> None:
            for k in keys:
                pipe.unlink(self.redis_key(k))

        removed = self._call("delete", lambda c: self._pipeline(c, build))
        return sum(removed) if removed is not None else 0

    def clear(self) -> int:
        """Remove this backend's keys (``<prefix>:<tenant>:*`` only; every primary in a cluster); how many."""
        pattern = _glob_escape(self._base) + b"?" * (2 * DIGEST_SIZE)
        return self._call("clear", lambda c: self._clear(c, pattern)) or 0

    def _clear(self, client: Any, pattern: bytes) -> int:
        nodes = [client.get_redis_connection(n) for n in client.get_primaries()] if self.cluster else [client]
        removed = 0
        for node in nodes:
            batch: list[bytes] = []
            for key in node.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= _SCAN_BATCH:
                    removed += _unlink(node, batch)
                    batch = []
            if batch:
                removed += _unlink(node, batch)
        return removed

    # -- inspection --------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Counters since creation: hits, misses, errors (failed round trips), corrupt, skipped (breaker open or
        no free connection), stored, rejected (puts not stored), bytes_read, bytes_written."""
        with self._lock:
            return dict(self._n)

    def stats(self) -> BackendStats:
        """``entries``/``used_bytes`` are what this process wrote (Redis may evict or expire them); no budget."""
        with self._lock:
            return BackendStats(
                self.name,
                self._n["stored"],
                self._n["bytes_written"],
                0,
                0,
                self._n["rejected"],
                self._n["corrupt"],
            )

    def __repr__(self) -> str:
        return f"RedisBackend({_redact(self.url)!r}, keys={self._base.decode()!r}*)"


def _require_redis_py() -> None:
    try:
        import redis  # noqa: F401  (imported lazily: the core installs and runs without redis-py)
    except ImportError as exc:
        raise ImportError("the Redis tier (l3.enabled) needs redis-py: pip install 'redis>=5'") from exc


def _unlink(node: Any, keys: list[bytes]) -> int:
    pipe = node.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
    return sum(pipe.execute())


def _glob_escape(text: bytes) -> bytes:
    out = bytearray()
    for b in text:
        if chr(b) in _GLOB_SPECIAL:
            out += b"\\"
        out.append(b)
    return bytes(out)


def _parse_url(url: str) -> tuple[list[tuple[str, int]] | None, tuple[str | None, str | None, bool]]:
    """``(None, …)`` for a standalone URL; ``([(host, port), …], (user, password, tls))`` for a cluster URL.

    Raises ValueError for an unsupported scheme or a malformed node list.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"redis url {_redact(url)!r} has no scheme (redis://, rediss://, redis+cluster://)")
    if scheme in _STANDALONE_SCHEMES:
        from redis.connection import parse_url

        parse_url(url)  # raises ValueError for a malformed URL now rather than at the first call
        return None, (None, None, scheme == "rediss")
    if scheme not in _CLUSTER_SCHEMES:
        raise ValueError(f"unsupported redis url scheme {scheme!r}: use redis://, rediss:// or redis+cluster://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    user: str | None = None
    password: str | None = None
    if userinfo:
        u, has_pw, pw = userinfo.partition(":")
        user, password = (unquote(u) or None), (unquote(pw) if has_pw else None)
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        parsed = urlsplit(f"//{item.strip()}")
        try:
            port = parsed.port or 6379
        except ValueError as exc:
            raise ValueError(f"bad node {item!r} in redis cluster url") from exc
        if not parsed.hostname:
            raise ValueError(f"bad node {item!r} in redis cluster url")
        nodes.append((parsed.hostname, port))
    return nodes, (user, password, _CLUSTER_SCHEMES[scheme])


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("@")
    if not at or "/" in userinfo:
        return url
    user, has_pw, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if has_pw else ''}@{hosts}"
