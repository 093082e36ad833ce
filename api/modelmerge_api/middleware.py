"""Pure ASGI middleware: request-size bound, bearer-token auth, request metrics."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable

import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/api/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/metrics"})


async def send_json(send: Send, status: int, body: dict[str, object],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """Reads request bodies up front, bounded: over `max_bytes` → 413 before any route code runs."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        body = await self._read(scope, receive)
        if body is None:
            return await send_json(send, 413, {"error": f"request body too large: the limit is "
                                               f"{self.max_bytes} bytes"})
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


class BearerAuth:
    """`Authorization: Bearer <token>` on everything but health, docs and metrics (and CORS preflights).

    A token matches the static API token, or, when `review` is given (Kubernetes TokenReview), any token the
    cluster authenticates; review results are cached for a minute."""

    def __init__(self, app: ASGIApp, token: str | None, review: Callable[[str], bool] | None = None,
                 cache_s: float = 60.0) -> None:
        self.app, self.token, self.review, self.cache_s = app, token, review, cache_s
        self._reviewed: dict[str, tuple[bool, float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS \
                or await self._allowed(scope):
            return await self.app(scope, receive, send)
        await send_json(send, 401, {"error": "missing or invalid bearer token (Authorization: Bearer ...)"},
                        [(b"www-authenticate", b"Bearer")])

    async def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        presented = presented.strip()
        if self.token and hmac.compare_digest(presented.encode(), self.token.encode()):
            return True
        return self.review is not None and await self._reviewed_ok(presented)

    async def _reviewed_ok(self, presented: str) -> bool:
        key = hashlib.sha256(presented.encode()).hexdigest()
        cached = self._reviewed.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        ok = await anyio.to_thread.run_sync(self.review, presented)
        if len(self._reviewed) > 10_000:
            self._reviewed.clear()
        self._reviewed[key] = (ok, time.monotonic() + self.cache_s)
        return ok


class RequestMetrics:
    """Counts requests and their latency by method, route template and status code."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter("modelmerge_api_requests", "HTTP requests served",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("modelmerge_api_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
