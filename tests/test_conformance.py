"""Conformance: Starlette, FastAPI and aiohttp behave the same under meterwall.

One app per framework with the same routes, one stream of traffic, one set of expectations: the
same answers, the same ledger counts and the same opened records. Fields that differ by
framework on purpose are left out of the comparison (``FRAMEWORK_FIELDS``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import meterwall_aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from meterwall import Meterwall, Settings
from meterwall.reader import RecordReader
from meterwall.usage import UsageReader
from tests.test_access import make_key

FRAMEWORKS = ["starlette", "fastapi", "aiohttp"]
#: Record fields that differ by framework or by run, never compared: ids, times, sizes of the
#: answers (JSON spacing differs), the server address and HTTP version each server reports, and
#: ``disconnected`` (an ASGI server reports the client gone after an app error; aiohttp does not).
FRAMEWORK_FIELDS = {"id", "time_ns", "duration_ms", "ttfb_ms", "bytes_out", "host", "http_version",
                    "disconnected"}  # fmt: skip
RULES = "/health=public, POST /echo=items:write"


async def chunks() -> AsyncIterator[bytes]:
    for part in (b"one ", b"two ", b"three"):
        yield part


def starlette_app() -> Any:
    async def health(request: StarletteRequest) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def item(request: StarletteRequest) -> JSONResponse:
        return JSONResponse({"n": request.path_params["n"]})

    async def echo(request: StarletteRequest) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    async def stream(request: StarletteRequest) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    async def boom(request: StarletteRequest) -> JSONResponse:
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/health", health), Route("/items/{n}", item),
                             Route("/echo", echo, methods=["POST"]), Route("/stream", stream),
                             Route("/boom", boom)])  # fmt: skip


def fastapi_app() -> Any:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/items/{n}")
    async def item(n: str) -> dict[str, str]:
        return {"n": n}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


def aiohttp_app() -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def item(request: web.Request) -> web.Response:
        return web.json_response({"n": request.match_info["n"]})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await request.read())})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        async for part in chunks():
            await response.write(part)
        await response.write_eof()
        return response

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/items/{n}", item)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/boom", boom)
    return app


@asynccontextmanager
async def serve(framework: str, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to the framework's app with meterwall mounted, shut down cleanly."""
    if framework == "aiohttp":
        app = aiohttp_app()
        meterwall_aiohttp.setup(app, settings)
        async with (
            TestServer(app, host="127.0.0.1") as server,
            httpx.AsyncClient(base_url=str(server.make_url(""))) as client,
        ):
            yield client
        return
    asgi = starlette_app() if framework == "starlette" else fastapi_app()
    asgi.add_middleware(Meterwall, settings=settings)
    async with LifespanManager(asgi) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False,
                                        client=("127.0.0.1", 50000))  # fmt: skip
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def traffic(client: httpx.AsyncClient, reader: str, writer: str) -> list[httpx.Response]:
    def key(k: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {k}"}

    body = {"user": "ada", "password": "hunter2", "n": 1}
    return [
        await client.get("/health"),
        await client.get("/items/7"),
        await client.get("/items/7?token=abc123secret&q=1", headers=key(reader)),
        await client.post("/echo", json=body, headers=key(reader)),
        await client.post("/echo", json=body, headers=key(writer)),
        await client.get("/stream", headers=key(reader)),
        await client.get("/nope", headers=key(reader)),
        await client.get("/boom", headers=key(reader)),
    ]


EXPECTED_STATUSES = [200, 401, 200, 403, 200, 200, 404, 500]
EXPECTED_LEDGER = [  # (route, status, requests, denied)
    ("/boom", 500, 1, 0), ("/echo", 200, 1, 0), ("/echo", 403, 1, 1), ("/health", 200, 1, 0),
    ("/items/{n}", 200, 1, 0), ("/items/{n}", 401, 1, 1), ("/stream", 200, 1, 0),
    ("<unmatched>", 404, 1, 0),
]  # fmt: skip


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_the_same_traffic_gives_the_same_answers_counts_and_records(
    framework: str, redis, settings: Settings, private_key
) -> None:
    own = settings.replace(access="keys", access_rules=RULES, plans="p: 1000/s", default_plan="p")
    _, reader = await make_key(redis, own, scopes=("items:read",))
    _, writer = await make_key(redis, own, scopes=("items:write",))
    async with serve(framework, own) as client:
        replies = await traffic(client, reader, writer)
    assert [r.status_code for r in replies] == EXPECTED_STATUSES
    assert replies[5].text == "one two three"  # streamed through, unbuffered
    assert replies[1].json()["type"].endswith("/missing-key")
    assert replies[2].headers["ratelimit-policy"] == '"rate";q=1000;w=1'  # on a 2xx too
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, own.keyspace()).totals("acme", month, ["route", "status"])
    anonymous = await UsageReader(redis, own.keyspace()).totals("", month, ["route", "status"])
    ledger = sorted((r["route"], r["status"], r["requests"], r["denied"]) for r in rows + anonymous)
    assert ledger == EXPECTED_LEDGER
    records = await RecordReader(redis, own, private_key).records()
    assert len(records) == len(EXPECTED_STATUSES)
    compared = [normalise(r) for r in sorted(records, key=lambda r: r["time_ns"])]
    assert compared == expected_records()


