"""Redis URL parsing and redaction (no server needed)."""

from __future__ import annotations

import pytest

from kvtier.storage.urls import RedisTarget, parse_redis_url, redact


def test_cluster_urls_give_startup_nodes_and_decoded_credentials() -> None:
    t = parse_redis_url("redis+cluster://alice:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert t.cluster and t.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (t.username, t.password, t.tls) == ("alice", "p@ss", False)
    assert parse_redis_url("rediss+cluster://h:1") == RedisTarget("rediss+cluster://h:1", (("h", 1),), tls=True)
    assert parse_redis_url("redis+cluster://:pw@h/0?x=1").nodes == (("h", 6379),)
    assert parse_redis_url("redis+cluster://:pw@h").password == "pw"


def test_standalone_urls_are_checked_and_kept_for_redis_py() -> None:
    pytest.importorskip("redis")
    t = parse_redis_url("rediss://u:p%23w@h:1/3")
    assert not t.cluster and (t.url, t.username, t.password, t.tls) == ("rediss://u:p%23w@h:1/3", "u", "p#w", True)
    assert parse_redis_url("redis://:pw@h:1/0").password == "pw"
    assert parse_redis_url("unix://:pw@/tmp/redis.sock?db=2").password == "pw"


@pytest.mark.parametrize(
    "url",
    ["http://h:1", "h:6379", "redis+cluster://h:notaport", "redis+cluster://", "redis+cluster://a,,b", "redis://h:x"],
)
def test_unsupported_or_malformed_urls_raise(url: str) -> None:
    if url.startswith("redis://"):
        pytest.importorskip("redis")
    with pytest.raises(ValueError):
        parse_redis_url(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://alice:secret@h:1/0", "redis://alice:***@h:1/0"),
        ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
        ("redis://alice@h:1/0", "redis://alice@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0"),  # urllib's split: the last @ ends the userinfo
        ("redis://h:1/0?password=secret&db=1", "redis://h:1/0?password=***&db=1"),
        ("unix://:secret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("rediss+cluster://u:secret@a:1,b:2", "rediss+cluster://u:***@a:1,b:2"),
        ("no scheme:secret@h", "no scheme:***@h"),
    ],
)
def test_redact_hides_every_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_no_password_in_reprs_or_errors() -> None:
    pytest.importorskip("redis")
    for url in ("redis+cluster://u:secret@a:1", "redis://u:secret@h:1/0"):
        assert "secret" not in repr(parse_redis_url(url)) and "u:***@" in repr(parse_redis_url(url))
    for bad in ("redis://u:secret@h:notaport/0", "http://u:secret@h", "u:secret@h"):
        with pytest.raises(ValueError) as err:
            parse_redis_url(bad)
        assert "secret" not in str(err.value)
