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
value.

:class:`ChunkPolicy` is what a process accepts from its shared tiers (``node``,
``l2``, ``l3``): the namespaces its engines use (each with its layout, largest
chunk and tenant), and, with a secret, the keys that sign and verify their
chunks. :mod:`kvtier.chunk` applies it: ``encode_parts`` puts the tag in the
header's MAC field (flag bit 1), ``decode_header`` refuses a header that does
not fit a registered namespace before anything is allocated, and
``decode_payload`` verifies the checksum, then the tag, before decoding.
The MAC covers the header (its checksum included, computed with the MAC field
zeroed), the token ids and the body.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from kvtier.layout import KVLayout

MAC_OFFSET = 144  # the header's reserved MAC field (see kvtier/chunk.py)
MAC_LEN = 32
MIN_SECRET_BYTES = 16
_INFO = b"kvtier chunk mac v1\x00"
_AEAD_INFO = b"kvtier chunk aead v1\x00"
NONCE_LEN = 12
AEAD_TAG_LEN = 16
AEAD_OVERHEAD = NONCE_LEN + AEAD_TAG_LEN  # an encrypted body is nonce || ciphertext || tag


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


def derive_key(secret: Secret, tenant: str | None, *, purpose: bytes = _INFO) -> bytes:
    """The 32-byte MAC key of one tenant (HKDF-SHA256; None is the default tenant).

    ``purpose`` separates keys made from one secret: the MAC key (default) and the encryption key
    (:func:`derive_aead_key`) of a tenant are unrelated.
    """
    info = purpose + (b"\x01" + tenant.encode() if tenant is not None else b"\x00")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret.value)


def derive_aead_key(secret: Secret, tenant: str | None) -> bytes:
    """The 32-byte AES-256-GCM key that encrypts one tenant's chunk bodies."""
    return derive_key(secret, tenant, purpose=_AEAD_INFO)


class ChunkCipher:
    """AES-256-GCM of one tenant's chunk bodies: encrypts with the newest key, decrypts with any accepted one.

    The associated data binds a ciphertext to its chunk (key digest and namespace), so a body moved to
    another chunk does not decrypt. Thread-safe.
    """

    def __init__(self, secret: Secret, tenant: str | None, old_secrets: Sequence[Secret] = ()) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aeads = tuple(AESGCM(derive_aead_key(s, tenant)) for s in (secret, *old_secrets))

    def __repr__(self) -> str:
        return f"ChunkCipher(keys={len(self._aeads)})"

    def encrypt(self, body: bytes | memoryview, aad: bytes) -> bytes:
        """nonce || ciphertext || tag of ``body`` (a fresh random 96-bit nonce per chunk)."""
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aeads[0].encrypt(nonce, body, aad)

    def decrypt(self, stored: bytes | memoryview, aad: bytes) -> bytes | None:
        """The body, or None when no accepted key opens it (tampered, another tenant's, a dropped old key)."""
        from cryptography.exceptions import InvalidTag

        view = memoryview(stored)
        if len(view) < AEAD_OVERHEAD:
            return None
        nonce, sealed = bytes(view[:NONCE_LEN]), view[NONCE_LEN:]
        for aead in self._aeads:
            try:
                return aead.decrypt(nonce, sealed, aad)
            except InvalidTag:
                continue
        return None


