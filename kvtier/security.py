"""Keyed chunk authentication for shared tiers (issue 15, step 1: the primitives).

A chunk's xxh3 checksum proves it is intact, not who wrote it: anyone who can
write to a shared tier (a shared disk folder, the node folder, Redis) can plant
a self-consistent chunk. With a secret configured, a writer computes a keyed
BLAKE3 MAC over the encoded chunk (header, token ids and body, with the
header's 32-byte MAC field at ``MAC_OFFSET`` left out) and a reader checks it
before anything is decoded.

Keys are per tenant: ``derive_key`` runs HKDF-SHA256 over the secret with the
tenant in ``info``, so one tenant's key cannot produce a chunk another tenant
accepts. Rotation: :class:`ChunkAuthenticator` signs with the newest secret and
accepts tags made with any of the old ones listed.

Secrets are held in :class:`Secret`, whose ``repr``/``str`` never show the
value. This module does not yet wire the MAC into ``chunk.py`` or the tiers
(the header checksum covers the MAC field, so placing a tag there needs the
encoder's help); it is the tested building block for that.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAC_OFFSET = 144  # the header's reserved MAC field (see kvtier/chunk.py)
MAC_LEN = 32
MIN_SECRET_BYTES = 16
_INFO = b"kvtier chunk mac v1\x00"


@dataclass(frozen=True)
class Secret:
    """A secret's bytes; ``repr`` and ``str`` are redacted so it never reaches a log."""

    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_BYTES:
            raise ValueError(f"secret too short: at least {MIN_SECRET_BYTES} bytes are needed")

    def __str__(self) -> str:
        return "Secret(<redacted>)"

    __repr__ = __str__


def load_secret(secret_file: str | Path | None = None, secret_env: str | None = None) -> Secret | None:
    """Read a secret from a file (whitespace-stripped) or an environment variable.

    Returns None when neither is given. Raises ValueError when both are given,
    when the variable is unset or empty, or when the secret is too short;
    OSError when the file cannot be read. The value never appears in a message.
    """
    if secret_file is not None and secret_env is not None:
        raise ValueError("security: give secret_file or secret_env, not both")
    if secret_file is not None:
        return Secret(Path(secret_file).read_bytes().strip())
    if secret_env is not None:
        raw = os.environ.get(secret_env)
        if not raw:
            raise ValueError(f"security: environment variable {secret_env} is unset or empty")
        return Secret(raw.strip().encode())
    return None


def derive_key(secret: Secret, tenant: str | None) -> bytes:
    """The 32-byte MAC key of one tenant (HKDF-SHA256; None is the default tenant)."""
    info = _INFO + (b"\x01" + tenant.encode() if tenant is not None else b"\x00")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret.value)


def _tag(key: bytes, encoded: memoryview) -> bytes:
    if len(encoded) < MAC_OFFSET + MAC_LEN:
        raise ValueError(f"encoded chunk too short for a MAC: {len(encoded)} bytes")
    h = blake3.blake3(key=key)
    h.update(encoded[:MAC_OFFSET])
    h.update(encoded[MAC_OFFSET + MAC_LEN :])
    return h.digest()


class ChunkAuthenticator:
    """Signs and verifies encoded chunks for one tenant.

    ``secret`` signs; ``old_secrets`` are still accepted by :meth:`verify`
    (key rotation). Immutable after construction; thread-safe.
    """

    def __init__(self, secret: Secret, tenant: str | None, old_secrets: Sequence[Secret] = ()) -> None:
        self.tenant = tenant
        self._key = derive_key(secret, tenant)
        self._accepted = (self._key, *(derive_key(s, tenant) for s in old_secrets))

    def __repr__(self) -> str:
        return f"ChunkAuthenticator(tenant={self.tenant!r}, accepted_keys={len(self._accepted)})"

    def sign(self, encoded: bytes | bytearray | memoryview) -> bytes:
        """The 32-byte tag of an encoded chunk (its MAC field is not covered)."""
        return _tag(self._key, memoryview(encoded))

    def verify(self, encoded: bytes | bytearray | memoryview, tag: bytes) -> bool:
        """True when ``tag`` was made by the current or an accepted old key (constant-time compare)."""
        if len(tag) != MAC_LEN:
            return False
        view = memoryview(encoded)
        ok = False
        for key in self._accepted:
            ok |= hmac.compare_digest(_tag(key, view), tag)
        return ok
