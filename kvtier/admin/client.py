"""A small httpx client of a running server's admin API (what ``kvtier admin ...`` uses)."""

from __future__ import annotations

from typing import Any

import httpx

from kvtier.errors import KvtierError


class AdminClient:
    """Calls ``url``'s admin API; a non-2xx answer raises KvtierError with the server's message."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise KvtierError(f"admin API {self._http.base_url}{path}: {exc}") from exc
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text}
        if r.status_code >= 400:
            raise KvtierError(f"admin API {path}: HTTP {r.status_code}: {data.get('error', data)}")
        return data

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def lookup(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/lookup", body)

    def clear(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/clear", body)

    def pin(self, body: dict[str, Any], *, pin: bool = True) -> dict[str, Any]:
        return self._call("POST", "/pin" if pin else "/unpin", body)

    def close(self) -> None:
        self._http.close()
