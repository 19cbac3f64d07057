"""Chunking and chained prefix hashing. Pure: no I/O, no global state.

A token sequence is cut into fixed-size chunks. Chunk ``i``'s key is::

    key_0 = H(namespace.digest || tokens[0:C])
    key_i = H(key_{i-1}       || tokens[i*C:(i+1)*C])

with ``H`` blake3 (default) or sha256, 32-byte digests, and token ids encoded
as little-endian uint32. A key therefore names a whole prefix, not just its own
tokens, and the namespace (model fingerprint, KV layout, tenant salt) is the
root of every chain, so different models or tenants can never share a key.
Nothing depends on ``hash()`` or PYTHONHASHSEED.

A trailing partial chunk of ``n < C`` tokens gets the key ``H(parent || tokens)``
by the same rule; :func:`partial_keys` enumerates every such candidate at a
position so a lookup can find a partial chunk stored by an earlier request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import blake3
import numpy as np

from kvtier.layout import KVLayout

HashName = Literal["blake3", "sha256"]
DIGEST_SIZE = 32
_NAMESPACE_VERSION = "kvtier-namespace-v1"


def _hasher(name: HashName, data: bytes = b""):
    if name == "blake3":
        return blake3.blake3(data)
    if name == "sha256":
        return hashlib.sha256(data)
    raise ValueError(f"unknown hash {name!r}; use 'blake3' or 'sha256'")


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """The identity of one chunk: a 32-byte digest of its whole token prefix."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"ChunkKey digest must be {DIGEST_SIZE} bytes")

    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> ChunkKey:
        return cls(bytes.fromhex(text))

    def __repr__(self) -> str:
        return f"ChunkKey({self.digest.hex()[:16]}…)"


@dataclass(frozen=True)
class Namespace:
    """The root of every key chain: what must match for KV to be interchangeable.

    ``model_fingerprint`` comes from the model's weights and config (see
    :mod:`kvtier.fingerprint`), never its path. ``tenant`` is an optional salt:
    two tenants with different salts never share a chunk.
    """

    model_fingerprint: str
    layout: KVLayout
    tenant: str | None = None
    hash_name: HashName = "blake3"
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            raise ValueError("Namespace.model_fingerprint must be non-empty")
        if self.tenant is not None and not self.tenant:
            raise ValueError("Namespace.tenant must be None or a non-empty string")
        canonical = json.dumps(
            {
                "v": _NAMESPACE_VERSION,
                "model": self.model_fingerprint,
                "layout": self.layout.to_dict(),
                "tenant": self.tenant,
                "hash": self.hash_name,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        object.__setattr__(self, "digest", _hasher(self.hash_name, canonical).digest())

    def with_tenant(self, tenant: str | None) -> Namespace:
        """The same namespace for another tenant salt."""
        return Namespace(self.model_fingerprint, self.layout, tenant, self.hash_name)


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a token sequence: its key, its parent's key, and its token range."""

    key: ChunkKey
    parent: ChunkKey | None
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian uint32 bytes; ids outside [0, 2**32) raise ValueError."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= 2**32:
        raise ValueError("token ids must lie in [0, 2**32)")
    return arr.astype("<u4").tobytes()


def as_token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate and convert token ids to a 1-D uint32 array (a copy)."""
    return np.frombuffer(token_bytes(tokens), dtype="<u4").copy()


def chunk_spans(namespace: Namespace, tokens: Sequence[int] | np.ndarray, chunk_size: int) -> list[ChunkSpan]:
    """Keys of the full chunks of ``tokens``, in prefix order. A trailing partial chunk is not included."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    data = token_bytes(tokens)
    n_full = len(data) // 4 // chunk_size
    spans: list[ChunkSpan] = []
    parent: ChunkKey | None = None
    step = 4 * chunk_size
    for i in range(n_full):
        root = parent.digest if parent is not None else namespace.digest
        key = ChunkKey(_hasher(namespace.hash_name, root + data[i * step : (i + 1) * step]).digest())
        spans.append(ChunkSpan(key, parent, i * chunk_size, (i + 1) * chunk_size))
        parent = key
    return spans


def partial_keys(
    namespace: Namespace, parent: ChunkKey | None, tokens: Sequence[int] | np.ndarray, start: int
) -> Iterator[ChunkSpan]:
    """Every partial-chunk candidate starting at ``start``: spans [start, start+n) for n = len..1, longest first.

    ``tokens`` is the whole sequence; the caller bounds it so that fewer than
    one chunk of tokens follows ``start``. Hashing is incremental, so all
    candidates cost about one hash of the tail.
    """
    tail = token_bytes(tokens)[4 * start :]
    hasher = _hasher(namespace.hash_name, parent.digest if parent is not None else namespace.digest)
    digests = []
    for i in range(0, len(tail), 4):
        hasher.update(tail[i : i + 4])
        digests.append(hasher.digest())
    for n in range(len(digests), 0, -1):
        yield ChunkSpan(ChunkKey(digests[n - 1]), parent, start, start + n)


_SALT_TENANT = "cache_salt:"


def tenant_salt(configured: str | None, cache_salt: str | None) -> str | None:
    """The tenant salt of a request: the configured tenant, refined by the request's ``cache_salt``.

    Different salts never share a chunk; requests without one use the configured tenant.
    """
    if cache_salt is None:
        return configured
    return _SALT_TENANT + json.dumps([configured, cache_salt])


def cache_salt_of(tenant: str | None) -> str | None:
    """The ``cache_salt`` a tenant salt was made from by :func:`tenant_salt`; None for a configured tenant."""
    if tenant is None or not tenant.startswith(_SALT_TENANT):
        return None
    try:
        pair = json.loads(tenant[len(_SALT_TENANT) :])
    except ValueError:
        return None
    return pair[1] if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str) else None
