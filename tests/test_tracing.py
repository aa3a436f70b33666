"""Tracing by IP, subnet, consumer and key inside the window; the audit log of every search."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from meterwall import Meterwall, Settings
from meterwall.auditlog import AuditLog
from meterwall.clock import FixedClock
from meterwall.errors import ConfigurationError, RetentionExceeded
from meterwall.keyspace import index_member, unpack_positions
from meterwall.tracing import TraceQuery, Tracer
from tests.test_access import api_app, make_key
from tests.test_cli import meterwall
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope

NS = 10**9
# Two hours ahead of the real clock, on an hour boundary: records land on both sides of it.
BOUNDARY = (int(time.time()) // 3600 + 2) * 3600


async def send(app: Meterwall, clock: FixedClock, at: int, ip: str, key: str | None,
               path: str = "/x", count: int = 1) -> None:  # fmt: skip
    clock.set(at * NS)
    headers = [(b"host", b"api.test")] + ([(b"x-api-key", key.encode())] if key else [])
    for _ in range(count):
        scope = http_scope(path, headers=headers, client=(ip, 5000))
        await app(scope, body_receive(), _discard)
        clock.advance(0.001)


@pytest.fixture
async def traffic(redis, settings: Settings) -> dict[str, Any]:
    """Requests from several addresses, networks and keys, across an epoch boundary."""
    own = settings.replace(access="keys", access_rules="/health=public")
    first, key1 = await make_key(redis, own, consumer="acme")
    second, key2 = await make_key(redis, own, consumer="globex")
    clock = FixedClock((BOUNDARY - 30) * NS)
    app = Meterwall(api_app, settings=own, clock=clock)
    await send(app, clock, BOUNDARY - 30, "203.0.113.7", key1, count=3)
    await send(app, clock, BOUNDARY - 20, "203.0.113.9", key2, count=2)
    await send(app, clock, BOUNDARY - 10, "198.51.100.4", key1)
    await send(app, clock, BOUNDARY + 10, "::ffff:203.0.113.7", key1)  # the same client
    await send(app, clock, BOUNDARY + 20, "203.0.113.7", None, "/items/1")  # 401, no key
    await send(app, clock, BOUNDARY + 30, "203.0.113.7", key1, "/items/1", count=2)
    assert await app.aclose()
    return {"settings": own, "clock": clock, "acme_key": first.id, "globex_key": second.id}


async def test_trace_by_ip_finds_exactly_that_clients_requests_across_hours(
    redis, traffic, private_key
) -> None:
    tracer = Tracer(redis, traffic["settings"], private_key, clock=traffic["clock"], actor="t")
    found = await tracer.trace(TraceQuery(ip="203.0.113.7"))
    times = [r["time_ns"] for r in found.records]
    assert len(found.records) == 3 + 1 + 1 + 2
    assert times == sorted(times)
    assert {r["client"]["ip"] for r in found.records} == {"203.0.113.7", "::ffff:203.0.113.7"}
    assert {t // NS // 3600 for t in times} == {BOUNDARY // 3600 - 1, BOUNDARY // 3600}
    summary = found.summary()
    assert summary["statuses"] == {"200": 6, "401": 1}
    assert summary["denials"] == {"missing-key": 1}
    assert summary["routes"] == ["/items/{n}", "/x"]  # a refusal is counted by its route too


async def test_subnet_consumer_key_and_filters(redis, traffic, private_key) -> None:
    tracer = Tracer(redis, traffic["settings"], private_key, clock=traffic["clock"], actor="t")

    async def count(**query: Any) -> int:
        return len((await tracer.trace(TraceQuery(**query))).records)

    assert await count(subnet="203.0.113.0/24") == 7 + 2
    assert await count(subnet="203.0.113.8/29") == 2  # narrower than the /24 index: filtered
    assert await count(subnet="203.0.0.0/16") == 9
    assert await count(subnet="198.51.100.0/24") == 1
    assert await count(consumer="globex") == 2
    assert await count(key_id=traffic["acme_key"]) == 3 + 1 + 1 + 2
    assert await count(ip="203.0.113.7", status="4xx") == 1
    assert await count(ip="203.0.113.7", route="/items/{n}", status="200") == 2
    assert await count(consumer="acme", since_ns=BOUNDARY * NS) == 3
    with pytest.raises(ConfigurationError) as caught:
        await count(subnet="10.0.0.0/8")  # 65,536 networks
    assert caught.value.setting == "subnet"
    with pytest.raises(ConfigurationError):
        await count(route="/x")  # a filter alone selects nothing


async def test_nothing_older_than_the_window_and_every_search_is_audited(
    redis, traffic, private_key
) -> None:
    own: Settings = traffic["settings"]
    later = FixedClock(traffic["clock"].now_ns() + int(own.raw_retention) * NS - 15 * NS)
    tracer = Tracer(redis, own, private_key, clock=later, actor="token:sec-bot")
    found = await tracer.trace(TraceQuery(ip="203.0.113.7"))  # only the last 15 s are in it
    assert [r["status"] for r in found.records] == [401, 200, 200]
    with pytest.raises(RetentionExceeded):
        await tracer.trace(TraceQuery(ip="203.0.113.7", since_ns=(BOUNDARY - 30) * NS))
    await tracer.trace(TraceQuery(subnet="203.0.113.0/24", status="5xx"))
    entries = await AuditLog(redis, own).entries()
    assert [(e["actor"], e["action"], e["opened"]) for e in entries] == [
        ("token:sec-bot", "trace", 3), ("token:sec-bot", "trace", 0),
    ]  # fmt: skip
    assert entries[0]["query"]["ip"].startswith("ip~")
    assert entries[1]["query"]["subnet"].startswith("net~")
    assert "203.0.113" not in json.dumps(entries)


async def test_the_cli_traces_with_the_private_key_and_refuses_without(
    redis, traffic, keypair, tmp_path: Path
) -> None:
    own: Settings = traffic["settings"]
    assert own.pseudonym_secret is not None
    env = {"MW_REDIS_URL": own.redis_url, "MW_KEY_PREFIX": own.key_prefix,
           "MW_PSEUDONYM_SECRET": base64.b64encode(own.pseudonym_secret.reveal()).decode(),
           "MW_RECORD_PUBLIC_KEY": own.record_public_key or ""}  # fmt: skip
    writer_side = meterwall("trace", "--ip", "203.0.113.7", env=env)
    assert writer_side.returncode == 2
    assert writer_side.stderr.count("\n") == 1
    assert "MW_RECORD_PRIVATE_KEY_FILE" in writer_side.stderr
    (tmp_path / "reader.pem").write_bytes(keypair[0])
    env["MW_RECORD_PRIVATE_KEY_FILE"] = str(tmp_path / "reader.pem")
    # the CLI reads the real clock; the records are two hours ahead of it
    ahead = ["--to", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(BOUNDARY + 3600))]
    done = meterwall("trace", "--consumer", "globex", "--format", "jsonl", *ahead, env=env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["client"]["ip"] for r in lines] == ["203.0.113.9"] * 2
    table = meterwall("trace", "--ip", "198.51.100.4", *ahead, env=env)
    assert table.returncode == 0, table.stderr
    assert "trace: 1 requests" in table.stdout
    bad = meterwall("trace", "--ip", "not-an-ip", env=env)
    assert (bad.returncode, bad.stderr.count("\n")) == (2, 1)
    log = meterwall("audit-log", "--format", "json", env=env)
    assert [e["action"] for e in json.loads(log.stdout)] == ["trace", "trace"]
    assert all(e["actor"].startswith("os:") for e in json.loads(log.stdout))


async def test_a_client_repeated_in_a_flush_costs_one_index_member_per_identifier(
    redis, settings, private_key
) -> None:
    own = settings.replace(access="keys")
    _, key = await make_key(redis, own, consumer="acme")
    clock = FixedClock((BOUNDARY - 100) * NS)
    app = Meterwall(api_app, settings=own, clock=clock)
    await send(app, clock, BOUNDARY - 100, "203.0.113.7", key, count=40)
    await send(app, clock, BOUNDARY - 90, "198.51.100.4", key, count=3)
    assert await app.aclose()  # one flush: one stored group
    [index] = [k async for k in redis.scan_iter(match=f"{own.key_prefix}:*:ix:*")]
    members = await redis.zrange(index, 0, -1)
    # Address and network of each client, the consumer and the key: 6 members for 43 records.
    assert len(members) == 6
    named = sorted(len(unpack_positions(index_member(m)[2])) for m in members)
    assert named == [3, 3, 40, 40, 43, 43]
    tracer = Tracer(redis, own, private_key, clock=clock, actor="t")
    found = await tracer.trace(TraceQuery(ip="203.0.113.7"))
    assert len(found.records) == 40
    assert {r["client"]["ip"] for r in found.records} == {"203.0.113.7"}
    assert len({r["id"] for r in found.records}) == 40
    assert len((await tracer.trace(TraceQuery(consumer="acme"))).records) == 43
    # A member no writer makes names nothing; the audit's index check reports it (below).
    await redis.zadd(index, {b"i" + bytes(16) + b"\xff": 0})
    assert len((await tracer.trace(TraceQuery(consumer="acme"))).records) == 43


def test_index_members_refuse_what_they_cannot_parse() -> None:
    member = b"c" + bytes(range(16)) + b"\x03" + b"1-0" + b"\x00\x02\x01\x00"
    assert index_member(member) == (member[:17], b"1-0", b"\x00\x02\x01\x00")
    assert unpack_positions(index_member(member)[2]) == (2, 256)
    for broken in (member[:17], member[:21], member + b"\x00", b"c" + bytes(16) + b"\x09" + b"1-0"):
        with pytest.raises(ValueError):
            index_member(broken)


async def test_a_malformed_stored_query_never_matches_other_fields(traffic) -> None:
    record = {"time_ns": 5, "client": {"ip": None}, "consumer": None, "key_id": None,
              "route": "/x", "status": 200}  # fmt: skip
    assert not TraceQuery(ip="203.0.113.7").matches(record, 0, 10)
    assert not TraceQuery(subnet="203.0.113.0/24").matches(record, 0, 10)
    assert TraceQuery(consumer=None, route="/x", ip=None, key_id="k").matches(
        {**record, "key_id": "k"}, 0, 10
    )


async def test_the_admin_api_traces_for_the_security_role_only(redis, traffic, private_key) -> None:
    import httpx

    from meterwall.admin import admin_app
    from tests.test_admin import bearer

    own: Settings = traffic["settings"]
    security = await bearer(redis, own, "security")
    admin = await bearer(redis, own, "admin")
    for key, expected in ((private_key, 200), (None, 503)):
        app = admin_app(own, redis=redis, private_key=key)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as api:
            reply = await api.get("/trace", params={"subnet": "203.0.113.8/29"}, headers=security)
            assert reply.status_code == expected
            refused = await api.get("/trace", params={"ip": "203.0.113.9"}, headers=admin)
            assert refused.status_code == 403
            bad = await api.get("/trace", params={"ip": "x"}, headers=security)
            assert bad.status_code == (400 if key is not None else 503)
    app = admin_app(own, redis=redis, private_key=private_key)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://admin") as api:  # fmt: skip
        ahead = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(BOUNDARY + 3600))
        params = {"consumer": "globex", "to": ahead}
        found = (await api.get("/trace", params=params, headers=security)).json()
    assert [r["client"]["ip"] for r in found["records"]] == ["203.0.113.9"] * 2
    assert found["summary"]["requests"] == 2
    entries = await AuditLog(redis, own).entries()
    assert [e["actor"] for e in entries] == ["token:security-bot"] * 2  # failed ones: none


async def one_record_from(address: str, redis: Any, settings: Settings, private_key: Any) -> Tracer:
    """One request's record from ``address``, and a tracer to find it with."""
    app = Meterwall(ok_app, settings=settings)
    await app(http_scope("/x", client=(address, 5000)), body_receive(), _discard)
    assert await app.aclose()
    return Tracer(redis, settings, private_key, actor="t")


