"""The middleware at ASGI message level, with FastAPI, and behind a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from meterwall import Meterwall
from meterwall.reader import RecordReader
from meterwall.types import Message, Receive, Scope, Send
from meterwall.usage import usage_totals
from tests.helpers import this_hour


def http_scope(path: str = "/", **extra: Any) -> dict[str, Any]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"api.test")], "client": ("192.0.2.1", 1234),
        "server": ("api.test", 80),
    }  # fmt: skip
    scope.update(extra)
    return scope


def body_receive(*chunks: bytes) -> Receive:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks or (b"",))
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


async def test_streaming_response_is_forwarded_chunk_by_chunk(settings) -> None:
    released = asyncio.Event()
    seen: list[Message] = []
    first_chunk_seen = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await released.wait()  # the app is still streaming
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    async def send(message: Message) -> None:
        seen.append(message)
        if message.get("body") == b"one":
            first_chunk_seen.set()

    mw = Meterwall(app, settings=settings)
    call = asyncio.create_task(mw(http_scope(), body_receive(), send))
    await first_chunk_seen.wait()
    assert [m.get("body") for m in seen] == [None, b"one"]  # arrived before the app finished
    released.set()
    await call
    assert [m.get("body") for m in seen] == [None, b"one", b"two"]
    await mw.aclose()


async def test_unknown_scopes_pass_through_untouched(settings) -> None:
    calls: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "custom.event"}

    async def send(message: Message) -> None:
        return None

    mw = Meterwall(app, settings=settings)
    scope = {"type": "custom", "path": "/x", "headers": []}
    await mw(scope, receive, send)
    assert calls == [(scope, receive, send)]
    assert len(mw.flusher.meter) == 0


async def test_websocket_messages_pass_unchanged_and_each_handshake_is_metered(
    redis, settings, private_key
) -> None:
    """Frames are not captured; the handshake is a request (a GET answered 101, or refused),
    counted like one, so a quota it spends has its row in the ledger."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        if scope["path"] == "/refused":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})
        await send({"type": "websocket.close", "code": 1000})

    def receiver() -> Receive:
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]

        async def receive() -> Message:
            return incoming.pop(0)

        return receive

    async def send(message: Message) -> None:
        seen.append(message)

    mw = Meterwall(app, settings=settings)
    for path in ("/ws", "/refused"):
        scope = {"type": "websocket", "path": path, "headers": [(b"host", b"api.test")],
                 "scheme": "ws", "client": ("192.0.2.1", 1),
                 "server": ("api.test", 80)}  # fmt: skip
        await mw(scope, receiver(), send)
    assert seen == [
        {"type": "websocket.accept"}, {"type": "websocket.send", "text": "echo:hi"},
        {"type": "websocket.close", "code": 1000}, {"type": "websocket.close", "code": 1008},
    ]  # fmt: skip
    await mw.aclose()
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    assert sorted((r.method, r.status, r.requests) for r in rows) == [
        ("GET", 101, 1), ("GET", 403, 1),
    ]  # fmt: skip
    records = await RecordReader(redis, settings, private_key).records()
    assert sorted((r["path"], r["status"], r["bytes_in"]) for r in records) == [
        ("/refused", 403, 0), ("/ws", 101, 0),
    ]  # fmt: skip


