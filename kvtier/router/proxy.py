"""The router's HTTP front (FastAPI) and its forwarding logic (httpx, async).

For ``POST /v1/completions`` and ``/v1/chat/completions``: the request's token ids come from one
instance's ``/tokenize`` (vLLM's endpoint: the instance's own tokenizer and chat template), each
healthy instance gets a prefix hit from its KV-event index (or, when that index is stale or there is
none, from its admin ``/lookup``; else 0: load only), :func:`~kvtier.router.scoring.rank` orders them,
and the request goes to the best one. Its response (streaming or not) is passed through as it
arrives, with ``x-kvtier-instance`` naming the instance. A request whose connection fails before any
response (connection refused or reset, the instance gone) is sent to the next instance, and the
failed one is dropped until its health check passes again. A request that had started is never
retried (its tokens may already have been streamed).

Health: every ``health_interval_s`` each instance's ``/health`` is asked; ``unhealthy_after`` failures
in a row drop it. ``GET /health`` (the router's) is 200 while one instance is healthy;
``GET /router/stats`` shows each instance's counters. Other ``/v1/*`` GETs (``/v1/models``) go to a
healthy instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvtier.config import RouterConfig
from kvtier.router.backends import Backend
from kvtier.router.scoring import Candidate, hit_tokens, rank
from kvtier.storage.events import EventSubscriber

log = logging.getLogger("kvtier.router")

_PASS_HEADERS = ("content-type", "cache-control")
_FORWARD_HEADERS = ("content-type", "authorization", "x-request-id")


class Router:
    """The routing state and the forwarding; :func:`create_app` wraps it in FastAPI."""

    def __init__(self, config: RouterConfig) -> None:
        if not config.instances:
            raise ValueError("the router needs at least one instance (router.instances or --instance)")
        self.config = config
        self.backends = [Backend(i, rate_decay=config.rate_decay) for i in config.instances]
        self._rr = itertools.count()
        self._http: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        self.routed = 0
        self.no_tokens = 0  # requests routed on load alone (tokenize failed)
        self.index_fallbacks = 0  # instance hits taken from the admin lookup or taken as 0 (stale or no index)
        self.sent_hints = 0  # instance hits taken from the prompts sent there (the index did not know them yet)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=256)  # the latest scored requests (/router/stats)

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.config.request_timeout_s, connect=2.0), limits=limits)
        if self.config.policy == "kvtier":
            for b in self.backends:
                if b.config.events is not None:
                    b.subscriber = await asyncio.to_thread(
                        EventSubscriber, b.config.events, replay_endpoint=b.config.replay
                    )
        self._health = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        for b in self.backends:
            if b.subscriber is not None:
                b.subscriber.close()
        if self._http is not None:
            await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "Router.start() first"
        return self._http

    # -- health ------------------------------------------------------------------------------------------------

    async def _check(self, b: Backend) -> None:
        try:
            r = await self.http.get(f"{b.url}/health", timeout=self.config.health_timeout_s)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        b.health_result(ok, self.config.unhealthy_after)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._check(b) for b in self.backends))
            await asyncio.sleep(self.config.health_interval_s)

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    # -- scoring -----------------------------------------------------------------------------------------------

    async def _tokens(self, path: str, body: dict[str, Any], healthy: list[Backend]) -> list[int] | None:
        """The prompt's token ids from an instance's ``/tokenize`` (least loaded first); None if none answers."""
        model = body.get("model")
        if path.endswith("/chat/completions"):
            if not isinstance(body.get("messages"), list):
                return None
            req: dict[str, Any] = {"model": model, "messages": body["messages"], "add_generation_prompt": True}
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
            if not isinstance(prompt, str):
                return None
            req = {"model": model, "prompt": prompt}
        for b in sorted(healthy, key=lambda b: b.in_flight)[:2]:
            try:
                r = await self.http.post(f"{b.url}/tokenize", json=req, timeout=self.config.tokenize_timeout_s)
                if r.status_code == 200:
                    return list(r.json()["tokens"])
            except (httpx.HTTPError, ValueError, KeyError):
                continue
        return None

    async def _hit(self, b: Backend, tokens: list[int], salt: str | None, model: str | None) -> tuple[int, int]:
        """(local, shared) leading tokens of this tenant (``salt``) this instance's index (or admin lookup) holds."""
        cfg = self.config
        if b.index_usable:
            assert b.subscriber is not None
            index = b.subscriber.index
            return (
                index.match_any(tokens, cfg.local_media, cache_salt=salt),
                index.match_any(tokens, cfg.shared_media, cache_salt=salt),
            )
        self.index_fallbacks += 1
        if b.config.admin is not None:
            body: dict[str, Any] = {"token_ids": tokens}
            if salt is not None:
                body["cache_salt"] = salt
            try:
                r = await self.http.post(f"{b.config.admin.rstrip('/')}/lookup", json=body, timeout=1.0)
                if r.status_code == 200:
                    tiers = r.json()["tier_tokens"]
                    local = sum(n for t, n in tiers.items() if t in cfg.local_media)
                    shared = sum(n for t, n in tiers.items() if t in cfg.shared_media)
                    return local, local + shared
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        return 0, 0

    def _shared(self, tokens: list[int], salt: str | None) -> int:
        """What the shared tier holds of ``tokens``, by any instance's index (every instance reads it)."""
        best = 0
        for b in self.backends:
            if b.index_usable:
                assert b.subscriber is not None
                best = max(best, b.subscriber.index.match_any(tokens, self.config.shared_media, cache_salt=salt))
        return best

    async def order(self, path: str, body: dict[str, Any]) -> tuple[list[tuple[Backend, int]], tuple[int, ...]]:
        """Healthy instances, best first, each with the prompt tokens it would prefill (0 if unknown), and
        the prompt's token ids (empty if unknown)."""
        healthy = self.healthy()
        if not healthy:
            return [], ()
        start = next(self._rr) % len(healthy)
        rotated = healthy[start:] + healthy[:start]
        if self.config.policy == "round_robin":
            return [(b, 0) for b in rotated], ()
        tokens = await self._tokens(path, body, rotated)
        if tokens is None:
            self.no_tokens += 1
            tokens = []
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        hits = await asyncio.gather(*(self._hit(b, tokens, salt, body.get("model")) for b in rotated))
        shared = self._shared(tokens, salt) if tokens else 0
        key = tuple(tokens)
        sent = [b.sent_match(key, salt, self.config.sent_hint_block) if key else 0 for b in rotated]
        self.sent_hints += sum(1 for s, (local, _) in zip(sent, hits, strict=True) if s > local)
        cands = [
            Candidate(str(i), max(local, s), max(sh, shared), b.in_flight, b.queued_prefill_tokens, b.decoding)
            for i, (b, (local, sh), s) in enumerate(zip(rotated, hits, sent, strict=True))
        ]
        ranked = rank(
            cands,
            beta=self.config.beta,
            shared_credit=self.config.shared_credit,
            decode_tokens_per_request=self.config.decode_tokens_per_request,
        )
        self.decisions.append(
            {
                "t": round(time.time(), 3),
                "prompt_tokens": len(tokens),
                "candidates": [
                    {
                        "url": rotated[int(c.name)].url,
                        "local_tokens": c.local_tokens,
                        "sent_tokens": sent[int(c.name)],
                        "shared_tokens": c.shared_tokens,
                        "in_flight": c.in_flight,
                        "decoding": c.decoding,
                        "queued_prefill_tokens": c.queued_prefill_tokens,
                        "score": round(sc, 1),
                    }
                    for c, sc in ranked
                ],
            }
        )
        credit = self.config.shared_credit
        return [(rotated[int(c.name)], round(len(tokens) - hit_tokens(c, credit))) for c, _ in ranked], key

    # -- forwarding --------------------------------------------------------------------------------------------

    async def forward(self, path: str, raw: bytes, headers: dict[str, str]) -> Response:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return JSONResponse({"error": {"message": f"request body is not valid JSON: {exc}"}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "request body must be a JSON object"}}, status_code=400)
        ranked, tokens = await self.order(path, body)
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        if not ranked:
            return JSONResponse({"error": {"message": "no healthy instance"}}, status_code=503)
        streamed = body.get("stream") is True
        fwd_headers = {k: v for k, v in headers.items() if k.lower() in _FORWARD_HEADERS}
        for b, prefill in ranked:
            if not b.healthy:
                continue
            handle = b.dispatched(prefill, tokens, salt, self.config.sent_hint_max)
            req = self.http.build_request("POST", f"{b.url}{path}", content=raw, headers=fwd_headers)
            try:
                resp = await self.http.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                b.finished(handle, started=False)
                b.retried_away += 1
                b.mark_dead(f"{type(exc).__name__}: {exc}", self.config.unhealthy_after)
                continue
            b.requests += 1
            self.routed += 1
            return StreamingResponse(
                self._relay(b, resp, handle, streamed and resp.status_code == 200),
                status_code=resp.status_code,
                headers={
                    **{k: v for k, v in resp.headers.items() if k.lower() in _PASS_HEADERS},
                    "x-kvtier-instance": b.url,
                },
            )
        return JSONResponse({"error": {"message": "every instance failed to take the request"}}, status_code=503)

    async def _relay(self, b: Backend, resp: httpx.Response, handle: int, learn: bool) -> AsyncIterator[bytes]:
        """Pass the response through; its first bytes end the request's prefill (a streamed 200's first
        bytes come with its first token: a sample of the instance's prefill rate)."""
        started = False
        try:
            async for chunk in resp.aiter_raw():
                if not started:
                    b.first_token(handle, learn)
                    started = True
                yield chunk
        finally:
            b.finished(handle, started, self.config.sent_hint_s)
            await resp.aclose()

    async def get(self, path: str) -> Response:
        for b in self.healthy():
            try:
                r = await self.http.get(f"{b.url}{path}", timeout=5.0)
            except httpx.HTTPError:
                continue
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        return JSONResponse({"error": {"message": "no healthy instance"}}, status_code=503)

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.config.policy,
            "routed": self.routed,
            "routed_on_load_only": self.no_tokens,
            "index_fallbacks": self.index_fallbacks,
            "sent_hints": self.sent_hints,
            "instances": [b.snapshot() for b in self.backends],
            "recent": list(self.decisions),
        }


def create_app(config: RouterConfig) -> FastAPI:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.close()

    app = FastAPI(title="kvtier router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.forward("/v1/completions", await request.body(), dict(request.headers))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.forward("/v1/chat/completions", await request.body(), dict(request.headers))

    @app.get("/v1/models")
    async def models() -> Response:
        return await router.get("/v1/models")

    @app.get("/health")
    async def health() -> Response:
        ok = bool(router.healthy())
        return JSONResponse({"status": "ok" if ok else "no healthy instance"}, status_code=200 if ok else 503)

    @app.get("/router/stats")
    async def stats() -> dict[str, Any]:
        return router.stats()

    return app