async def test_a_subnet_written_ipv4_mapped_is_the_ipv4_network(
    redis, settings, private_key
) -> None:
    tracer = await one_record_from("203.0.113.7", redis, settings, private_key)
    for subnet in ("203.0.113.0/24", "::ffff:203.0.113.0/120", "::ffff:203.0.113.0/124"):
        found = await tracer.trace(TraceQuery(subnet=subnet))
        assert [r["client"]["ip"] for r in found.records] == ["203.0.113.7"], subnet


async def test_the_audit_log_command_lists_every_entry_past_the_first_thousand(
    redis, settings
) -> None:
    log = AuditLog(redis, settings)
    for i in range(1001):
        await log.append("os:alice", "trace", {"consumer": f"c{i}"}, 0)
    await log.append("os:mallory", "export", {"consumer": "victim"}, 42)
    assert settings.pseudonym_secret is not None
    env = {
        "MW_REDIS_URL": settings.redis_url,
        "MW_KEY_PREFIX": settings.key_prefix,
        "MW_PSEUDONYM_SECRET": base64.b64encode(settings.pseudonym_secret.reveal()).decode(),
    }
    done = meterwall("audit-log", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    actors = [e["actor"] for e in json.loads(done.stdout)]
    assert (len(actors), actors[-1]) == (1002, "os:mallory")
    assert len(await log.entries(count=10)) == 10


async def test_with_a_short_retention_a_slice_never_straddles_an_hour(
    redis, settings, private_key
) -> None:
    """Index entries are keyed by the record's own hour and looked up by the slice's: a 14-minute
    retention used to give 210 s slices, and records in one that began in the previous hour
    could be neither traced nor erased by address."""
    from meterwall.keyspace import Keyspace
    from meterwall.subjects import SubjectRights

    assert all(3600 % Keyspace("mw", 1, r).slice_seconds == 0 for r in range(1, 86401, 7))
    own = settings.replace(raw_retention=840.0)
    keyspace = own.keyspace()
    assert keyspace.slice_seconds == 200
    at = (int(time.time()) // 3600 + 2) * 3600 + 2  # just after an hour begins
    clock = FixedClock(at * NS)
    app = Meterwall(ok_app, settings=own, clock=clock)
    await app(http_scope("/x", client=("203.0.113.7", 5000)), body_receive(), _discard)
    assert await app.aclose()
    clock.set((at + 5) * NS)
    found = await Tracer(redis, own, private_key, clock=clock, actor="t").trace(
        TraceQuery(ip="203.0.113.7")
    )
    assert [r["client"]["ip"] for r in found.records] == ["203.0.113.7"]
    receipt = await SubjectRights(redis, own, clock=clock, actor="t").erase(ip="203.0.113.7")
    assert receipt["records_erased"] == 1


async def test_a_far_end_of_the_range_is_cut_where_no_record_can_lie(
    redis, settings, private_key
) -> None:
    """`trace --to 9999-12-31` used to build a lookup for every hour up to then."""
    tracer = await one_record_from("203.0.113.7", redis, settings, private_key)
    query = TraceQuery(ip="203.0.113.7", until_ns=253402214400 * NS)  # 9999-12-31
    found = await asyncio.wait_for(tracer.trace(query), 10)
    assert [r["client"]["ip"] for r in found.records] == ["203.0.113.7"]


async def test_a_window_entirely_further_ahead_than_any_record_is_empty(
    redis, settings, private_key
) -> None:
    tracer = await one_record_from("203.0.113.7", redis, settings, private_key)
    now = time.time_ns()
    found = await tracer.trace(TraceQuery(ip="203.0.113.7", since_ns=now - 3600 * NS))
    assert len(found.records) == 1
    ahead = TraceQuery(
        ip="203.0.113.7", since_ns=now + 3 * 86400 * NS, until_ns=now + 4 * 86400 * NS
    )
    assert (await tracer.trace(ahead)).records == []
