"""Access control: keys, rules, networks and scopes, answers, revocation, failure policy."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from hashlib import blake2b
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from meterwall import Meterwall
from meterwall.access import CACHE_SECONDS
from meterwall.apikeys import KeyStore, new_key, parse_key
from meterwall.embedded import EmbeddedRedis
from meterwall.errors import ConfigurationError
from meterwall.pseudonyms import derive
from meterwall.reader import RecordReader
from meterwall.retention import key_parts
from meterwall.usage import UsageReader
from tests.test_flusher import ok_app

RULES = "/health=public, POST /items/*=items:write, /admin/{section}/*=admin"


async def hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


api_app = Starlette(routes=[Route("/health", hello), Route("/x", hello),
                            Route("/items/{n}", hello, methods=["GET", "POST"])])  # fmt: skip


def test_keys_carry_a_checksum_and_bad_shapes_are_refused() -> None:
    key_id, full = new_key()
    assert parse_key(full) == key_id
    assert full.startswith(f"mw_live_{key_id}_")
    typo = full[:-7] + ("a" if full[-7] != "a" else "b") + full[-6:]
    for bad in [typo, full[:-1], full + "x", "mw_live_zz_abc", "ключ" * 8, "x" * 10_000, ""]:
        assert parse_key(bad) is None


def typo(key: str) -> str:
    """The key with its last character changed (so its checksum no longer matches)."""
    return key[:-1] + ("x" if key[-1] != "x" else "y")


@pytest.fixture
def access_settings(settings):
    return settings.replace(access="keys", access_rules=RULES)


async def make_key(redis, settings, **options: Any) -> tuple[Any, str]:
    assert settings.pseudonym_secret is not None
    store = KeyStore(
        redis, settings.keyspace(), derive(settings.pseudonym_secret.reveal(), "api-keys")
    )
    return await store.create(options.pop("consumer", "acme"), **options)


@contextlib.asynccontextmanager
async def serving(app: Meterwall) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` served in process, with its lifespan (startup and shutdown) run."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("127.0.0.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def call(app: Meterwall, *requests: tuple[str, str, dict[str, str]]) -> list[httpx.Response]:
    async with serving(app) as client:
        return [await client.request(m, path, headers=h) for m, path, h in requests]


async def test_every_answer_with_its_headers_and_body(redis, access_settings) -> None:
    reader_key, reader = await make_key(redis, access_settings, scopes=("items:read",))
    _, writer = await make_key(redis, access_settings, scopes=("items:write",))
    _, fenced = await make_key(redis, access_settings, cidrs=("10.0.0.0/8",))
    _, expired = await make_key(redis, access_settings, expires=1)
    app = Meterwall(api_app, settings=access_settings)
    replies = await call(
        app,
        ("GET", "/health", {}),
        ("GET", "/items/1", {}),
        ("GET", "/items/1", {"Authorization": f"Bearer {reader}"}),
        ("GET", "/items/1", {"X-API-Key": reader}),
        ("POST", "/items/1", {"Authorization": f"Bearer {reader}"}),
        ("POST", "/items/1", {"Authorization": f"Bearer {writer}"}),
        ("GET", "/items/1", {"Authorization": f"Bearer {fenced}"}),
        ("GET", "/items/1", {"Authorization": f"Bearer {expired}"}),
        ("GET", "/items/1", {"Authorization": f"Bearer {typo(reader)}"}),
        ("GET", "/items/1", {"Authorization": ("Bearer " + "é" * 40).encode()}),
        ("GET", "/items/1", {"X-API-Key": "k" * 20_000}),
    )
    statuses = [r.status_code for r in replies]
    assert statuses == [200, 401, 200, 200, 403, 200, 403, 401, 401, 401, 401]
    missing = replies[1]
    assert missing.headers["www-authenticate"] == 'Bearer realm="api"'
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"].endswith("/missing-key")
    assert [r.json()["detail"] for r in replies[4:10:2]] == ["scope", "network", "malformed"]
    assert replies[7].json()["detail"] == "expired"
    rows = await UsageReader(redis, access_settings.keyspace()).totals(
        "acme",
        __import__("datetime").datetime.now(__import__("datetime").UTC).strftime("%Y-%m"),
        ["key_id", "status"],
    )
    admitted = [r for r in rows if r["key_id"] == reader_key.id and r["status"] == 200]
    assert admitted[0]["requests"] == 2
    assert sum(r["denied"] for r in rows) == 3  # scope, network, expired (all known keys)


async def test_the_key_is_never_in_redis_or_logs_and_records_say_the_decision(
    redis, access_settings, private_key, caplog
) -> None:
    _, full = await make_key(redis, access_settings)
    app = Meterwall(api_app, settings=access_settings)
    with caplog.at_level("DEBUG"):
        await call(app, ("GET", "/items/9", {"Authorization": f"Bearer {full}"}),
                   ("GET", "/x", {}), ("GET", "/x", {"X-API-Key": typo(full)}))  # fmt: skip
    assert caplog.records  # something was logged at DEBUG, and none of it holds the key
    assert full.rsplit("_", 1)[1][:-6] not in caplog.text
    secret_part = full.rsplit("_", 1)[1].encode()
    async for key in redis.scan_iter(match=f"{access_settings.key_prefix}:*"):
        blob = key + b"".join(value for _, value in await key_parts(redis, key))
        assert secret_part not in blob
    records = await RecordReader(redis, access_settings, private_key).records()
    assert sorted(r["decision"] for r in records) == ["admitted", "malformed", "missing-key"]
    admitted = next(r for r in records if r["decision"] == "admitted")
    assert admitted["consumer"] == "acme"
    assert "Bearer fp:" in dict(admitted["headers"])["authorization"]


async def test_a_revocation_reaches_a_running_worker_within_a_second(
    redis, access_settings
) -> None:
    meta, full = await make_key(redis, access_settings)
    app = Meterwall(api_app, settings=access_settings)
    headers = {"Authorization": f"Bearer {full}"}
    async with serving(app) as client:
        assert (await client.get("/items/1", headers=headers)).status_code == 200  # cached
        assert app.access is not None
        app.access.key_event.clear()
        store = KeyStore(redis, access_settings.keyspace(), app.access._server_key)
        await asyncio.wait_for(app.access.listening.wait(), timeout=1.0)
        await store.revoke(meta.id)
        await asyncio.wait_for(app.access.key_event.wait(), timeout=1.0)
        reply = await client.get("/items/1", headers=headers)
        assert (reply.status_code, reply.json()["detail"]) == (401, "revoked")


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_down_follows_the_failure_policy(settings, policy: str) -> None:
    server = EmbeddedRedis().start()
    try:
        own = settings.replace(redis_url=server.url, access="keys", access_rules=RULES,
                               access_on_redis_error=policy, flush_interval=60)  # fmt: skip
        client = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(server.url)
        _, known = await make_key(client, own)
        _, unknown = await make_key(client, own)
        await client.aclose()
        app = Meterwall(ok_app, settings=own)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            assert (await http.get("/items/1", headers={"X-API-Key": known})).status_code == 200
            server.stop()
            never = await http.get("/items/1", headers={"X-API-Key": unknown})  # finds it down
            seen = await http.get("/items/1", headers={"X-API-Key": known})
        assert never.status_code == 503
        assert never.headers["retry-after"] == "5"
        assert never.headers["meterwall-degraded"] == "access-store-unavailable"
        assert seen.status_code == (200 if policy == "open" else 503)
        await app.aclose(timeout=0.5)
    finally:
        server.stop()


async def test_a_websocket_handshake_gets_the_same_decision(access_settings) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    app = Meterwall(ok_app, settings=access_settings)
    await app({"type": "websocket", "path": "/items/1", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "missing-key"}]
    await app.aclose()


def test_keys_cli_shows_a_key_once_and_lists_only_metadata(settings) -> None:
    import base64

    from tests.test_cli import meterwall

    assert settings.pseudonym_secret is not None
    secret = base64.b64encode(settings.pseudonym_secret.reveal()).decode()
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix,
           "MW_PSEUDONYM_SECRET": secret}  # fmt: skip
    made = meterwall("keys", "create", "--consumer", "acme", "--scopes", "items:read",
                     "--expires", "30d", env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    full = made.stdout.strip()
    key_id = parse_key(full)
    assert key_id is not None
    listed = meterwall("keys", "list", "--format", "json", env=env)
    assert full.rsplit("_", 1)[1] not in listed.stdout
    [row] = __import__("json").loads(listed.stdout)
    assert (row["id"], row["consumer"], row["scopes"], row["state"]) == (
        key_id,
        "acme",
        ["items:read"],
        "valid",
    )
    assert meterwall("keys", "revoke", key_id, env=env).returncode == 0
    again = __import__("json").loads(meterwall("keys", "list", "--format", "json", env=env).stdout)
    assert again[0]["state"] == "revoked"
    nobody = meterwall("keys", "revoke", "000000000000", env=env)
    assert (nobody.returncode, nobody.stderr.count("\n")) == (2, 1)


async def test_a_query_string_key_only_when_enabled_and_never_kept(
    redis, access_settings, private_key, caplog
) -> None:
    meta, full = await make_key(redis, access_settings)
    [refused] = await call(Meterwall(api_app, settings=access_settings),
                           ("GET", f"/items/1?api_key={full}", {}))  # fmt: skip
    assert refused.status_code == 401
    enabled = access_settings.replace(api_key_query="api_key")
    with caplog.at_level("WARNING", logger="meterwall"):
        app = Meterwall(api_app, settings=enabled)
    assert "MW_API_KEY_QUERY=api_key" in caplog.text
    [admitted] = await call(app, ("GET", f"/items/1?q=7&api_key={full}", {}))
    assert admitted.status_code == 200
    records = await RecordReader(redis, enabled, private_key).records()
    assert sorted(r["decision"] for r in records) == ["admitted", "missing-key"]
    assert full not in str(records)
    assert "q=7" in str(records)
    store = KeyStore(
        redis, enabled.keyspace(), derive(enabled.pseudonym_secret.reveal(), "api-keys")
    )
    used = (await store.get(meta.id)).last_used  # written in the background, once a minute
    assert abs(used - time.time()) < 120


async def test_a_consumers_networks_apply_to_all_its_keys_and_changes_arrive_at_once(
    redis, access_settings
) -> None:
    from meterwall.consumers import ConsumerRegistry

    registry = ConsumerRegistry(redis, access_settings.keyspace())
    await registry.set("acme", allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    _, key = await make_key(redis, access_settings)
    app = Meterwall(api_app, settings=access_settings)
    headers = {"X-API-Key": key}

    async def status(client_ip: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(client_ip, 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return (await client.get("/items/1", headers=headers)).status_code

    async with LifespanManager(app):
        assert [await status(ip) for ip in ("10.1.2.3", "::ffff:10.1.2.3", "127.0.0.1",
                                            "10.9.1.1")] == [200, 200, 403, 403]  # fmt: skip
        assert app.access is not None
        await asyncio.wait_for(app.access.listening.wait(), timeout=1.0)
        app.access.key_event.clear()
        await registry.set("acme", allow=[], deny=[])  # published to every worker
        await asyncio.wait_for(app.access.key_event.wait(), timeout=1.0)
        assert await status("127.0.0.1") == 200
    with pytest.raises(ConfigurationError) as caught:
        await registry.set("acme", allow=["10.0.0.300/8"])
    assert caught.value.setting == "allow"


async def test_a_revocation_reaches_another_worker_process_within_a_second(
    redis, access_settings
) -> None:
    from tests.helpers import serve, stop
    from tests.test_limits import served

    meta, full = await make_key(redis, access_settings)
    servers, [port] = await serve(served(access_settings), 1)
    url, headers = f"http://127.0.0.1:{port}/echo/1", {"X-API-Key": full}
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.post(url, headers=headers)).status_code == 200  # now cached
            await KeyStore.for_settings(redis, access_settings).revoke(meta.id)
            deadline = time.monotonic() + 1.0
            while (reply := await client.post(url, headers=headers)).status_code == 200:
                assert time.monotonic() < deadline, "still admitted a second after revocation"
            assert (reply.status_code, reply.json()["detail"]) == (401, "revoked")
    finally:
        await stop(servers)


async def test_network_rules_see_the_client_behind_a_trusted_proxy(redis, access_settings) -> None:
    from meterwall.clientip import TrustedProxies

    own = access_settings.replace(access_allow="203.0.113.0/24",
                                  trusted_proxies=TrustedProxies.parse("10.0.0.0/8"))  # fmt: skip
    _, key = await make_key(redis, own)
    app = Meterwall(api_app, settings=own)

    async def status(peer: str, forwarded_for: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(peer, 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"X-API-Key": key, "X-Forwarded-For": forwarded_for}
            return (await client.get("/items/1", headers=headers)).status_code

    async with LifespanManager(app):
        assert await status("10.1.1.1", "203.0.113.5") == 200  # the proxy's client is allowed
        assert await status("10.1.1.1", "198.51.100.1") == 403
        assert await status("198.51.100.1", "203.0.113.5") == 403  # an untrusted peer's header


async def test_a_key_in_use_is_looked_up_again_before_its_cache_entry_lapses(
    redis, access_settings
) -> None:
    """A request never waits for Redis because a busy key's cache entry lapsed: within
    REFRESH_AHEAD_SECONDS of the end, the key is looked up again in the background. A lookup
    that races a revocation is not cached."""
    _, full = await make_key(redis, access_settings)
    app = Meterwall(api_app, settings=access_settings)
    headers = {"Authorization": f"Bearer {full}"}
    async with serving(app) as client:
        assert (await client.get("/items/1", headers=headers)).status_code == 200
        access = app.access
        assert access is not None
        [(digest, (_, key))] = access._cache.items()
        access._cache[digest] = (time.monotonic() + 1.0, key)  # about to lapse
        assert (await client.get("/items/1", headers=headers)).status_code == 200
        assert access._refreshing == {digest}  # looked up again, in the background
        await asyncio.gather(*access._background)
        assert access._cache[digest][0] > time.monotonic() + CACHE_SECONDS - 5  # renewed
        access._cache[digest] = (time.monotonic() + 1.0, key)
        access._refresh_ahead(full, digest)
        access.forget("some other key")  # an invalidation while the lookup is in flight
        await asyncio.gather(*access._background)
        assert access._cache[digest][0] < time.monotonic() + 2  # not renewed by that lookup


async def test_a_lookup_that_races_a_revocation_answers_but_is_not_cached(
    redis, access_settings
) -> None:
    _, full = await make_key(redis, access_settings)
    app = Meterwall(api_app, settings=access_settings)
    async with LifespanManager(app):
        access = app.access
        assert access is not None
        app._bind_access(access)  # what the first request does: Redis clients for this loop
        digest = blake2b(full.encode(), key=access._cache_key, digest_size=16).digest()
        racing = asyncio.ensure_future(access._verify(full, digest, None))
        await asyncio.sleep(0)  # its lookup is under way
        assert digest in access._lookups
        access.forget("another key")  # an invalidation arrives meanwhile
        assert digest not in access._lookups  # the next request looks up afresh
        key, answer, _ = await racing
        assert key is not None  # the racing request has its answer...
        assert answer is None
        assert digest not in access._cache  # ...which is not kept
        again, answer, _ = await access._verify(full, digest, None)
        assert again is not None
        assert answer is None
        assert digest in access._cache  # a lookup with no race is kept


async def test_access_rules_match_the_app_path_under_a_server_root_path(redis, settings) -> None:
    """``uvicorn --root-path /api`` puts /api in front of scope["path"]; Starlette routes on the
    path without it, and so must the rules (a scope requirement must not be bypassed)."""

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    own = settings.replace(access="keys", access_rules="/health=public, /admin/*=admin")
    _, key = await make_key(redis, own)  # no admin scope
    _, admin_key = await make_key(redis, own, scopes=("admin",))
    app = Meterwall(
        Starlette(routes=[Route("/health", hello), Route("/admin/users", hello)]), settings=own
    )
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, root_path="/api", client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            assert (await client.get("/api/health")).status_code == 200
            denied = await client.get("/api/admin/users", headers={"X-API-Key": key})
            assert denied.status_code == 403
            allowed = await client.get("/api/admin/users", headers={"X-API-Key": admin_key})
            assert allowed.status_code == 200


async def test_access_timeout_bounds_connecting_to_an_unreachable_redis(settings) -> None:
    """A key lookup against a host that never completes the TCP handshake answers 503 after
    MW_ACCESS_TIMEOUT, not after MW_REDIS_TIMEOUT (30 s here)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once its queue is full, connecting hangs
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    own = settings.replace(
        access="keys", redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout=30.0,
        access_timeout=0.2, records="off", journal_dir="off",
    )  # fmt: skip
    app = Meterwall(Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))]), settings=own)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            reply = await asyncio.wait_for(client.get("/", headers={"X-API-Key": new_key()[1]}), 10)
        assert reply.status_code == 503
    finally:
        if app.flusher._task is not None:  # it would wait 30 s on that host: not this test's
            app.flusher._task.cancel()
        for sock in (listener, *fillers):
            sock.close()
