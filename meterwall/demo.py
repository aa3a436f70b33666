"""``meterwall demo``: a sample API with meterwall mounted, on an embedded Redis, end to end.

Everything the demo starts it stops again (unless ``--keep-running``): the Redis server, the
uvicorn server. Keys are made in memory and never written to disk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import socket
import time
from typing import Any

import orjson
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .clientip import TrustedProxies
from .embedded import EmbeddedRedis
from .keyspace import Keyspace
from .middleware import Meterwall
from .reader import RecordReader
from .retention import Auditor, key_parts
from .sealing import generate_keypair, load_private_key
from .settings import Secret, Settings
from .store import connect
from .usage import usage_totals

CONSUMERS = ("acme", "globex", "initech")
CLIENT_IPS = (
    "203.0.113.7", "203.0.113.8", "198.51.100.23", "192.0.2.44", "2001:db8::7", "2001:db8:1::99",
)  # fmt: skip
PASSWORD = "hunter2-correct-horse"  # noqa: S105 (sample traffic: the demo proves it is not stored)
BEARER = "sk_live_9f8e7d6c5b4a39281706"


def sample_app() -> Starlette:
    async def list_items(request: Request) -> JSONResponse:
        return JSONResponse([{"id": n, "name": f"item {n}"} for n in range(3)])

    async def get_item(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["item_id"], "name": "widget"})

    async def login(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"user": body.get("username"), "session": "ok"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/items", list_items),
            Route("/items/{item_id:int}", get_item),
            Route("/login", login, methods=["POST"]),
            Route("/health", health),
        ]
    )


async def _traffic(base: str, count: int) -> None:
    import httpx

    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=base) as client:

        async def one(n: int) -> None:
            headers = {
                "X-Consumer": CONSUMERS[n % len(CONSUMERS)],
                "X-Forwarded-For": rng.choice(CLIENT_IPS),
                "Authorization": f"Bearer {BEARER}",
            }
            if n % 5 == 0:
                body = {"username": f"user{n}", "password": PASSWORD}
                await client.post("/login", json=body, headers=headers)
            elif n % 7 == 0:
                await client.get("/health", headers=headers)
            elif n % 11 == 0:
                await client.get("/nowhere", headers=headers)
            else:
                await client.get(f"/items/{n}" if n % 2 else "/items", headers=headers)

        for start in range(0, count, 20):
            await asyncio.gather(*(one(n) for n in range(start, min(start + 20, count))))


async def run_demo(out: Console, *, keep_running: bool = False, count: int = 300) -> None:
    import uvicorn

    started = time.monotonic()
    server = EmbeddedRedis()
    await asyncio.to_thread(server.start)
    api: uvicorn.Server | None = None
    serving: asyncio.Task[None] | None = None
    try:
        out.print(
            f"[bold]meterwall demo[/]  Redis: {server.url} ({os.path.basename(server.binary)})"
        )
        pem, public = generate_keypair()
        settings = Settings(
            redis_url=server.url,
            record_public_key=public,
            pseudonym_secret=Secret(os.urandom(32)),
            trusted_proxies=TrustedProxies(["127.0.0.1"]),
            consumer_header="X-Consumer",
        )
        app = Meterwall(sample_app(), settings=settings)
        listener = socket.create_server(("127.0.0.1", 0))  # clients may connect at once
        port = listener.getsockname()[1]
        api = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        serving = asyncio.create_task(api.serve(sockets=[listener]))
        base = f"http://127.0.0.1:{port}"
        out.print(f"sample API with meterwall mounted: {base}")
        try:
            await _traffic(base, count)
        except Exception as exc:  # httpx's errors are neither OSError nor one line
            if api.should_exit:  # uvicorn took a Ctrl-C for itself and is stopping
                raise KeyboardInterrupt from None
            raise OSError(f"the sample API stopped answering: {exc!r}") from None
        out.print(
            f"sent {count} requests from {len(CONSUMERS)} consumers "
            f"and {len(CLIENT_IPS)} client IPs"
        )
        if keep_running:
            await app.flusher.flush()
        else:
            api.should_exit = True
            await serving  # lifespan shutdown flushes everything
        await _report(out, settings, pem)
        if keep_running:
            _print_reach(out, base, server.url, public, settings)
            await serving
        else:
            out.print(f"done in {time.monotonic() - started:.1f} s; everything started is stopped")
    finally:  # whatever failed or was interrupted: the API first, then Redis
        if serving is not None and not serving.done():
            assert api is not None
            api.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(serving), 5)
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(BaseException):
                    await serving
        await asyncio.to_thread(server.stop)


async def _report(out: Console, settings: Settings, pem: bytes) -> None:
    redis = connect(settings)
    try:
        keyspace = settings.keyspace()
        reader = RecordReader(redis, settings, load_private_key(pem))
        records = await reader.records()
        out.print(f"\n[bold]{len(records)} sealed records[/] stored in Redis")
        searched, hits = await _search_literals(redis, keyspace, [*CLIENT_IPS, PASSWORD, BEARER])
        checks = await Auditor(redis, keyspace, reader=reader, settings=settings).run()
        plain = next(c for c in checks if c.name == "plaintext")
        verdict = "[green]none found" if not hits and plain.ok else f"[red]FOUND: {hits}"
        out.print(
            f"privacy proof: searched {searched} bytes in every key for the {len(CLIENT_IPS)} "
            f"client IPs, the password and the bearer token: {verdict}"
        )
        out.print(
            f"audit: {', '.join(f'{c.name} ' + ('pass' if c.ok else 'FAIL') for c in checks)}"
        )
        sample = next(
            (r for r in records if r["route"] == "/login"), records[0] if records else None
        )
        if sample is not None:
            out.print("\n[bold]one record, opened with the private key[/] (the reader side only):")
            shown = {**sample, "headers": [f"{name}: {value}" for name, value in sample["headers"]]}
            out.print(Syntax(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode(), "json"))
        now = int(time.time())
        rows = await usage_totals(redis, keyspace, now - 3600, now)
        table = Table("consumer", "route", "method", "status", "requests", title="request counts")
        for row in rows:
            table.add_row(row.consumer, row.route, row.method, str(row.status), str(row.requests))
        out.print(table)
    finally:
        await redis.aclose()


async def _search_literals(
    redis: Any, keyspace: Keyspace, needles: list[str]
) -> tuple[int, list[str]]:
    """Look for each literal in every part of every key (ciphertext included)."""
    searched, hits = 0, list[str]()
    encoded = [n.encode() for n in needles]
    async for key in redis.scan_iter(match=keyspace.pattern()):
        blob = key + b"".join(value for _, value in await key_parts(redis, key))
        searched += len(blob)
        hits.extend(n.decode() for n in encoded if n in blob)
    return searched, hits


def _print_reach(out: Console, base: str, redis_url: str, public: str, settings: Settings) -> None:
    secret = settings.pseudonym_secret
    assert secret is not None
    out.print(f"\nstill running: API {base} (try `curl {base}/items`), Redis {redis_url}")
    out.print(f"MW_REDIS_URL={redis_url}")
    out.print(f"MW_RECORD_PUBLIC_KEY={public}")
    out.print(f"MW_PSEUDONYM_SECRET={base64.urlsafe_b64encode(secret.reveal()).decode()}")
    out.print(
        "`meterwall audit` works against it with MW_REDIS_URL exported. Ctrl-C stops everything."
    )
