"""L3: chunks in Redis (standalone or Redis Cluster), shared by every process and machine that reaches it.

Each chunk is one string value, the encoded chunk (:mod:`kvtier.chunk`), under
``<key_prefix>:<tenant or "_">:<chunk key hex>``. Every read checks the framing, the stored key, the length and
the checksum; a value that fails is a miss, counted in ``corrupt``, logged and deleted. URLs: :mod:`.urls`.

Redis manages its own memory (``maxmemory``, its eviction policy, ``ttl_s``): no client-side eviction, and
``stats()`` reports no budget or holdings (0: the server's keys are shared and may go at any time; ask it:
``INFO memory``, ``DBSIZE``). An evicted chunk is a hole; the engine's lookup stops there. Hits, misses and
bytes moved are the tier stack's metrics.

Every Redis error (refused, timeout, ``-ERR``, cluster down) is answered as a miss (``contains`` False, ``get``
None, ``put`` False), counted in ``errors``, and opens the circuit breaker (:mod:`.breaker`): for
``retry_interval_s`` calls are misses without network I/O (``skipped``), then one call probes. A dead or
black-holed Redis costs at most one ``timeout_s`` per interval. redis-py's retries are off; its pool reconnects
by itself. A ``put`` refused by a full Redis (``OOM`` under ``noeviction``) is a rejected put, not a failure.

Deadlines (:mod:`kvtier.deadline`): inside an engine call's deadline every Redis call is bounded by the time
left. A standalone call still reading at the deadline is cut off (a watchdog shuts its connection's socket; the
pool reconnects later), so a server that answers slowly but within ``timeout_s`` per reply cannot stretch one
``retrieve`` past its deadline; the call is a miss counted in ``deadline``. Slowness opens the breaker like an
error: a call cut off by its deadline, or one that succeeded but took longer than ``timeout_s``. (Cluster
pipelines are bounded between calls only.)
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from kvtier.chunk import PREFIX_BYTES, Chunk, decode_header, decode_payload, header_length
from kvtier.codec import Codec, get_codec
from kvtier.deadline import remaining
from kvtier.errors import ChunkAuthError, ChunkFormatError, ChunkVersionError, StorageError
from kvtier.keys import DIGEST_SIZE, ChunkKey
from kvtier.security import ChunkPolicy, Secret
from kvtier.storage.base import BackendStats, ChunkInfo, encode_or_none
from kvtier.storage.breaker import CircuitBreaker
from kvtier.storage.urls import parse_redis_url, redact

if TYPE_CHECKING:
    from kvtier.config import L3Config

log = logging.getLogger(__name__)

T = TypeVar("T")

_HEALTH_CHECK_INTERVAL_S = 30
_SCAN_BATCH = 500
_GLOB_SPECIAL = b"\\*?[]"
_GET_BATCH = 4  # chunks per GET pipeline (4 x 256 tokens of SmolLM2 fp32 = 47 MB)


class RedisBackend:
    """Chunks as Redis string values. Thread-safe; the constructor does no I/O (``start`` connects).

    ``config`` is validated already (pydantic); only its URL is parsed here
    (ValueError for an unsupported one). ``codec`` overrides ``config.codec``.
    ``read_only`` never writes or deletes: ``put`` raises ValueError, ``delete``
    and ``clear`` do nothing, a corrupt value is a miss but stays.
    """

    def __init__(
        self,
        config: L3Config,
        *,
        tenant: str | None,
        codec: Codec | None = None,
        name: str = "l3",
        read_only: bool = False,
        policy: ChunkPolicy | None = None,
    ) -> None:
        _require_redis_py()
        self.target = parse_redis_url(config.url)
        self._password = _load_password(config)  # from l3.password_file / password_env; None: the URL's, or none
        self.config = config
        self.tenant = tenant
        self.codec = codec if codec is not None else get_codec(config.codec)
        self.name = name
        self.read_only = read_only
        self.policy = policy  # signs what is written, and judges every value read before it is decoded
        self._base = f"{config.key_prefix}:{tenant or '_'}:".encode()
        self._what = f"redis tier {redact(config.url)}"
        self._breaker = CircuitBreaker(self._what, config.retry_interval_s, logger=log)
        self._lock = threading.Lock()  # counters and _started
        self._connect_lock = threading.Lock()
        # One call holds at most one connection per node, so this keeps the pools within max_connections:
        # a caller waits for a slot (up to timeout_s) instead of redis-py failing with "too many connections".
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._client: Any = None
        self._started = False
        self._n: Counter[str] = Counter(errors=0, skipped=0, corrupt=0, stale=0, rejected=0, forged=0, deadline=0)

    @property
    def cluster(self) -> bool:
        return self.target.cluster

    def redis_key(self, key: ChunkKey) -> bytes:
        """The Redis key of a chunk key (binary-safe, tenant-scoped)."""
        return self._base + key.hex().encode()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the client and PING the server once. Idempotent.

        Never raises for an unreachable Redis: the failure is counted and
        logged, the breaker opens, and later calls reconnect on their own.
        A server that answers but refuses this client (wrong password or ACL
        user, a TLS certificate it or we reject) raises StorageError saying
        so: a configuration error, not a storm of silent misses.
        """
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            ok = self._call("ping", _checked_ping)
        except StorageError as exc:
            with self._lock:
                self._started = False
            raise StorageError(f"{self._what}: {exc}") from None
        if ok is not None:
            log.info("%s: connected (keys %s*)", self._what, self._base.decode())

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

        cfg = self.config
        common: dict[str, Any] = {
            "socket_connect_timeout": cfg.connect_timeout_s,
            "socket_timeout": cfg.timeout_s,
            "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
            "max_connections": cfg.max_connections,
            "retry": Retry(NoBackoff(), 0),  # one attempt per call: the breaker, not redis-py, decides when to retry
        }
        if cfg.username is not None:
            common["username"] = cfg.username
        if self._password is not None:
            common["password"] = self._password.value.decode()
        if self.target.tls:
            common["ssl_cert_reqs"] = "required"
            common["ssl_check_hostname"] = False  # the CA file pins who may serve; test and LAN servers go by IP
            if cfg.tls_ca_file is not None:
                common["ssl_ca_certs"] = str(cfg.tls_ca_file)
            if cfg.tls_cert_file is not None:
                common["ssl_certfile"] = str(cfg.tls_cert_file)
                common["ssl_keyfile"] = str(cfg.tls_key_file)
        if not self.target.cluster:
            return redis.Redis.from_url(cfg.url, **common)
        from redis.cluster import ClusterNode, RedisCluster

        t = self.target
        nodes = [ClusterNode(h, p) for h, p in t.nodes]
        common.setdefault("username", t.username)
        common.setdefault("password", t.password)
        return RedisCluster(startup_nodes=nodes, ssl=t.tls, **common)

    def _get_client(self) -> Any:
        with self._connect_lock:
            if self._client is None:
                self._client = self._make_client()  # RedisCluster discovers the topology here (I/O, may raise)
            return self._client

    # -- calls -------------------------------------------------------------------------------------------------

    def _count(self, counter: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._n[counter] += n

    def _call(self, op: str, fn: Callable[[Any], T]) -> T | None:
        """``fn(client)``, or None if not started, the breaker is open, no connection slot frees up, Redis fails,
        or the current deadline (:mod:`kvtier.deadline`) has passed or passes during the call.
        """
        import redis
        from redis.exceptions import RedisClusterException

        with self._lock:
            if not self._started:
                return None
        left = remaining()
        if left is not None and left <= 0:
            self._count("deadline")
            return None
        wait = self.config.timeout_s if left is None else min(self.config.timeout_s, left)
        if not self._breaker.allow() or not self._slots.acquire(timeout=wait):
            self._count("skipped")
            return None
        watch = _Watch(remaining())
        t0 = time.monotonic()
        try:
            result = fn(_Bounded(self._get_client(), watch))
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            if watch.fired:
                self._count("deadline")
                self._breaker.failure(op, TimeoutError(f"cut off at the call's deadline after {watch.after:.3f}s"))
            else:
                self._count("errors")
                self._breaker.failure(op, exc)
            return None
        finally:
            watch.done()
            self._slots.release()
        elapsed = time.monotonic() - t0
        if elapsed > self.config.timeout_s:  # answered, but too slowly: the breaker opens on slowness too
            self._breaker.failure(op, TimeoutError(f"answered in {elapsed:.3f}s (timeout_s {self.config.timeout_s})"))
        else:
            self._breaker.success()
        return result

    def _pipeline(self, client: Any, build: Callable[[Any], None], *, raise_on_error: bool = True) -> list[Any]:
        watch = client.watch if isinstance(client, _Bounded) else None
        if isinstance(client, _Bounded):
            client = client.client
        pipe = client.pipeline(transaction=False)  # in cluster mode the pipeline splits commands by node
        if watch is not None and not self.cluster:
            pipe.connection_pool = _GuardedPool(pipe.connection_pool, watch)  # so the watchdog can cut it off
        try:
            build(pipe)
            return pipe.execute(raise_on_error=raise_on_error)
        finally:
            pipe.reset()

    def _each(self, op: str, command: str, keys: Sequence[ChunkKey]) -> list[Any] | None:
        """One pipeline of ``command <redis key>`` per key (one round trip per node); None where the call failed."""

        def build(pipe: Any) -> None:
            for k in keys:
                getattr(pipe, command)(self.redis_key(k))

        return self._call(op, lambda client: self._pipeline(client, build))

    # -- protocol ----------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys exist in Redis: one pipelined EXISTS per key."""
        found = self._each("contains", "exists", keys) if keys else []
        return [bool(n) for n in found] if found is not None else [False] * len(keys)

    def get(self, keys: Sequence[ChunkKey]) -> list[Chunk | None]:
        """Pipelined GETs (MGET would fail across cluster slots); every value is verified before it is returned.

        No copy with the ``raw`` codec: a returned chunk's payload tensor is a
        view of the ``bytes`` object redis-py received (read-only memory that
        the chunk keeps alive; torch does not enforce that, the chunk contract
        does: nobody writes into a payload). With any other codec the payload
        is decoded into new memory.
        """
        # Redis answers a pipeline only once it has run all of it: a 4096-token prefix in one pipeline means
        # ~190 MB before the first byte (and in Redis's output buffer), which can outlast timeout_s. Small
        # pipelines keep the first byte near and the buffer small; a failed one ends the prefix there.
        values: list[bytes | None] = []
        for start in range(0, len(keys), _GET_BATCH):
            got = self._each("get", "get", keys[start : start + _GET_BATCH])
            if got is None:
                values.extend([None] * (len(keys) - len(values)))
                break
            values.extend(got)
        found = [self._decode(k, v) if v is not None else None for k, v in zip(keys, values, strict=True)]
        bad = [k for k, v, c in zip(keys, values, found, strict=True) if v is not None and c is None]
        if bad:
            self.delete(bad)  # so a later store can repair it (not when read-only)
        return found

    def _decode(self, key: ChunkKey, value: bytes) -> Chunk | None:
        try:
            view = memoryview(value)
            header = decode_header(view, policy=self.policy)
            if header.key != key:
                raise ChunkFormatError(f"value holds chunk {header.key.hex()[:16]}")
            return decode_payload(header, view[header.offset :])  # checks length and checksum; raw: no copy
        except ChunkAuthError as exc:  # forged, unsigned or another tenant's: a miss, never decoded
            log.warning("%s: refusing chunk %s: %s", self._what, key.hex()[:16], exc)
            self._count("forged")
            return None
        except ChunkVersionError as exc:  # written by an older kvtier: a miss, removed like a damaged one
            log.info("%s: dropping chunk %s: %s", self._what, key.hex()[:16], exc)
            self._count("stale")
            return None
        except (ChunkFormatError, ValueError) as exc:
            log.warning("%s: dropping chunk %s: %s", self._what, key.hex()[:16], exc)
            self._count("corrupt")
            return None

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        """Pipelined SETs (with EX when ``ttl_s`` is set); False where not stored.

        Not stored (a rejected put): the codec cannot encode the chunk, Redis is
        full (OOM), failed, or is skipped while the breaker is open.
        """
        if self.read_only:
            raise ValueError(f"{self._what} is read-only: put is not allowed")
        from redis.exceptions import OutOfMemoryError

        values = [encode_or_none(c, self.codec, self.name, self.policy) for c in chunks]
        todo = [i for i, v in enumerate(values) if v is not None]

        def build(pipe: Any) -> None:
            for i in todo:
                pipe.set(self.redis_key(chunks[i].key), values[i], ex=self.config.ttl_s)

        def run(client: Any) -> list[Any]:  # (a put runs on the writer thread: no engine deadline there)
            replies = self._pipeline(client, build, raise_on_error=False)
            failure = next(
                (r for r in replies if isinstance(r, Exception) and not isinstance(r, OutOfMemoryError)), None
            )
            if failure is not None:
                raise failure  # a real failure: count it and open the breaker (OOM only means "full")
            return replies

        replies = self._call("put", run) if todo else []
        ok = [False] * len(chunks)
        if replies is not None:
            for i, reply in zip(todo, replies, strict=True):
                ok[i] = reply is True
        self._count("rejected", len(chunks) - sum(ok))
        return ok

    def delete(self, keys: Sequence[ChunkKey]) -> int:
        """UNLINK keys (one per command, so cluster slots never cross); how many were present. 0 when read-only."""
        removed = self._each("delete", "unlink", keys) if keys and not self.read_only else None
        return sum(removed) if removed is not None else 0

    def clear(self) -> int:
        """Remove this backend's keys (``<prefix>:<tenant>:*`` only; every primary of a cluster); how many."""
        if self.read_only:
            return 0
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
        """Since creation: errors (failed Redis calls), skipped (calls answered as misses without the network: the
        breaker was open or no connection freed up), corrupt (values dropped on read), stale (values in an older chunk
        format, dropped on read), rejected (chunks not stored), deadline (calls cut off or skipped at an engine call's
        deadline), forged (values the chunk policy refused: no valid MAC of
        their tenant, or another namespace; dropped on read, never decoded).
        """
        with self._lock:
            return dict(self._n)

    def stats(self) -> BackendStats:
        """Rejected puts and corrupt values; Redis, not this client, knows what it holds (entries/bytes 0)."""
        with self._lock:
            n = dict(self._n)
        return BackendStats(
            name=self.name,
            entries=0,
            used_bytes=0,
            max_bytes=0,
            evictions=0,
            rejected_puts=n["rejected"],
            corrupt=n["corrupt"],
            stale=n["stale"],
            forged=n["forged"],
        )

    def __repr__(self) -> str:
        return f"RedisBackend({redact(self.config.url)!r}, keys={self._base.decode()!r}*)"

    def inventory(self) -> dict[ChunkKey, ChunkInfo]:
        """This prefix's and tenant's chunks, from their headers (two GETRANGEs per key; ``Inventoried``).

        Empty when Redis cannot be reached (counted like any failed call).
        """
        pattern = _glob_escape(self._base) + b"?" * (2 * DIGEST_SIZE)
        return self._call("inventory", lambda c: self._inventory(c, pattern)) or {}

    def _inventory(self, client: Any, pattern: bytes) -> dict[ChunkKey, ChunkInfo]:
        nodes = [client.get_redis_connection(n) for n in client.get_primaries()] if self.cluster else [client]
        out: dict[ChunkKey, ChunkInfo] = {}
        for node in nodes:
            keys = list(node.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), _SCAN_BATCH):
                batch = keys[start : start + _SCAN_BATCH]
                pipe = node.pipeline(transaction=False)
                for k in batch:
                    pipe.getrange(k, 0, PREFIX_BYTES - 1)
                lengths = []
                for prefix in pipe.execute():
                    try:
                        lengths.append(header_length(prefix))
                    except ChunkFormatError:
                        lengths.append(0)
                pipe = node.pipeline(transaction=False)
                for k, n in zip(batch, lengths, strict=True):
                    pipe.getrange(k, 0, max(n, 1) - 1)
                for k, n, head in zip(batch, lengths, pipe.execute(), strict=True):
                    if not n:
                        continue
                    try:
                        h = decode_header(head)
                    except ChunkFormatError:
                        continue
                    if k[-2 * DIGEST_SIZE :] != h.key.hex().encode():
                        continue  # a value under another chunk's name: not this key's
                    out[h.key] = ChunkInfo(h.parent, h.namespace, tuple(int(t) for t in h.tokens))
        return out