async def test_lifespan_messages_pass_unchanged_and_shutdown_flushes(
    redis, settings, private_key
) -> None:
    received: list[Message] = []
    sent: list[Message] = []
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            for reply in ("lifespan.startup.complete", "lifespan.shutdown.complete"):
                received.append(await receive())
                if reply.endswith("shutdown.complete"):
                    # a request made before shutdown must be in Redis once shutdown completes
                    await mw(http_scope("/x"), body_receive(), _discard)
                await send({"type": reply})
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    mw = Meterwall(app, settings=settings)
    await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert received == [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    [record] = await RecordReader(redis, settings, private_key).records()
    assert (record["status"], record["client"]["ip"]) == (204, "192.0.2.1")


async def _discard(message: Message) -> None:
    return None


async def test_malformed_requests_never_raise_into_the_app(redis, settings, private_key) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    settings = settings.replace(consumer_header="X-Consumer")
    mw = Meterwall(app, settings=settings)
    weird_headers = [
        (b"x-forwarded-for", b"\xff\xfe, not-an-ip, 999.1.1.1"),
        (b"forwarded", b'for="[::1'),
        (b"x-consumer", b"\x00\x01bad"),
        (b"content-type", b"application/json"),
        (b"authorization", b""),
        (b"cookie", b";;==;"),
    ]
    scopes = [
        http_scope(client=None),
        http_scope(client=("not an address", 0), headers=weird_headers),
        http_scope(headers=weird_headers, query_string=b"%zz=%%&password&&=="),
        http_scope(server=None, method="BREW"),
    ]
    for scope in scopes:
        await mw(scope, body_receive(b'{"password": "x", "trunc'), _discard)
    await mw.aclose()
    records = await RecordReader(redis, settings, private_key).records()
    assert len(records) == 4
    assert records[0]["client"] == {"ip": None, "pseudonym": None}
    assert records[1]["client"]["pseudonym"] == "invalid"
    assert all(r["body"]["kind"] == "digest" for r in records)  # unparseable JSON
    assert records[1]["consumer"] is None


async def test_error_after_response_start_keeps_status_and_flags_error(
    redis, settings, private_key
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ConnectionResetError("stream broke")

    mw = Meterwall(app, settings=settings)
    with pytest.raises(ConnectionResetError):
        await mw(http_scope(), body_receive(), _discard)
    await mw.aclose()
    [record] = await RecordReader(redis, settings, private_key).records()
    assert (record["status"], record["error"], record["bytes_out"]) == (200, True, 7)


async def test_client_disconnect_is_recorded(redis, settings, private_key) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    mw = Meterwall(app, settings=settings)
    await mw(http_scope(), body_receive(b"abc"), _discard)
    await mw.aclose()
    [record] = await RecordReader(redis, settings, private_key).records()
    assert (record["disconnected"], record["status"], record["ttfb_ms"]) == (True, 0, None)
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    assert [(r.status, r.requests) for r in rows] == [(499, 1)]


async def test_fastapi_with_add_middleware_records_route_templates(
    redis, settings, private_key
) -> None:
    api = FastAPI()

    @api.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    api.add_middleware(Meterwall, settings=settings)
    async with LifespanManager(api) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/users/7")).json() == {"id": 7}
            assert (await client.get("/users/x")).status_code == 422
    records = await RecordReader(redis, settings, private_key).records()
    assert sorted((r["route"], r["status"]) for r in records) == [
        ("/users/{user_id}", 200),
        ("/users/{user_id}", 422),
    ]


async def test_through_a_real_uvicorn_server(redis, settings, private_key) -> None:
    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    app = Meterwall(Starlette(routes=[Route("/hello", hello)]), settings=settings)
    listener = socket.create_server(("127.0.0.1", 0))  # listening now: clients may connect
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        replies = await asyncio.gather(*(client.get("/hello") for _ in range(25)))
    assert {r.status_code for r in replies} == {200}
    server.should_exit = True
    await serving  # lifespan shutdown flushes
    listener.close()
    records = await RecordReader(redis, settings, private_key).records()
    assert len(records) == 25
    assert {r["route"] for r in records} == {"/hello"}
    assert {r["client"]["ip"] for r in records} == {"127.0.0.1"}


async def test_mounts_with_path_parameters_never_put_raw_path_text_in_counters(
    redis, settings
) -> None:
    async def item(request: Any) -> JSONResponse:
        return JSONResponse({})

    from starlette.routing import Mount

    inner = [Route("/items/{item_id}", item)]
    app = Starlette(routes=[Mount("/t/{tenant}", routes=[Mount("/v1", routes=inner)])])
    mw = Meterwall(app, settings=settings)
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/t/acme-secret/v1/items/9")).status_code == 200
            assert (await client.request("BREW", "/t/x/v1/items/1")).status_code == 405
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    assert sorted((r.route, r.method) for r in rows) == [
        ("/t/{tenant}/v1/items/{item_id}", "GET"),
        ("/t/{tenant}/v1/items/{item_id}", "OTHER"),
    ]


async def test_mounted_sub_applications_count_under_their_mount_pattern(redis, settings) -> None:
    """``app.mount("/v1", sub_app)`` versions an API: a sub-application replaces scope["app"]
    with itself, so its mounts are looked up from the router the request entered."""

    async def item(request: Any) -> JSONResponse:
        return JSONResponse({})

    from starlette.routing import Mount

    plain = Starlette(routes=[Mount("/v1", app=Starlette(routes=[Route("/items/{n}", item)]))])
    fastapi_sub = FastAPI()

    @fastapi_sub.get("/items/{item_id}")
    async def fast_item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    fast = FastAPI()
    fast.mount("/v2", fastapi_sub)
    fast.add_middleware(Meterwall, settings=settings)  # scope["app"] is the outer app here
    for app, path in ((Meterwall(plain, settings=settings), "/v1/items/9"), (fast, "/v2/items/9")):
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get(path)).status_code == 200
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    assert sorted(r.route for r in rows) == ["/v1/items/{n}", "/v2/items/{item_id}"]


async def test_lifespan_shutdown_failed_still_flushes(settings) -> None:
    """The app's own shutdown code raising must not cost the requests captured before it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        raise RuntimeError("closing the app's own pool failed")

    mw = Meterwall(Starlette(lifespan=lifespan), settings=settings)
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> Message:
        if incoming[0]["type"] == "lifespan.shutdown":
            await mw(http_scope("/x"), body_receive(), _discard)  # one request while running
            assert not mw.flusher.idle()
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    with contextlib.suppress(RuntimeError):
        await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert mw.flusher.idle(), "the request captured before shutdown was not flushed"


async def test_completed_responses_are_not_flagged_disconnected(
    redis, settings, private_key
) -> None:
    """Servers answer ``receive`` with http.disconnect once a response is complete; streaming
    and file responses listen for it, so only one before the last body byte counts."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
        if scope["path"] == "/gone":  # the client left in the middle of the stream
            assert (await receive())["type"] == "http.disconnect"
            return
        await send({"type": "http.response.body", "body": b"last"})
        assert (await receive())["type"] == "http.disconnect"

    mw = Meterwall(app, settings=settings)
    await mw(http_scope("/done"), body_receive(), _discard)
    await mw(http_scope("/gone", client=("192.0.2.2", 1)), body_receive(), _discard)
    await mw.aclose()
    records = await RecordReader(redis, settings, private_key).records()
    flags = {r["path"]: (r["disconnected"], r["bytes_out"]) for r in records}
    assert flags == {"/done": (False, 9), "/gone": (True, 5)}


async def test_bytes_out_counts_what_reaches_the_client(redis, settings, tmp_path) -> None:
    """No body for HEAD, 204 and 304 (the server drops what the app sends); a file handed to
    the server by pathsend (Starlette's FileResponse) counts its size."""
    served = tmp_path / "report.csv"
    served.write_bytes(b"x" * 50_000)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        status = 304 if scope["path"] == "/cached" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        if scope["path"] == "/file":
            await send({"type": "http.response.pathsend", "path": str(served)})
        else:
            await send({"type": "http.response.body", "body": b"y" * 1000})

    mw = Meterwall(app, settings=settings)
    for method, path in (("GET", "/a"), ("HEAD", "/a"), ("GET", "/cached"), ("GET", "/file")):
        await mw(http_scope(path, method=method), body_receive(), _discard)
    await mw.aclose()
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    assert sorted((r.method, r.status, r.bytes_out) for r in rows) == [
        ("GET", 200, 51_000), ("GET", 304, 0), ("HEAD", 200, 0),
    ]  # fmt: skip


async def test_queued_exchanges_are_charged_their_headers_and_query(settings) -> None:
    """MW_BUFFER_BYTES bounds memory only if large headers count: they are the slowest to
    redact, so they pile up first while Redis is slow."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = Meterwall(app, settings=settings.replace(flush_interval=60))
    headers = [(b"host", b"api.test"), (b"x-trace", b"t" * 30_000)]
    await mw(
        http_scope("/x", headers=headers, query_string=b"q=" + b"s" * 4000),
        body_receive(),
        _discard,
    )
    assert mw.flusher.inbox.bytes > 34_000
    await mw.aclose()
