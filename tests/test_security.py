"""kvtier.security: per-tenant keyed MACs, rotation, secret loading and redaction."""

from __future__ import annotations

import pytest

from kvtier.security import MAC_LEN, MAC_OFFSET, ChunkAuthenticator, Secret, derive_key, load_secret

S1 = Secret(b"s" * 32)
S2 = Secret(b"t" * 32)
BLOB = bytes(range(256)) * 4


def test_sign_verify_and_tamper() -> None:
    auth = ChunkAuthenticator(S1, "a")
    tag = auth.sign(BLOB)
    assert len(tag) == MAC_LEN and auth.verify(BLOB, tag)
    flipped = bytearray(BLOB)
    flipped[300] ^= 1
    assert not auth.verify(flipped, tag)
    # the MAC field itself is not covered: a tag can be stored there
    placed = bytearray(BLOB)
    placed[MAC_OFFSET : MAC_OFFSET + MAC_LEN] = tag
    assert auth.verify(placed, tag)
    assert not auth.verify(BLOB, tag[:-1])


def test_tenants_cannot_forge_each_other() -> None:
    a, b = ChunkAuthenticator(S1, "a"), ChunkAuthenticator(S1, "b")
    assert not b.verify(BLOB, a.sign(BLOB))
    assert not ChunkAuthenticator(S1, None).verify(BLOB, a.sign(BLOB))
    assert derive_key(S1, "a") != derive_key(S1, "b") != derive_key(S2, "b")


def test_rotation() -> None:
    old = ChunkAuthenticator(S1, "a")
    new = ChunkAuthenticator(S2, "a", old_secrets=[S1])
    assert new.verify(BLOB, old.sign(BLOB))
    assert new.sign(BLOB) != old.sign(BLOB)
    assert not ChunkAuthenticator(S2, "a").verify(BLOB, old.sign(BLOB))


def test_secret_loading_and_redaction(tmp_path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 40 + b"\n")
    secret = load_secret(secret_file=path)
    assert secret == Secret(b"x" * 40)
    assert "x" * 10 not in repr(secret) + str(secret) + repr(ChunkAuthenticator(secret, "a"))
    monkeypatch.setenv("KVT_SECRET", "y" * 20)
    assert load_secret(secret_env="KVT_SECRET") == Secret(b"y" * 20)
    assert load_secret() is None
    with pytest.raises(ValueError, match="not both"):
        load_secret(secret_file=path, secret_env="KVT_SECRET")
    with pytest.raises(ValueError, match="unset"):
        load_secret(secret_env="KVT_NOPE_UNSET")
    with pytest.raises(ValueError, match="too short"):
        Secret(b"short")
    with pytest.raises(ValueError, match="too short"):
        ChunkAuthenticator(S1, "a").sign(b"abc")
