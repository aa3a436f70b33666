"""The variant apps, as uvicorn factories: ``uvicorn benchmarks.apps:<factory> --factory``.

All wrap the same trivial Starlette app (``GET /ping``, ``POST /echo`` that parses a JSON body).
Settings come from the environment: ``MW_*`` for meterwall (``Settings.from_env()``), and
``BENCH_REDIS_URL`` for the two alternatives that talk to Redis themselves.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meterwall import Meterwall, Settings
from meterwall.types import ASGIApp, Receive, Scope, Send

LOG_STREAM, LOG_COUNTS = "bench:log", "bench:counts"
RATE_LIMIT = "1000000/minute"  # far from being hit


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"pong": True})


async def echo(request: Request) -> JSONResponse:
    data = await request.json()
    return JSONResponse({"ok": True, "fields": len(data)})


def _routes() -> list[Route]:
    return [Route("/ping", ping), Route("/echo", echo, methods=["POST"])]


def bare() -> ASGIApp:
    """Variant 1: the app alone."""
    return Starlette(routes=_routes())


class NoOp:
    """A pure-ASGI middleware that does nothing: the floor of any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def noop() -> ASGIApp:
    """Variant 2."""
    return NoOp(bare())


def with_meterwall() -> ASGIApp:
    """Variants 3, 4 and 5: meterwall configured by the ``MW_*`` variables."""
    return Meterwall(bare(), settings=Settings.from_env())


class RedisLogger(BaseHTTPMiddleware):
    """The usual way: a ``BaseHTTPMiddleware`` that awaits one XADD and one HINCRBY per request."""

    def __init__(self, app: ASGIApp, redis_url: str) -> None:
        super().__init__(app)
        self.redis_url = redis_url
        self.redis: Redis | None = None

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if self.redis is None:  # made in the server's loop
            self.redis = Redis.from_url(self.redis_url)
        start = time.time()
        response = await call_next(request)
        consumer = request.headers.get("x-consumer", "")
        entry: dict[Any, Any] = {
            "ts": start,
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "ip": request.client.host if request.client else "",
            "consumer": consumer,
            "ms": round((time.time() - start) * 1000, 3),
        }
        await self.redis.xadd(LOG_STREAM, entry, maxlen=100_000, approximate=True)
        await self.redis.hincrby(LOG_COUNTS, f"{consumer}:{request.url.path}", 1)
        return response


def basehttp_logger() -> ASGIApp:
    """Variant 6a."""
    url = os.environ["BENCH_REDIS_URL"]
    return Starlette(routes=_routes(), middleware=[Middleware(RedisLogger, redis_url=url)])


class RateLimit:
    """A pure-ASGI middleware around the ``limits`` library with its async Redis storage.

    ``BENCH_LIMITER`` picks the strategy: ``fixed-window`` (default, as slowapi's default) or
    ``moving-window``. The key is the consumer header, else the client address.
    """

    def __init__(self, app: ASGIApp, redis_url: str, strategy: str) -> None:
        from limits import parse
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

        self.app = app
        self.limit = parse(RATE_LIMIT)
        storage = RedisStorage("async+" + redis_url)
        kinds = {"fixed-window": FixedWindowRateLimiter, "moving-window": MovingWindowRateLimiter}
        self.limiter = kinds[strategy](storage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = next((v for k, v in scope["headers"] if k == b"x-consumer"), b"").decode("latin-1")
        if not key and scope.get("client"):
            key = scope["client"][0]
        if not await self.limiter.hit(self.limit, "bench", key):
            await JSONResponse({"error": "rate limited"}, status_code=429)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def rate_limited() -> ASGIApp:
    """Variant 6b."""
    strategy = os.environ.get("BENCH_LIMITER", "fixed-window")
    return RateLimit(bare(), os.environ["BENCH_REDIS_URL"], strategy)


def prometheus_exporter() -> ASGIApp:
    """Variant 6c: starlette-exporter's pure-ASGI ``PrometheusMiddleware``, the usual in-memory
    metering: a request counter and a latency histogram per method, route template, status and
    consumer (``X-Consumer``, as meterwall's variants meter), no network, nothing stored."""
    from starlette_exporter import PrometheusMiddleware, from_header

    return Starlette(routes=_routes(), middleware=[
        Middleware(PrometheusMiddleware, labels={"consumer": from_header("X-Consumer")})
    ])  # fmt: skip


SSE_EVERY_S = 0.1  # an event every 100 ms after the first, which goes out at once
CHUNK = bytes(64 * 1024)


async def events(request: Request) -> StreamingResponse:
    """``GET /sse``: Server-Sent Events, the first at once, then one every 100 ms, forever
    (the client hangs up)."""

    async def stream() -> AsyncIterator[bytes]:
        n = 0
        while True:
            yield f'id: {n}\ndata: {{"n": {n}}}\n\n'.encode()
            n += 1
            await asyncio.sleep(SSE_EVERY_S)

    return StreamingResponse(stream(), media_type="text/event-stream")


async def download(request: Request) -> StreamingResponse:
    """``GET /download?bytes=N``: N bytes (default 1 GiB) in 64 KiB chunks, streamed with a
    ``Content-Length`` like a file; nothing is held but the one chunk."""
    size = int(request.query_params.get("bytes", str(1 << 30)))

    async def stream() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            yield CHUNK if left >= len(CHUNK) else CHUNK[:left]
            left -= len(CHUNK)

    headers = {"content-length": str(size)}
    return StreamingResponse(stream(), media_type="application/octet-stream", headers=headers)


def streaming() -> ASGIApp:
    """The app plus two streamed answers, ``GET /sse`` and ``GET /download``
    (benchmarks/reliability.py)."""
    return Starlette(routes=[*_routes(), Route("/sse", events), Route("/download", download)])


def streaming_with_meterwall() -> ASGIApp:
    """``streaming`` with meterwall configured by the ``MW_*`` variables."""
    return Meterwall(streaming(), settings=Settings.from_env())


def profiled() -> ASGIApp:
    """``BENCH_PROFILE_FACTORY``'s app under cProfile, dumped to ``BENCH_PROFILE_OUT``."""
    from .profiling import profiled_app

    factory = {"with_meterwall": with_meterwall, "bare": bare, "noop": noop,
               "basehttp_logger": basehttp_logger, "rate_limited": rate_limited}  # fmt: skip
    inner = factory[os.environ["BENCH_PROFILE_FACTORY"]]()
    return profiled_app(inner, os.environ["BENCH_PROFILE_OUT"])
