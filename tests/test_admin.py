"""The admin API over a real uvicorn server and real tiers (l1, node, l2 in temporary folders).

Bad JSON, unknown fields, a missing or wrong token: each a clear 4xx, the cache untouched. A tenant's
clear removes exactly that tenant's chunks (an exact key check per tier); a prefix clear removes the
chunks covering the prefix and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from kvtier.adapters.vllm.tenants import TenantEngines
from kvtier.admin.client import AdminClient
from kvtier.admin.server import AdminServer, admin_token
from kvtier.admin.service import AdminService
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, KvtierError
from kvtier.keys import ChunkKey, Namespace, chunk_spans, partial_keys
from kvtier.storage.events import EventPublisher, EventSubscriber

CHUNK = 8
TOKEN = "s3cret-admin-token-0123456789"


def _overrides(tmp_path: Path) -> dict[str, str]:
    return {
        "cache_dir": str(tmp_path / "cache"),
        "chunk_size": str(CHUNK),
        "node.enabled": "true",
        "node.path": str(tmp_path / "node"),
        "node.max_bytes": "100MB",
        "l2.path": str(tmp_path / "disk"),
        "events.enabled": "true",
        "events.endpoint": "tcp://127.0.0.1:0",
        "admin.enabled": "true",
        "admin.port": "0",
        "admin.token_file": str(tmp_path / "token"),
    }


class Instance:
    def __init__(self, tmp_path: Path, namespace: Namespace) -> None:
        (tmp_path / "token").write_text(TOKEN + "\n")
        self.config = load_config(env={}, overrides=_overrides(tmp_path))
        self.engine = CacheEngine.from_config(self.config, namespace).start()
        self.tenants = TenantEngines(self.engine, None)
        service = AdminService(self.engine, engine_for=self.tenants.get, models=["tiny"])
        self.server = AdminServer(self.config.admin, service)
        self.http = httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {TOKEN}"})

    def store(self, tokens: list[int], salt: str | None = None) -> None:
        engine = self.tenants.get(salt)
        engine.store(np.array(tokens), torch.randn(engine.layout.chunk_shape(len(tokens))))
        engine.flush()

    def held(self) -> dict[str, set[ChunkKey]]:
        return {t.name: set(t.keys_lru_order()) for t in self.engine.tiers.tiers}

    def keys_of(self, tokens: list[int], salt: str | None) -> set[ChunkKey]:
        ns = self.tenants.get(salt).namespace
        spans = chunk_spans(ns, tokens, CHUNK)
        keys = {s.key for s in spans}
        if len(tokens) % CHUNK:
            keys.add(next(partial_keys(ns, spans[-1].key if spans else None, tokens, len(spans) * CHUNK)).key)
        return keys

    def close(self) -> None:
        self.http.close()
        self.server.close()
        self.engine.close()


@pytest.fixture
def inst(tmp_path: Path, namespace: Namespace) -> Iterator[Instance]:
    i = Instance(tmp_path, namespace)
    yield i
    i.close()


DOC_A = list(range(1, 30))  # 3 full chunks + a partial
DOC_B = list(range(1, 17)) + [99] * 10  # shares 2 chunks of tokens with DOC_A


def test_lookup_answers_per_tier(inst: Instance) -> None:
    inst.store(DOC_A, "alice")
    r = inst.http.post("/lookup", json={"token_ids": [*DOC_A, 7, 7], "cache_salt": "alice", "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_tokens"] == len(DOC_A) + 2 and body["matched_tokens"] == len(DOC_A)
    assert body["tier_tokens"]["l1"] == len(DOC_A)
    other = inst.http.post("/lookup", json={"token_ids": DOC_A, "cache_salt": "bob"}).json()
    assert other["matched_tokens"] == 0  # another tenant shares nothing
    r = inst.http.post("/lookup", json={"token_ids": DOC_A, "model": "another"})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = inst.http.post("/lookup", json={"prompt": "hello"})
    assert r.status_code == 400 and "token_ids" in r.json()["error"]  # no tokenizer in this service


@pytest.mark.parametrize(
    ("headers", "body", "status", "says"),
    [
        ({}, {"scope": "all"}, 401, "missing bearer token"),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, {"scope": "all"}, 403, "wrong bearer token"),
        ({"Authorization": f"Basic {TOKEN}"}, {"scope": "all"}, 401, "missing bearer token"),
        (None, b'{"scope": "all"', 400, "not valid JSON"),
        (None, {"scope": "all", "everything": True}, 400, "everything: unknown field"),
        (None, {"scope": "tenant", "cache_salt": 3}, 400, "cache_salt"),
        (None, {"scope": "prefix"}, 400, "exactly one of prompt and token_ids"),
        (None, {"scope": "everything"}, 400, "scope"),
        (None, {"scope": "all", "tiers": ["l9"]}, 400, "unknown tiers"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_leave_the_cache_alone(
    inst: Instance, headers: dict | None, body: object, status: int, says: str
) -> None:
    inst.store(DOC_A, "alice")
    inst.store(DOC_B)
    before = inst.held()
    assert all(before.values())
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    if headers is None:
        r = inst.http.post("/clear", headers={"Content-Type": "application/json"}, **kwargs)
    else:
        with httpx.Client(base_url=inst.server.url) as anon:
            r = anon.post("/clear", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]
    assert inst.held() == before


def test_stats_needs_the_token_health_does_not(inst: Instance) -> None:
    with httpx.Client(base_url=inst.server.url) as anon:
        assert anon.get("/stats").status_code == 401
        assert anon.get("/health").json()["tiers"] == ["l1", "node", "l2"]
    inst.store(DOC_A)
    stats = inst.http.get("/stats").json()
    assert {t["name"]: t["entries"] for t in stats["tiers"]} == {"l1": 4, "node": 4, "l2": 4}
    assert stats["events_published"] >= 1 and stats["events_dropped"] == 0


def test_a_tenant_clear_removes_exactly_that_tenants_chunks(inst: Instance) -> None:
    inst.store(DOC_A, "alice")
    inst.store(DOC_B, "alice")
    inst.store(DOC_A, "bob")
    inst.store(DOC_A)  # no salt: the configured tenant
    alice = inst.keys_of(DOC_A, "alice") | inst.keys_of(DOC_B, "alice")
    rest = inst.keys_of(DOC_A, "bob") | inst.keys_of(DOC_A, None)
    before = inst.held()
    for tier in before.values():
        assert tier == alice | rest
    r = inst.http.post("/clear", json={"scope": "tenant", "cache_salt": "alice"})
    assert r.status_code == 200, r.text
    assert r.json()["removed"] == {"l1": len(alice), "node": len(alice), "l2": len(alice)}
    for name, tier in inst.held().items():
        assert tier == rest, name
    # the configured tenant (no salt), on one tier only
    r = inst.http.post("/clear", json={"scope": "tenant", "tiers": ["l2"]})
    assert r.json()["removed"] == {"l2": len(inst.keys_of(DOC_A, None))}
    held = inst.held()
    assert held["l2"] == inst.keys_of(DOC_A, "bob") and held["l1"] == rest


def test_a_prefix_clear_removes_the_chunks_covering_it(inst: Instance) -> None:
    inst.store(DOC_A, "alice")
    inst.store(DOC_B, "alice")
    inst.store(DOC_A, "bob")
    # DOC_B's chunks past the shared 16 tokens cover DOC_B[:20]; DOC_A's do not
    r = inst.http.post("/clear", json={"scope": "prefix", "token_ids": DOC_B[:20], "cache_salt": "alice"})
    assert r.status_code == 200, r.text
    b_only = inst.keys_of(DOC_B, "alice") - inst.keys_of(DOC_A, "alice")
    for tier in inst.held().values():
        assert tier == (inst.keys_of(DOC_A, "alice") | inst.keys_of(DOC_A, "bob"))
    assert r.json()["removed"]["l1"] == len(b_only)
    lookup = inst.http.post("/lookup", json={"token_ids": DOC_A, "cache_salt": "alice"}).json()
    assert lookup["matched_tokens"] == len(DOC_A)
    # a prefix inside the shared chunks covers both documents' later chunks, and the shared ones
    r = inst.http.post("/clear", json={"scope": "prefix", "token_ids": DOC_A[:12], "cache_salt": "alice"})
    first = chunk_spans(inst.tenants.get("alice").namespace, DOC_A, CHUNK)[0].key
    assert inst.held()["l1"] == inst.keys_of(DOC_A, "bob") | {first}


def test_clear_all_is_seen_by_an_event_subscriber(inst: Instance) -> None:
    publisher = inst.engine.tiers.events
    assert isinstance(publisher, EventPublisher)
    sub = EventSubscriber(publisher.endpoint)
    try:
        import time

        time.sleep(0.3)
        inst.store(DOC_A, "alice")
        assert inst.http.post("/clear", json={"scope": "all"}).json()["removed"] == {"l1": 4, "node": 4, "l2": 4}
        inst.store(DOC_B)
        assert publisher.flush()
        deadline = time.monotonic() + 5
        while sub.index.next_seq < publisher.published and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sub.index.snapshot() == {n: {k.digest for k in ks} for n, ks in inst.held().items()}
    finally:
        sub.close()


def test_pinned_prefixes_survive_eviction_until_unpinned(tmp_path: Path, namespace: Namespace) -> None:
    (tmp_path / "token").write_text(TOKEN)
    overrides = _overrides(tmp_path) | {"l1.max_bytes": str(12 * CHUNK * 2 * 2 * 2 * 4 * 4), "node.enabled": "false"}
    config = load_config(env={}, overrides=overrides)
    engine = CacheEngine.from_config(config, namespace).start()
    server = AdminServer(config.admin, AdminService(engine))
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:

        def store(tokens: list[int]) -> None:
            engine.store(np.array(tokens), torch.randn(engine.layout.chunk_shape(len(tokens))))

        doc = list(range(1, 1 + 3 * CHUNK))
        r = http.post("/pin", json={"token_ids": doc})
        assert r.status_code == 200, r.text
        assert r.json() == {"chunks": 3, "tiers": [t.name for t in engine.tiers.tiers if hasattr(t, "pin")]}
        assert "l1" in r.json()["tiers"]
        store(doc)
        l1 = engine.tiers.tiers[0]
        for i in range(6):  # 18 more chunks through a 12-chunk l1
            store([1000 + 100 * i + j for j in range(3 * CHUNK)])
        pinned = {s.key for s in chunk_spans(namespace, doc, CHUNK)}
        assert pinned <= set(l1.keys_lru_order())
        assert http.post("/unpin", json={"token_ids": doc}).status_code == 200
        for i in range(6):
            store([5000 + 100 * i + j for j in range(3 * CHUNK)])
        assert not pinned & set(l1.keys_lru_order())  # evictable again, and evicted
    finally:
        http.close()
        server.close()
        engine.close()


def test_pin_and_unpin_over_http(inst: Instance) -> None:
    r = inst.http.post("/pin", json={"token_ids": DOC_A})
    assert r.status_code == 200 and r.json()["chunks"] == 3  # whole chunks only
    assert inst.engine.pinned_bytes() > 0
    r = inst.http.post("/pin", json={"token_ids": DOC_A[:2]})  # shorter than one chunk
    assert r.status_code == 400 and "nothing to pin" in r.json()["error"]
    inst.engine.pin_max_bytes = inst.engine.pinned_bytes()  # the tenant's cap is reached
    r = inst.http.post("/pin", json={"token_ids": list(range(100, 130))})
    assert r.status_code == 409 and "over its cap" in r.json()["error"]
    r = inst.http.post("/unpin", json={"token_ids": DOC_A})
    assert r.status_code == 200 and r.json()["chunks"] == 3
    assert inst.engine.pinned_bytes() == 0


def test_the_cli_client(inst: Instance) -> None:
    inst.store(DOC_A)
    client = AdminClient(inst.server.url, TOKEN)
    try:
        assert client.lookup({"token_ids": DOC_A})["matched_tokens"] == len(DOC_A)
        assert client.health()["status"] == "ok"
        with pytest.raises(KvtierError, match="HTTP 400"):
            client.clear({"scope": "nothing"})
    finally:
        client.close()


def test_no_token_beyond_localhost_refuses_to_start(tmp_path: Path) -> None:
    config = load_config(env={}, overrides={"admin.host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="without a token"):
        admin_token(config.admin)
    assert admin_token(load_config(env={}).admin) is None  # loopback: a token is optional
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="too short"):
        admin_token(load_config(env={}, overrides={"admin.token_file": str(tmp_path / "short")}).admin)


def test_kvtier_admin_cli(inst: Instance, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kvtier.cli import main

    inst.store(DOC_A, "alice")
    base = ["admin", "--url", inst.server.url, "--token-file", str(tmp_path / "token")]
    ids = ",".join(map(str, DOC_A))
    assert main([*base, "lookup", "--token-ids", ids, "--cache-salt", "alice"]) == 0
    assert json.loads(capsys.readouterr().out)["matched_tokens"] == len(DOC_A)
    assert main([*base, "clear", "--tenant", "alice", "--tier", "l1"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == {"l1": 4}
    assert main(["admin", "--url", inst.server.url, "stats"]) == 2  # no token
    assert "HTTP 401" in capsys.readouterr().err
