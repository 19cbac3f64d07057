"""Server URLs of the remote tiers: what the client library needs, and a form safe for logs.

Redis URLs (:func:`parse_redis_url`):

* ``redis://[user[:password]@]host[:port][/db]``, ``rediss://…`` (TLS) and
  ``unix://[[user]:password@]/path/to.sock[?db=N]``: one server; redis-py's
  ``Redis.from_url`` takes the URL itself (query options included).
* ``redis+cluster://[user[:password]@]host[:port][,host[:port]…]`` and
  ``rediss+cluster://…`` (TLS): startup nodes of a Redis Cluster (port 6379
  when omitted, IPv6 in brackets) plus the credentials, for ``RedisCluster``.

Percent-escapes in credentials are decoded (``p%40ss`` is ``p@ss``).
:func:`redact` replaces the password (userinfo or ``password=`` query) with
``***``; :class:`RedisTarget`'s repr shows only the redacted URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

STANDALONE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL. ``nodes`` is empty for one server, the startup nodes for a cluster."""

    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def cluster(self) -> bool:
        return bool(self.nodes)

    def __repr__(self) -> str:
        return f"RedisTarget({redact(self.url)!r})"


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url`` (see the module docstring); ValueError for another scheme or a malformed URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"redis url {redact(url)!r} has no scheme (redis://, rediss://, unix://, redis+cluster://)")
    if scheme in STANDALONE_SCHEMES:
        try:
            from redis.connection import parse_url
        except ImportError:  # redis-py is optional; without it no tier connects, and the config still loads
            return RedisTarget(url, (), None, None, scheme == "rediss")

        try:
            parts = parse_url(url)  # a malformed URL fails now rather than at the first call
        except ValueError as exc:  # redis-py's message quotes the URL, password and all
            raise ValueError(f"malformed redis url {redact(url)!r}") from exc
        return RedisTarget(url, (), parts.get("username"), parts.get("password"), scheme == "rediss")
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(
            f"unsupported redis url scheme {scheme!r}: use {', '.join(s + '://' for s in STANDALONE_SCHEMES)}"
            f" or {', '.join(s + '://' for s in CLUSTER_SCHEMES)}"
        )
    userinfo, _, hosts = _netloc(rest).rpartition("@")
    user, has_password, password = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        parsed = urlsplit(f"//{item.strip()}")
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(f"bad node {item!r} in redis cluster url") from exc
        if not parsed.hostname:
            raise ValueError(f"bad node {item!r} in redis cluster url")
        nodes.append((parsed.hostname, port))
    return RedisTarget(
        url,
        tuple(nodes),
        unquote(user) or None,
        unquote(password) if has_password else None,
        scheme.startswith("rediss"),
    )


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (in the userinfo and in a ``password=`` query)."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # no scheme (a mistyped URL): the same rules from the start
        scheme, rest = "", url
    netloc = _netloc(rest)
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, has_password, _ = userinfo.partition(":")
        rest = f"{user}{':***' if has_password else ''}@{hosts}{rest[len(netloc) :]}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}{sep}{rest}")


def _netloc(rest: str) -> str:
    """The authority part of what follows ``scheme://``: up to the first ``/``, ``?`` or ``#``, as urllib splits it."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]
