"""meterwall_aiohttp specifics: websocket handshakes get the access decision; bodies that
cannot be read ahead are recorded by size and type only."""

from __future__ import annotations

import aiohttp
import meterwall_aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meterwall import KeyStore, Settings
from meterwall.reader import RecordReader


async def echo_socket(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        await socket.send_str("echo:" + message.data)
    return socket


async def upload(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(1024):
        size += len(chunk)
    return web.json_response({"size": size})


async def test_a_websocket_handshake_gets_the_access_decision(redis, settings: Settings) -> None:
    own = settings.replace(access="keys")
    _, key = await KeyStore.for_settings(redis, own).create("acme")
    app = web.Application()
    app.router.add_get("/ws", echo_socket)
    meterwall_aiohttp.setup(app, own)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as client:
        url = server.make_url("/ws")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(url)
        assert refused.value.status == 401  # answered over HTTP, before the upgrade
        async with client.ws_connect(url, headers={"X-API-Key": key}) as socket:
            await socket.send_str("hi")
            assert (await socket.receive()).data == "echo:hi"


async def test_a_chunked_body_is_recorded_by_size_and_type_only(
    redis, settings: Settings, private_key
) -> None:
    app = web.Application()
    app.router.add_post("/upload", upload)
    meterwall_aiohttp.setup(app, settings)

    async def chunks():  # no Content-Length: aiohttp cannot keep it for the handler
        for _ in range(4):
            yield b'{"password": "hunter2"}'

    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as client:
        reply = await client.post(server.make_url("/upload"), data=chunks(),
                                  headers={"Content-Type": "application/json"})  # fmt: skip
        assert (await reply.json())["size"] == 4 * 23  # the handler read every byte
    [record] = await RecordReader(redis, settings, private_key).records()
    assert record["body"]["truncated"] is True
    assert record["body"]["kind"] == "digest"
    assert "hunter2" not in str(record)


async def stream_then_fail(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    await response.prepare(request)
    await response.write(b"x" * 1000)
    raise RuntimeError("the backend went away in the middle of the stream")


async def test_an_error_after_a_stream_started_keeps_the_status_sent(
    redis, settings: Settings, private_key
) -> None:
    """As in the ASGI middleware: the status already sent, its bytes, and the error flag (for
    a streamed answer aiohttp counts what it wrote, head and chunk framing included)."""
    app = web.Application()
    app.router.add_get("/s", stream_then_fail)
    meterwall_aiohttp.setup(app, settings)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        aiohttp.ClientSession() as client,
        client.get(server.make_url("/s")) as reply,
    ):
        assert reply.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await reply.read()
    [record] = await RecordReader(redis, settings, private_key).records()
    assert (record["status"], record["error"]) == (200, True)
    assert 1000 <= record["bytes_out"] < 1400