def normalise(record: dict[str, Any]) -> dict[str, Any]:
    """A record without the framework-specific fields, its headers reduced to what is shared."""
    kept = {k: v for k, v in record.items() if k not in FRAMEWORK_FIELDS}
    headers = dict(kept.pop("headers"))
    kept["authorization"] = headers.get("authorization", "")[:10]
    kept["client"] = kept["client"]["ip"]
    kept["key"] = bool(kept.pop("key_id"))
    return kept


def expected_records() -> list[dict[str, Any]]:
    empty = {"kind": "empty", "size": 0, "truncated": False, "type": None}
    refused_json = {**empty, "type": "application/json"}  # never read: the app did not run
    masked = {"kind": "json", "size": 41, "truncated": False, "type": "application/json",
              "json": {"n": 1, "password": "***", "user": "ada"}}  # fmt: skip

    def rec(method: str, route: str, path: str, status: int, decision: str = "admitted", *,
            query: str = "", key: bool = True, body: Any = empty, error: bool = False,
            ) -> dict[str, Any]:  # fmt: skip
        return {"v": 2, "method": method, "route": route, "path": path, "query": query,
                "scheme": "http", "status": status, "error": error,
                "bytes_in": body["size"], "decision": decision,
                "consumer": "acme" if key else None, "client": "127.0.0.1",
                "authorization": "Bearer fp:" if key else "", "key": key, "body": body}  # fmt: skip

    return [
        rec("GET", "/health", "/health", 200, key=False),
        rec("GET", "/items/{n}", "/items/7", 401, "missing-key", key=False),  # routed anyway
        rec("GET", "/items/{n}", "/items/7", 200, query="token=***&q=1"),
        rec("POST", "/echo", "/echo", 403, "scope", body=refused_json),
        rec("POST", "/echo", "/echo", 200, body=masked),
        rec("GET", "/stream", "/stream", 200),
        rec("GET", "<unmatched>", "/nope", 404),
        rec("GET", "/boom", "/boom", 500, error=True),
    ]


async def test_aiohttp_flushes_on_cleanup_and_reports_health(redis, settings) -> None:
    app = aiohttp_app()
    core = meterwall_aiohttp.setup(app, settings)
    async with TestServer(app, host="127.0.0.1") as server:
        async with httpx.AsyncClient(base_url=str(server.make_url(""))) as client:
            assert (await client.get("/items/1")).status_code == 200
        assert core.health()["state"] in ("ok", "degraded")
    assert core.health()["state"] == "stopped"  # cleanup ran the final flush
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, settings.keyspace()).totals("", month, ["route"])
    assert [(r["route"], r["requests"]) for r in rows] == [("/items/{n}", 1)]
    await asyncio.sleep(0)
