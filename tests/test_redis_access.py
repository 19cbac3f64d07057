"""Redis access control (issue 15): ACL users with passwords from files or the environment, and TLS
(``rediss://``, a CA file, a client certificate) against real redis-server processes; certificates are made
at test time. A wrong password or certificate is a clear start-up error; secrets never show."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server not installed", allow_module_level=True)

from redis_servers import RedisServer, free_port, redis_only

from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, StorageError
from kvtier.keys import Namespace
from kvtier.layout import KVLayout

pytestmark = pytest.mark.redis

LAYOUT = KVLayout(2, 2, 8)
C = 4
PASSWORD = "alice-pass-" + "w" * 16


def _engine(url: str, **overrides: object) -> CacheEngine:
    values = redis_only(url, C, **({"l3.key_prefix": "kvt"} | overrides))
    return CacheEngine.from_config(load_config(env={}, overrides=values), Namespace("m", LAYOUT))


def _round_trip(engine: CacheEngine, seed: int = 0) -> None:
    tokens = np.arange(3 * C, dtype=np.uint32) + 1000 * seed
    kv = torch.randn(LAYOUT.chunk_shape(3 * C))
    with engine:
        engine.store(tokens, kv)
        assert engine.flush(10)
        got = engine.retrieve(tokens)
        assert got.num_tokens == 3 * C and torch.equal(torch.stack(got.layers), kv)


def test_acl_user_with_a_password_from_a_file_or_the_environment(tmp_path: Path, monkeypatch, caplog) -> None:
    args = ("--user", "default", "off", "--user", "alice", "on", f">{PASSWORD}", "~kvt:*", "+@all")
    with RedisServer(tmp_path / "r", None, *args) as srv:
        secret = tmp_path / "redis-password"
        secret.write_text(PASSWORD + "\n")
        _round_trip(_engine(srv.url, **{"l3.username": "alice", "l3.password_file": str(secret)}))
        monkeypatch.setenv("KVT_REDIS_PASSWORD", PASSWORD)
        _round_trip(_engine(srv.url, **{"l3.username": "alice", "l3.password_env": "KVT_REDIS_PASSWORD"}), seed=1)
        # a wrong password, or none, stops the start with a clear error, never a storm of silent misses
        secret.write_text("not-the-password")
        with caplog.at_level(logging.DEBUG), pytest.raises(StorageError, match="authentication failed") as err:
            _engine(srv.url, **{"l3.username": "alice", "l3.password_file": str(secret)}).start()
        assert "127.0.0.1" in str(err.value)
        with pytest.raises(StorageError, match="authentication failed"):
            _engine(srv.url).start()
        assert PASSWORD not in caplog.text + str(err.value) and "not-the-password" not in caplog.text + str(err.value)
    with pytest.raises(ConfigError, match="KVT_NOPE is unset"):
        _engine(srv.url, **{"l3.password_env": "KVT_NOPE"})
    with pytest.raises(ConfigError, match=r"both in l3\.url"):
        _engine("redis://:x@127.0.0.1:1/0", **{"l3.password_env": "KVT_REDIS_PASSWORD"})
    with pytest.raises(ConfigError, match="need a rediss://"):
        _engine(srv.url, **{"l3.tls_ca_file": str(secret)})


# -- TLS ---------------------------------------------------------------------------------------------------------


def _certs(folder: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def subject(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject(f"kvtier test {name}"))
        .issuer_name(subject(f"kvtier test {name}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": folder / f"{name}.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(f"kvtier test {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if role == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[role] = folder / f"{role}.pem"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_key(key, folder / f"{role}.key")
    return out


def _supports_tls() -> bool:
    out = subprocess.run(["redis-server", "--tls-port", "1", "--port", "0", "--test-memory", "1"], capture_output=True)
    return b"not supported" not in out.stdout + out.stderr


def test_tls_end_to_end_with_a_client_certificate(tmp_path: Path) -> None:
    if not _supports_tls():
        pytest.skip("this redis-server was built without TLS")
    certs = _certs(tmp_path / "pki")
    tls_port = free_port()
    args = (
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs["server"]),
        "--tls-key-file", str(certs["server_key"]),
        "--tls-ca-cert-file", str(certs["ca"]),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    with RedisServer(tmp_path / "r", None, *args):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        tls = {"l3.tls_ca_file": str(certs["ca"])}
        client = {"l3.tls_cert_file": str(certs["client"]), "l3.tls_key_file": str(certs["client_key"])}
        _round_trip(_engine(url, **tls, **client))
        # no client certificate: the server refuses the handshake; a clear start-up error
        with pytest.raises(StorageError, match=r"TLS handshake failed|authentication|Connection"):
            _engine(url, **tls).start()
        # a server whose certificate another CA signed is refused by us
        other = _certs(tmp_path / "other", "other-ca")
        with pytest.raises(StorageError, match="TLS handshake failed"):
            _engine(url, **{"l3.tls_ca_file": str(other["ca"])}, **client).start()
        # plain text to the TLS port is not a silent success either
        assert (
            _engine(f"redis://127.0.0.1:{tls_port}/0", **{"l3.timeout_s": 0.3})
            .start()
            .lookup(np.arange(C, dtype=np.uint32))
            .num_tokens
            == 0
        )
