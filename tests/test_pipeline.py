"""End to end in-process: requests through the middleware land in Redis sealed, counted, private."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from meterwall import InvalidRecord, Meterwall, Settings
from meterwall.clientip import TrustedProxies
from meterwall.reader import RecordReader
from meterwall.retention import key_parts
from meterwall.sealing import RecordOpener, generate_keypair, load_private_key, read_envelope
from meterwall.usage import usage_totals
from tests.helpers import this_hour

PASSWORD = "pa55-word-never-stored"
TOKEN = "sk_live_0123456789abcdef"


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["item_id"]})


async def login(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"received": len(body)})


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("the app failed")


def make_app() -> Starlette:
    api = [Route("/items/{item_id:int}", item), Route("/login", login, methods=["POST"])]
    return Starlette(routes=[*api, Route("/boom", boom), Mount("/v1", routes=api)])


async def run_traffic(settings: Settings, send: Any) -> Meterwall:
    """Serve ``send(client)`` through a fresh app; lifespan shutdown flushes everything."""
    app = Meterwall(make_app(), settings=settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("127.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            await send(client)
    return app


async def read_all(redis: Any, settings: Settings, private_key: X25519PrivateKey) -> list[dict]:
    return await RecordReader(redis, settings, private_key).records()


async def test_every_request_is_sealed_and_counted(redis, settings, private_key) -> None:
    settings = settings.replace(consumer_header="X-Consumer")

    async def send(client: httpx.AsyncClient) -> None:
        for n in range(20):
            await client.get(f"/items/{n}", headers={"X-Consumer": "acme"})
        for _ in range(5):
            await client.post("/v1/login", json={"user": "u", "password": PASSWORD})
        await client.get("/nowhere")

    await run_traffic(settings, send)
    records = await read_all(redis, settings, private_key)
    assert len(records) == 26
    routes = sorted({r["route"] for r in records})
    assert routes == ["/items/{item_id:int}", "/v1/login", "<unmatched>"]
    login_record = next(r for r in records if r["route"] == "/v1/login")
    assert login_record["body"]["json"]["password"] == "***"
    assert login_record["client"]["ip"] == "127.0.0.1"
    assert len(login_record["client"]["pseudonym"]) == 32
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    counts = {(r.consumer, r.route, r.status): r.requests for r in rows}
    assert counts == {
        ("acme", "/items/{item_id:int}", 200): 20,
        ("", "/v1/login", 200): 5,
        ("", "<unmatched>", 404): 1,
    }


async def test_a_records_id_and_time_come_from_its_authenticated_header(
    redis, settings, private_key
) -> None:
    async def send(client: httpx.AsyncClient) -> None:
        for n in range(5):
            await client.get(f"/items/{n}")

    before = time.time_ns()
    await run_traffic(settings, send)
    reader = RecordReader(redis, settings, private_key)
    opened = [(blob, record) async for blob, record in reader.iter_records()]
    assert len(opened) == 5
    for blob, record in opened:
        envelope = read_envelope(blob)
        assert (record["id"], record["time_ns"]) == (envelope.record_id.hex(), envelope.time_ns)
        assert before <= record["time_ns"] <= time.time_ns()
        assert record["v"] == 2
    assert len({record["id"] for _, record in opened}) == 5
    # The sealed plaintext itself does not repeat them (28 bytes of every stored record).
    blob = opened[0][0]
    wrapped = await redis.get(settings.keyspace().data_key(0, read_envelope(blob).key_id))
    plain = RecordOpener(private_key).open(blob, wrapped)
    assert plain.startswith(b'{"v":2,"method":"GET"')
    assert b'"id"' not in plain
    assert b'"time_ns"' not in plain


async def test_no_plaintext_ip_or_credential_anywhere_in_redis(redis, settings) -> None:
    settings = settings.replace(trusted_proxies=TrustedProxies(["127.0.0.1"]))
    client_ips = ["203.0.113.9", "2001:db8::42"]

    async def send(client: httpx.AsyncClient) -> None:
        for ip in client_ips:
            headers = {"X-Forwarded-For": ip, "Authorization": f"Bearer {TOKEN}",
                       "Cookie": f"session={TOKEN}"}  # fmt: skip
            await client.post("/login", json={"password": PASSWORD}, headers=headers)
            await client.get("/items/1", params={"api_key": TOKEN}, headers=headers)

    await run_traffic(settings, send)
    needles = [*client_ips, "2001:db8:0:0:0:0:0:42", PASSWORD, TOKEN, "127.0.0.1"]
    keys = [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:*")]
    assert any(b":rec:" in k for k in keys)
    for key in keys:
        blob = key + b"".join(value for _, value in await key_parts(redis, key))
        for needle in needles:
            assert needle.encode() not in blob, (key, needle)


async def test_app_exception_is_recorded_as_500_and_reraised(redis, settings, private_key) -> None:
    app = Meterwall(make_app(), settings=settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            with pytest.raises(RuntimeError, match="the app failed"):
                await client.get("/boom")
    [record] = await read_all(redis, settings, private_key)
    assert (record["status"], record["error"], record["route"]) == (500, True, "/boom")


async def test_oversize_body_reaches_app_whole_and_record_is_truncated(
    redis, settings, private_key
) -> None:
    settings = settings.replace(body_limit=1024)
    body = b"x" * 5000
    replies = []

    async def send(client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/login", content=body, headers={"content-type": "application/json"}
        )
        replies.append(response.json())

    await run_traffic(settings, send)
    assert replies == [{"received": 5000}]
    [record] = await read_all(redis, settings, private_key)
    assert record["body"]["truncated"] is True
    assert record["body"]["size"] == 5000
    assert record["bytes_in"] == 5000
    assert "json" not in record["body"]


@pytest.mark.parametrize(
    ("trusted", "expected"), [(None, "127.0.0.1"), (["127.0.0.1"], "198.51.100.5")]
)
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    redis, settings, private_key, trusted, expected
) -> None:
    if trusted:
        settings = settings.replace(trusted_proxies=TrustedProxies(trusted))

    async def send(client: httpx.AsyncClient) -> None:
        await client.get("/items/3", headers={"X-Forwarded-For": "198.51.100.5"})

    await run_traffic(settings, send)
    [record] = await read_all(redis, settings, private_key)
    assert record["client"]["ip"] == expected
    forwarded = dict(record["headers"])["x-forwarded-for"]
    assert "198.51.100.5" not in forwarded


async def test_counters_are_exact_under_concurrency(redis, settings) -> None:
    async def send(client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(client.get(f"/items/{n}") for n in range(300)))

    await run_traffic(settings.replace(batch_max_records=37), send)
    rows = await usage_totals(redis, settings.keyspace(), *this_hour())
    assert [(r.route, r.requests) for r in rows] == [("/items/{item_id:int}", 300)]
    hourly = await usage_totals(redis, settings.keyspace(), *this_hour(), hourly=True)
    assert [(r.route, r.requests) for r in hourly] == [("/items/{item_id:int}", 300)]


async def test_writer_with_public_key_only_cannot_open_and_tampering_fails(
    redis, settings, private_key
) -> None:
    async def send(client: httpx.AsyncClient) -> None:
        await client.get("/items/1")

    await run_traffic(settings, send)
    reader = RecordReader(redis, settings, private_key)
    [(blob, record)] = [pair async for pair in reader.iter_records()]
    assert record["route"] == "/items/{item_id:int}"
    stranger = load_private_key(generate_keypair()[0])
    with pytest.raises(InvalidRecord):
        await RecordReader(redis, settings, stranger).records()
    tampered = bytearray(blob)
    tampered[-20] ^= 1
    shard = settings.keyspace().shard_of("")
    with pytest.raises(InvalidRecord):
        await reader.open(shard, bytes(tampered))
    with pytest.raises(InvalidRecord):
        RecordOpener(private_key).open(blob[:40], b"\x01" + b"\x00" * 50)
