"""The admin HTTP API: tokens and roles, problem+json errors, the same numbers as Python."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from meterwall import Meterwall
from meterwall.admin import AdminTokens, admin_app
from meterwall.apikeys import parse_key
from meterwall.usage import UsageReader
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope


@pytest.fixture
async def api(redis, settings):
    app = admin_app(settings, redis=redis)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


async def bearer(redis, settings, role: str) -> dict[str, str]:
    token = await AdminTokens(redis, settings.keyspace()).create(f"{role}-bot", role)
    return {"Authorization": f"Bearer {token}"}


async def test_openapi_is_public_and_every_other_route_needs_a_token(api, redis, settings) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert "/usage/{consumer}" in spec["paths"]
    missing = await api.get("/usage/acme", params={"period": "2026-11"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.headers["content-type"] == "application/problem+json"
    wrong = await api.get("/usage/acme", headers={"Authorization": "Bearer mwa_abc_def"})
    assert wrong.status_code == 401
    billing, admin = (
        await bearer(redis, settings, "billing"),
        await bearer(redis, settings, "admin"),
    )
    assert (await api.get("/consumers", headers=billing)).status_code == 403  # roles are disjoint
    assert (await api.get("/usage", headers=admin, params={"period": "2026-11"})).status_code == 403
    stored = await redis.hgetall(f"{settings.key_prefix}:admin:tokens")
    secret = billing["Authorization"].rsplit("_", 1)[1]
    assert all(secret.encode() not in value for value in stored.values())


async def test_billing_reads_the_same_numbers_as_python(api, redis, settings) -> None:
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"))
    for path in ["/a", "/b", "/b"]:
        await mw(http_scope(path, headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    await mw.aclose()
    month = datetime.now(UTC).strftime("%Y-%m")
    headers = await bearer(redis, settings, "billing")
    reply = await api.get("/usage/acme", params={"period": month, "by": "route"}, headers=headers)
    assert reply.status_code == 200
    python = await UsageReader(redis, settings.keyspace()).totals("acme", month, ["route"])
    assert reply.json()["rows"] == python
    top = await api.get("/usage", params={"period": month, "top": "3"}, headers=headers)
    assert [(r["consumer"], r["requests"]) for r in top.json()["rows"]] == [("acme", 3)]
    today = datetime.now(UTC).date()
    days = {"from": str(today - timedelta(days=2)), "to": str(today + timedelta(days=1))}
    ranged = await api.get("/usage/acme", params=days, headers=headers)
    assert [r["requests"] for r in ranged.json()["rows"]] == [3]  # an app without routes
    zoned = await api.get("/usage/acme", params={"period": today.isoformat(), "tz": "UTC"},
                          headers=headers)  # fmt: skip
    assert sum(r["requests"] for r in zoned.json()["rows"]) == 3


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/usage/acme", {"period": "Nov"}, "period"),
        ("/usage/acme", {}, "period"),
        ("/usage/acme", {"period": "2026-11", "by": "colour"}, "by"),
        ("/usage/acme", {"from": "2026-11-01"}, "from"),
        ("/usage/acme", {"from": "2026-11-05", "to": "2026-11-01"}, "--to"),
        ("/usage", {"period": "2026-11", "top": "lots"}, "top"),
        ("/usage", {"period": "2026-11", "top": "\u00b2"}, "top"),  # a digit to str.isdigit
        ("/usage/adjustments", {"period": "*"}, "period"),  # it became a SCAN pattern
        ("/usage/adjustments", {"period": "2026-99"}, "period"),
    ],
)
async def test_bad_parameters_get_a_problem_naming_them(
    api, redis, settings, path: str, params: dict[str, str], parameter: str
) -> None:
    reply = await api.get(path, params=params, headers=await bearer(redis, settings, "billing"))
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["invalid_params"][0]["name"] == parameter


async def test_admins_manage_consumers(api, redis, settings) -> None:
    headers = await bearer(redis, settings, "admin")
    made = await api.put("/consumers/acme", json={"name": "Acme", "tz": "Asia/Kolkata"},
                         headers=headers)  # fmt: skip
    assert made.json()["tz"] == "Asia/Kolkata"
    assert [c["id"] for c in (await api.get("/consumers", headers=headers)).json()] == ["acme"]
    bad = await api.put("/consumers/acme", json={"tz": "Nowhere/Land"}, headers=headers)
    assert bad.status_code == 400
    assert bad.json()["invalid_params"][0]["name"] == "tz"


async def test_admins_manage_keys_and_never_see_a_secret_twice(api, redis, settings) -> None:
    admin, billing = (
        await bearer(redis, settings, "admin"),
        await bearer(redis, settings, "billing"),
    )
    body = {"consumer": "acme", "plan": "pro", "scopes": ["items:read"], "cidrs": ["10.0.0.0/8"]}
    assert (await api.post("/keys", json=body, headers=billing)).status_code == 403
    made = await api.post("/keys", json=body, headers=admin)
    assert made.status_code == 201
    created = made.json()
    assert parse_key(created["key"]) == created["id"]
    assert (created["consumer"], created["plan"], created["scopes"]) == (
        "acme",
        "pro",
        ["items:read"],
    )
    listed = (await api.get("/keys", params={"consumer": "acme"}, headers=admin)).json()
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert "digest" not in listed[0]
    assert (await api.get("/keys", params={"consumer": "globex"}, headers=admin)).json() == []
    rotated = await api.post(f"/keys/{created['id']}/rotate", json={"grace_seconds": 60},
                             headers=admin)  # fmt: skip
    assert rotated.status_code == 200
    assert rotated.json()["key"] != created["key"]
    assert rotated.json()["previous_until"] > 0
    revoked = await api.post(f"/keys/{created['id']}/revoke", headers=admin)
    assert revoked.json()["state"] == "revoked"
    unknown = await api.post("/keys/000000000000/revoke", headers=admin)
    assert (unknown.status_code, unknown.headers["content-type"]) == (
        404,
        "application/problem+json",
    )
    for bad in [{"plan": "x"}, {"consumer": "acme", "cidrs": ["not-a-net"]},
                {"consumer": "acme", "expires": -1}, {"consumer": " a b"}]:  # fmt: skip
        reply = await api.post("/keys", json=bad, headers=admin)
        assert reply.status_code == 400, bad
        assert reply.headers["content-type"] == "application/problem+json"
    spec = (await api.get("/openapi.json")).json()
    assert {"get", "post"} <= set(spec["paths"]["/keys"])


async def test_admins_see_the_deployments_health(api, redis, settings) -> None:
    mw = Meterwall(ok_app, settings=settings)
    await mw(http_scope("/a"), body_receive(), _discard)
    await mw.aclose()
    await redis.hincrby(settings.keyspace().stats(0), "records_dropped", 3)
    admin, billing = (
        await bearer(redis, settings, "admin"),
        await bearer(redis, settings, "billing"),
    )
    assert (await api.get("/health", headers=billing)).status_code == 403
    health = (await api.get("/health", headers=admin)).json()
    assert health["redis"]["eviction_policy"] == "noeviction"
    assert health["counts"]["records_dropped"] == 3
    assert health["shards"] == settings.shards
    assert health["warnings"] == []


async def test_the_admin_api_uses_the_deployments_shard_count(redis, settings) -> None:
    """The admin's own environment may lack MW_SHARDS (16): it reads the count the writers
    recorded in Redis, as the CLI does, else it reads the wrong shard and answers zero."""
    deployed = settings.replace(consumer_header="X-Consumer", shards=64)
    mw = Meterwall(ok_app, settings=deployed)
    for _ in range(3):
        await mw(http_scope("/a", headers=[(b"x-consumer", b"acme")]), body_receive(), _discard)
    assert await mw.aclose()
    admin_settings = settings.replace(records="off")
    assert admin_settings.shards == 16
    app = admin_app(admin_settings, redis=redis)
    token = await AdminTokens(redis, admin_settings.keyspace()).create("bill", "billing")
    month = datetime.now(UTC).strftime("%Y-%m")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        reply = await client.get(
            "/usage/acme", params={"period": month}, headers={"Authorization": f"Bearer {token}"}
        )
    assert reply.status_code == 200
    assert sum(r["requests"] for r in reply.json()["rows"]) == 3


async def test_bodies_of_the_wrong_types_are_refused_not_stored(api, redis, settings) -> None:
    """A number for a consumer was stored and then stopped every flush of the worker that
    met it (its key names ledger fields); a number for a zone answered 500."""
    headers = await bearer(redis, settings, "admin")
    for body in ({"consumer": 123}, {"consumer": ["acme"]}, {"consumer": "acme", "expires": -1},
                 {"consumer": "acme", "expires": 2**62}):  # fmt: skip
        reply = await api.post("/keys", json=body, headers=headers)
        assert reply.status_code == 400, body
        assert reply.headers["content-type"] == "application/problem+json"
    assert await redis.keys(f"{settings.key_prefix}:key:*") == []
    for body in ({"tz": 123}, {"name": ["x"]}):
        reply = await api.put("/consumers/acme", json=body, headers=headers)
        assert reply.status_code == 400, body
    for consumer in ("auth0|5f7c8e", "Acme Corp", "_svc"):  # what requests are counted under
        created = await api.post("/keys", json={"consumer": consumer}, headers=headers)
        assert created.status_code == 201, consumer


async def test_every_answer_is_a_problem_document_also_for_no_route(api, redis, settings) -> None:
    headers = await bearer(redis, settings, "billing")
    for method, path in (("GET", "/nowhere"), ("DELETE", "/usage/acme")):
        reply = await api.request(method, path, headers=headers)
        assert reply.status_code in (404, 405), path
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["status"] == reply.status_code
    assert "GET" in (await api.delete("/usage/acme", headers=headers)).headers["allow"]
    for consumer in ("acme%00", "%20acme", "a" * 129):  # not consumer ids: refused at once
        reply = await api.get(f"/usage/{consumer}", params={"period": "2026-11"}, headers=headers)
        assert reply.status_code == 400
        assert reply.json()["invalid_params"][0]["name"] == "consumer"