def _tag(key: bytes, encoded: memoryview, body: memoryview | None = None) -> bytes:
    """Keyed BLAKE3 of ``encoded`` (then ``body``, if given) with the MAC field left out."""
    if len(encoded) < MAC_OFFSET + MAC_LEN:
        raise ValueError(f"encoded chunk too short for a MAC: {len(encoded)} bytes")
    h = blake3.blake3(key=key)
    h.update(encoded[:MAC_OFFSET])
    h.update(encoded[MAC_OFFSET + MAC_LEN :])
    if body is not None:
        h.update(body)
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

    def sign(self, encoded: bytes | bytearray | memoryview, body: bytes | memoryview | None = None) -> bytes:
        """The 32-byte tag of an encoded chunk (its MAC field is not covered).

        ``body``: the chunk given in two parts (header + token ids, then the body), hashed as if joined.
        """
        return _tag(self._key, memoryview(encoded), None if body is None else memoryview(body))

    def verify(
        self, encoded: bytes | bytearray | memoryview, tag: bytes, body: bytes | memoryview | None = None
    ) -> bool:
        """True when ``tag`` was made by the current or an accepted old key (constant-time compare)."""
        if len(tag) != MAC_LEN:
            return False
        view = memoryview(encoded)
        rest = None if body is None else memoryview(body)
        # newest key first; stopping at a match only tells which key matched, not anything about the key
        return any(hmac.compare_digest(_tag(key, view, rest), tag) for key in self._accepted)


@dataclass(frozen=True)
class Expected:
    """What a chunk of one registered namespace must look like: its layout, tokens at most, its signer."""

    layout: KVLayout
    max_tokens: int
    auth: ChunkAuthenticator | None
    cipher: ChunkCipher | None = None  # set when the policy encrypts (and then decrypts) chunk bodies


class ChunkPolicy:
    """What this process accepts from (and how it signs for) its shared tiers. Thread-safe.

    ``secret`` None: chunks are not signed and not required to be; with one,
    every chunk written is signed with its tenant's key and every chunk read
    must carry a tag made by that tenant's current or an ``old_secrets`` key.
    Engines :meth:`register` their namespace (digest, tenant, layout, chunk
    size); once any namespace is registered, a chunk claiming another one, a
    different layout or more tokens than the chunk size is refused from its
    header alone. With nothing registered (a tool that reads tiers without an
    engine) only the format's own bounds apply, and with a secret a chunk
    cannot be verified at all: it is refused.
    """

    def __init__(
        self, secret: Secret | None = None, old_secrets: Sequence[Secret] = (), *, encrypt: bool = False
    ) -> None:
        if secret is None and old_secrets:
            raise ValueError("security: old secrets without a current secret")
        if encrypt and secret is None:
            raise ValueError("security: encryption needs a secret (security.secret_file or secret_env)")
        self.encrypts = encrypt  # chunk bodies written are AES-256-GCM encrypted (encrypted ones read either way)
        self._secret = secret
        self._old = tuple(old_secrets)
        self._lock = threading.Lock()
        self._known: dict[bytes, Expected] = {}

    @property
    def signs(self) -> bool:
        """Whether chunks are signed and must be verified (a secret is configured)."""
        return self._secret is not None

    def __repr__(self) -> str:
        return (
            f"ChunkPolicy(signs={self.signs}, encrypts={self.encrypts}, old_secrets={len(self._old)}, "
            f"namespaces={len(self._known)})"
        )

    def register(self, digest: bytes, tenant: str | None, layout: KVLayout, max_tokens: int) -> None:
        """Accept chunks of the namespace ``digest`` (of ``tenant``): at most ``max_tokens`` tokens in ``layout``.

        Registering the same digest again keeps the larger ``max_tokens``.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        with self._lock:
            old = self._known.get(digest)
            if old is not None:
                if old.layout != layout:
                    raise ValueError("a namespace digest registered with two layouts")
                if old.max_tokens >= max_tokens:
                    return
                auth, cipher = old.auth, old.cipher
            elif self._secret is not None:
                auth = ChunkAuthenticator(self._secret, tenant, self._old)
                cipher = ChunkCipher(self._secret, tenant, self._old)  # readers decrypt even if they do not encrypt
            else:
                auth = cipher = None
            self._known[digest] = Expected(layout, max_tokens, auth, cipher)

    def expected(self, digest: bytes) -> Expected | None:
        """The registered expectations of a namespace, or None."""
        with self._lock:
            return self._known.get(digest)

    @property
    def strict(self) -> bool:
        """Whether some namespace is registered (then only registered namespaces are accepted)."""
        with self._lock:
            return bool(self._known)