class _Watch:
    """The watchdog of one Redis call: at the deadline it shuts the socket of the connection the call holds.

    Race-free with the pool: the connection is known only between :class:`_GuardedPool` handing it out and
    taking it back (both under the lock), so a connection already back in the pool is never touched.
    """

    def __init__(self, seconds: float | None) -> None:
        self.lock = threading.Lock()
        self.fired = False
        self.after = seconds or 0.0
        self._conn: Any = None
        self._finished = False
        self._timer = threading.Timer(max(0.0, seconds), self._fire) if seconds is not None else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def hold(self, conn: Any) -> bool:
        """Record the connection the call now holds; False if the deadline has already fired."""
        with self.lock:
            if self.fired:
                return False
            self._conn = conn
            return True

    def drop(self) -> None:
        with self.lock:
            self._conn = None

    def _fire(self) -> None:
        with self.lock:
            if self._finished:
                return
            self.fired = True
            sock = getattr(self._conn, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read fails now; redis-py drops the connection

    def done(self) -> None:
        with self.lock:
            self._finished = True
        if self._timer is not None:
            self._timer.cancel()


class _GuardedPool:
    """A pipeline's view of the connection pool that tells its :class:`_Watch` which connection it holds."""

    def __init__(self, pool: Any, watch: _Watch) -> None:
        self._pool, self._watch = pool, watch

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        import redis

        conn = self._pool.get_connection(*args, **kwargs)
        if not self._watch.hold(conn):
            self._pool.release(conn)
            raise redis.TimeoutError("the call's deadline passed")
        return conn

    def release(self, conn: Any) -> None:
        self._watch.drop()
        self._pool.release(conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class _Bounded:
    """A client handed to one call together with its watchdog (``_pipeline`` unwraps it)."""

    def __init__(self, client: Any, watch: _Watch) -> None:
        self.client, self.watch = client, watch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _load_password(config: L3Config) -> Secret | None:
    """The password of ``l3.password_file``/``password_env``; ValueError/OSError name the setting, never the value."""
    if config.password_file is not None:
        value = config.password_file.read_bytes().strip()
    elif config.password_env is not None:
        import os

        value = os.environ.get(config.password_env, "").strip().encode()
        if not value:
            raise ValueError(f"l3.password_env: environment variable {config.password_env} is unset or empty")
    else:
        return None
    if not value:
        raise ValueError(f"l3.password_file {config.password_file} is empty")
    return _Password(value)


class _Password(Secret):
    """A Redis password: redacted like a chunk secret, any length."""

    def __post_init__(self) -> None:
        pass


def _checked_ping(client: Any) -> Any:
    """PING; a refusal of this client (authentication, ACL, TLS certificates) raises StorageError."""
    import ssl

    import redis

    try:
        return client.ping()
    except redis.AuthenticationError as exc:
        raise StorageError(f"authentication failed (check l3.username and the password): {exc}") from None
    except redis.ResponseError as exc:
        text = str(exc)
        if any(word in text for word in ("NOAUTH", "WRONGPASS", "NOPERM", "invalid password")):
            raise StorageError(f"authentication failed (check l3.username and the password): {text}") from None
        raise
    except redis.ConnectionError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLError) or "SSL" in str(exc) or "certificate" in str(exc):
            raise StorageError(f"TLS handshake failed (check l3.tls_* files): {exc}") from None
        raise


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
    return b"".join(b"\\" + bytes([b]) if b in _GLOB_SPECIAL else bytes([b]) for b in text)
