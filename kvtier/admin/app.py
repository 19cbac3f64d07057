"""The admin API as a FastAPI app: JSON in and out, strict bodies, bearer-token auth.

Routes: ``GET /health`` (no token needed: for probes), ``GET /stats``, ``POST /lookup``,
``POST /pin``, ``POST /unpin``, ``POST /clear``. With a token configured every route but
``/health`` needs ``Authorization: Bearer <token>``: none is a 401, a wrong one a 403, checked
before the body is read. A body that is not JSON, has an unknown field or a wrong type is a 400
naming the problem. Errors are ``{"error": message}`` (plus ``detail`` for validation errors).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvtier.admin.models import (
    ClearRequest,
    ClearResponse,
    HealthResponse,
    LookupResponse,
    PinResponse,
    PromptRef,
    StatsResponse,
)
from kvtier.admin.service import AdminError, AdminService
from kvtier.security import Secret


def create_app(service: AdminService, token: Secret | None) -> FastAPI:
    """The app over ``service``; ``token`` None: no auth (the server allows that on loopback only)."""
    app = FastAPI(title="kvtier admin", docs_url=None, redoc_url=None, openapi_url=None)

    async def authorized(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AdminError(401, "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(given.strip().encode(), token.value):
            raise AdminError(403, "wrong bearer token")

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail: list[dict[str, Any]] = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            detail.append({"field": where or "(body)", "problem": _problem(err)})
        summary = "; ".join(f"{d['field']}: {d['problem']}" for d in detail)
        return JSONResponse({"error": f"bad request body: {summary}", "detail": detail}, status_code=400)

    auth = [Depends(authorized)]

    @app.get("/health")
    def health() -> HealthResponse:
        return service.health()

    @app.get("/stats", dependencies=auth)
    def stats() -> StatsResponse:
        return service.stats()

    @app.post("/lookup", dependencies=auth)
    def lookup(req: PromptRef) -> LookupResponse:
        return service.lookup(req)

    @app.post("/pin", dependencies=auth)
    def pin(req: PromptRef) -> PinResponse:
        return service.pin(req, pin=True)

    @app.post("/unpin", dependencies=auth)
    def unpin(req: PromptRef) -> PinResponse:
        return service.pin(req, pin=False)

    @app.post("/clear", dependencies=auth)
    def clear(req: ClearRequest) -> ClearResponse:
        return service.clear(req)

    return app


def _problem(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "json_invalid":
        return f"not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
    if kind == "missing":
        return "required"
    return str(err.get("msg", kind))
