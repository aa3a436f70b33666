"""Rate limits and monthly quotas: exact admissions from leased tokens, answers and headers."""

from __future__ import annotations

import asyncio
import base64
import signal
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from meterwall import Meterwall, Settings
from meterwall.clock import FixedClock
from meterwall.errors import ConfigurationError
from meterwall.limits import LEASE_SCRIPT, Limiter, PathWeights, parse_plans
from meterwall.retention import Auditor
from meterwall.usage import UsageReader
from tests.helpers import command_calls, command_calls_since, serve, stop
from tests.test_access import api_app, make_key

T0 = 1_811_000_000 * 10**9  # 2027-05-22T15:33:20Z, ahead of the real clock: keys expire later


def limited(settings: Settings, plans: str, **more: Any) -> Settings:
    return settings.replace(access="keys", access_rules="/health=public", plans=plans, **more)


async def send(app: Meterwall, key: str, count: int, path: str = "/x") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        return [await client.get(path, headers={"X-API-Key": key}) for _ in range(count)]


def month_quota(settings: Settings, consumer: str, month: str) -> str:
    keyspace = settings.keyspace()
    return keyspace.quota(keyspace.shard_of(consumer), consumer, month)


def test_plans_are_read_and_bad_ones_name_the_setting() -> None:
    plans = parse_plans("free: 10/s burst 20, 1000 requests/month; pro: 120/min, 5 units/month;"
                        " internal: unlimited")  # fmt: skip
    assert (plans["free"].rate, plans["free"].burst, plans["free"].quota) == (10, 20, 1000)
    assert (plans["pro"].rate, plans["pro"].burst, plans["pro"].unit) == (2, 2, "units")
    assert not plans["internal"].limited
    for bad in [
        "free 10/s",
        "free: 10/fortnight",
        "free: 0/s",
        "free: 0 requests/month",
        "a b: 1/s",
    ]:
        with pytest.raises(ConfigurationError) as caught:
            Settings.from_env({"MW_PLANS": bad, "MW_RECORDS": "off"})
        assert caught.value.setting == "MW_PLANS"
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"MW_PLANS": "free: 1/s", "MW_DEFAULT_PLAN": "gold", "MW_RECORDS": "off"})
    assert caught.value.setting == "MW_DEFAULT_PLAN"


def test_path_weights_match_route_templates_before_routing() -> None:
    weights = PathWeights({"/search": 5, "/items/{id}": 2, "/files/{rest:path}": 3, "/health": 0})
    assert [weights(p) for p in ["/search", "/items/7", "/items/7/x", "/files/a/b", "/health",
                                 "/other"]] == [5, 2, 1, 3, 0, 1]  # fmt: skip


async def test_gcra_admits_the_burst_then_exactly_the_rate(redis, settings) -> None:
    clock = FixedClock(T0)
    own = limited(settings, "free: 2/s burst 5", default_plan="free")
    _, key = await make_key(redis, own)
    app = Meterwall(api_app, settings=own, clock=clock)
    async with LifespanManager(app):
        burst = await send(app, key, 8)
        assert [r.status_code for r in burst] == [200] * 5 + [429] * 3
        refused = burst[5]
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == "https://meterwall.dev/problems/rate-limited"
        assert refused.headers["ratelimit-policy"] == '"rate";q=5;w=3'
        assert refused.headers["ratelimit"] == '"rate";r=0;t=1'
        assert burst[0].headers["ratelimit-policy"] == '"rate";q=5;w=3'
        assert app.access is not None
        assert app.access.limiter is not None
        calls = app.access.limiter.lease_calls
        assert [r.status_code for r in await send(app, key, 5)] == [429] * 5
        assert app.access.limiter.lease_calls == calls  # answered from the cache
        admitted = 0
        for _ in range(20):  # 10 s at the rate of 2/s: 20 more, one per half second
            clock.advance(0.5)
            statuses = [r.status_code for r in await send(app, key, 3)]
            admitted += statuses.count(200)
            assert statuses.count(200) == 1
        assert admitted == 20
        clock.advance(60)  # idle: the whole burst again, not more
        assert [r.status_code for r in await send(app, key, 6)] == [200] * 5 + [429]
    rows = await UsageReader(redis, own.keyspace()).totals(
        "acme", datetime.fromtimestamp(T0 / 1e9, UTC).strftime("%Y-%m"), ["status"]
    )
    by_status = {r["status"]: r for r in rows}
    assert by_status[200]["requests"] == 30
    assert by_status[429]["requests"] == 3 + 5 + 40 + 1
    assert by_status[429]["denied"] == by_status[429]["requests"]
    assert by_status[429]["units"] == 0


async def test_a_quota_stops_at_its_limit_and_says_when_it_resets(redis, settings) -> None:
    clock = FixedClock(T0)
    own = limited(settings, "small: 4 units/month", route_weights={"/items/{n}": 3})
    _, key = await make_key(redis, own, plan="small")
    app = Meterwall(api_app, settings=own, clock=clock)
    async with LifespanManager(app):
        first = await send(app, key, 2, "/x")  # 1 unit each
        heavy = await send(app, key, 1, "/items/1")  # 3 units: only 2 left
        last = await send(app, key, 3, "/x")
    assert [r.status_code for r in first + heavy + last] == [200, 200, 429, 200, 200, 429]
    end_of_month = int(datetime(2027, 6, 1, tzinfo=UTC).timestamp())
    assert heavy[0].headers["retry-after"] == str(end_of_month - T0 // 10**9)
    assert heavy[0].json()["type"].endswith("/quota-exceeded")
    assert last[-1].headers["ratelimit"] == f'"quota";r=0;t={end_of_month - T0 // 10**9}'
    assert first[0].headers["ratelimit-policy"] == f'"quota";q=4;w={31 * 86400}'
    quota = await redis.hgetall(month_quota(own, "acme", "2027-05"))
    assert quota == {b"used": b"4"}  # shutdown settled every lease: exactly what was spent
    checks = {c.name: c for c in await Auditor(redis, own.keyspace()).run()}
    assert checks["plaintext"].ok, checks["plaintext"].problems  # no id or key in limit state


async def test_a_5xx_answer_gives_its_units_back(redis, settings) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def broken(request: Any) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=503)

    own = limited(settings, "small: 2 requests/month", default_plan="small")
    _, key = await make_key(redis, own)
    app = Meterwall(Starlette(routes=[Route("/broken", broken)]), settings=own,
                    clock=FixedClock(T0))  # fmt: skip
    async with LifespanManager(app):
        statuses = [r.status_code for r in await send(app, key, 5, "/broken")]
    assert statuses == [503] * 5  # never billable, never counted against the quota
    assert await redis.hget(month_quota(own, "acme", "2027-05"), "used") == b"0"


async def test_limits_follow_the_failure_policy_when_redis_goes(settings) -> None:
    from meterwall.embedded import EmbeddedRedis

    for policy, expected in (("open", 200), ("closed", 503)):
        server = EmbeddedRedis().start()
        try:
            own = limited(settings, "free: 100/s", default_plan="free", redis_url=server.url,
                          access_on_redis_error=policy, flush_interval=60)  # fmt: skip
            client = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(server.url)
            _, key = await make_key(client, own)
            await client.aclose()
            app = Meterwall(api_app, settings=own)
            [before] = await send(app, key, 1)
            assert before.status_code == 200
            assert "ratelimit" in before.headers
            server.stop()
            assert app.access is not None
            assert app.access.limiter is not None
            app.access.limiter._tokens.clear()  # nothing leased: the next request needs Redis
            after = await send(app, key, 2)
            assert [r.status_code for r in after] == [expected] * 2
            assert all(r.headers["meterwall-degraded"] == "access-store-unavailable" for r in after)
            assert "ratelimit" not in after[0].headers
            assert app.access.degraded_decisions == 2
            await app.aclose(timeout=0.5)
        finally:
            server.stop()


async def test_one_request_left_admits_exactly_one_of_50_across_two_processes(
    redis, settings
) -> None:
    own = limited(settings, "q: 1000 requests/month", default_plan="q")
    _, key = await make_key(redis, own)
    month = datetime.now(UTC).strftime("%Y-%m")
    await redis.hset(month_quota(own, "acme", month), "used", 999)
    servers, ports = await serve(served(own), 2)
    try:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(n: int) -> int:
                url = f"http://127.0.0.1:{ports[n % 2]}/echo/{n}"
                return (await client.post(url, headers={"X-API-Key": key})).status_code

            statuses = await asyncio.gather(*(one(n) for n in range(50)))
    finally:
        await stop(servers, signal.SIGTERM)
    assert sorted(statuses) == [200] + [429] * 49
    assert await redis.hgetall(month_quota(own, "acme", month)) == {b"used": b"1000"}


async def test_a_killed_workers_lease_comes_back_after_its_deadline(redis, settings) -> None:
    own = limited(settings, "q: 1000 requests/month", default_plan="q")
    _, key = await make_key(redis, own)
    month = datetime.now(UTC).strftime("%Y-%m")
    quota_key = month_quota(own, "acme", month)
    servers, ports = await serve(served(own), 1)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for n in range(3):
                reply = await client.post(f"http://127.0.0.1:{ports[0]}/echo/{n}",
                                          headers={"X-API-Key": key})  # fmt: skip
                assert reply.status_code == 200
    finally:
        await stop(servers, signal.SIGKILL)  # no shutdown: the lease is never settled
    held = await redis.hgetall(quota_key)
    leased = int(held[b"used"])
    leases = [v.split(b":") for f, v in held.items() if f.startswith(b"l:")]
    reported = sum(int(lease[1]) for lease in leases)
    deadline = max(int(lease[2]) for lease in leases) / 1000
    assert leased >= 3
    assert leases
    early = limiter_at(own, redis, deadline - 1)
    assert not (await early.admit("acme", "", "/echo/1")).reason
    assert int(await redis.hget(quota_key, "used")) == leased + 8  # not reclaimed yet
    await early.aclose()  # settles: 1 spent, 7 back
    assert int(await redis.hget(quota_key, "used")) == leased + 1
    late = limiter_at(own, redis, deadline + 1)
    assert not (await late.admit("acme", "", "/echo/1")).reason
    assert int(await redis.hget(quota_key, "used")) == reported + 1 + 8  # the rest came back
    assert len([f for f in await redis.hkeys(quota_key) if f.startswith(b"l:")]) == 1


def limiter_on_clock(own: Settings, redis: Any) -> tuple[Limiter, FixedClock]:
    """A worker's limiter whose clock the test moves, from ``T0``."""
    clock = FixedClock(T0)
    limiter = Limiter(own.keyspace(), parse_plans(own.plans), default_plan=own.default_plan,
                      clock=clock)  # fmt: skip
    limiter.bind(redis)
    return limiter, clock


def limiter_at(own: Settings, redis: Any, at: float) -> Limiter:
    """Another worker, its clock at wall time ``at`` (the lease script uses that time too)."""
    limiter = Limiter(own.keyspace(), parse_plans(own.plans), default_plan=own.default_plan,
                      clock=FixedClock(int(at * 1e9)))  # fmt: skip
    limiter.bind(redis)
    return limiter


def served(own: Settings) -> dict[str, str]:
    assert own.pseudonym_secret is not None
    return {"MW_REDIS_URL": own.redis_url, "MW_KEY_PREFIX": own.key_prefix,
            "MW_RECORD_PUBLIC_KEY": own.record_public_key or "", "MW_ACCESS": "keys",
            "MW_PSEUDONYM_SECRET": base64.b64encode(own.pseudonym_secret.reveal()).decode(),
            "MW_PLANS": own.plans, "MW_DEFAULT_PLAN": own.default_plan}  # fmt: skip


async def test_rate_tokens_are_renewed_before_they_lapse_so_no_request_waits(
    redis, settings
) -> None:
    """Leased rate tokens lapse a second after their lease; a busy consumer's are renewed in
    the background half a second before, so a request never finds them lapsed and waits a
    Redis round trip (once a second per consumer: +200 ms at p99 behind a slow Redis)."""
    own = limited(settings, "busy: 1000/s burst 1000", default_plan="busy")
    limiter, clock = limiter_on_clock(own, redis)

    assert not (await limiter.admit("acme", "", "/x")).reason  # the first lease is awaited
    for _ in range(10):  # 3 s of traffic in steps of 0.3 s, past three lease periods
        clock.advance(0.3)
        assert not at_once(limiter.admit("acme", "", "/x")).reason
        tokens = limiter._tokens["acme"]
        if tokens.pending is not None:
            await tokens.pending  # the renewal, in the background
    assert limiter.lease_calls >= 4  # renewed about every half second


async def test_quota_leases_are_renewed_before_they_lapse_so_no_request_waits(
    redis, settings
) -> None:
    """The same for quota leases (they live QUOTA_LEASE_S): renewed ahead, topped up."""
    own = limited(settings, "monthly: 1000000 requests/month", default_plan="monthly")
    limiter, clock = limiter_on_clock(own, redis)
    assert not (await limiter.admit("acme", "", "/x")).reason  # the first lease is awaited
    for _ in range(30):  # 45 s of traffic, past four lease periods
        clock.advance(1.5)
        assert not at_once(limiter.admit("acme", "", "/x")).reason
        tokens = limiter._tokens["acme"]
        if tokens.pending is not None:
            await tokens.pending
    quota = month_quota(own, "acme", datetime.fromtimestamp(T0 / 1e9, UTC).strftime("%Y-%m"))
    leases = [f for f in await redis.hkeys(quota) if f.startswith(b"l:")]
    assert 1 <= len(leases) <= 2  # lapsed leases were settled, not piled up


def at_once(admitting: Any) -> Any:
    """The verdict, if ``admit`` answered without suspending (no Redis round trip)."""
    try:
        admitting.send(None)
    except StopIteration as done:
        return done.value
    admitting.close()
    raise AssertionError("the request waited for Redis")


async def test_after_an_idle_spell_the_lease_size_is_halved_not_started_again(
    redis, settings
) -> None:
    """A consumer back at its old pace after a pause waits for one lease, not for one per
    doubling from the first size (six round trips behind a slow Redis)."""
    own = limited(settings, "busy: 100000/s burst 100000", default_plan="busy")
    limiter, clock = limiter_on_clock(own, redis)
    for _ in range(2000):  # 2 s at 1,000 requests/s: the lease size doubles up
        assert not (await limiter.admit("acme", "", "/x")).reason
        clock.advance(0.001)
    tokens = limiter._tokens["acme"]
    busy = tokens.want
    assert busy >= 256
    clock.advance(9)  # two idle periods of 4 s
    assert not (await limiter.admit("acme", "", "/x")).reason
    assert tokens.want == busy // 4


LEASE_NOW = T0 // 1_000_000  # ms: passed in, as workers with an injected clock do


def lease_keys(settings: Settings) -> list[str]:
    """A rate key and a quota hash of the test's own, for the lease script called straight."""
    return [f"{settings.key_prefix}:rate", f"{settings.key_prefix}:quota"]


async def lease(redis: Any, keys: list[str], *args: Any) -> list[int]:
    reply = await redis.eval(LEASE_SCRIPT, 2, *keys, *args)
    return [int(v) for v in reply]


async def test_a_lease_the_rate_refuses_takes_no_quota_and_costs_few_commands(
    redis, settings
) -> None:
    """The lease script straight: a quota lease the rate then refuses is never written, and a
    lease with a settlement reads the quota hash once and writes it once."""
    keys, now = lease_keys(settings), LEASE_NOW
    #                       now, interval, burst, rate want/return, quota, want/return, lease, ttl
    first = await lease(redis, keys, now, 1000, 1, 1, 0, 100, 5, 0, "a", 10_000, 3600, 4, "x", 0, 0)
    assert first == [1, 0, 1000, 5, 95, 0]  # rate 1 (none left, retry in 1 s), quota 5 of 100
    refused = await lease(redis, keys, now, 1000, 1, 1, 0, 100, 5, 0, "b", 10_000, 3600, 4,
                          "a", 2, 0)  # fmt: skip
    assert (refused[0], refused[5]) == (0, 1)  # refused by the rate
    assert (refused[3], refused[4]) == (0, 95)  # and no quota taken for it
    held = await redis.hgetall(keys[1])
    assert held == {b"used": b"5", b"l:a": f"5:2:{now + 10_000}".encode()}  # "a" reported 2

    before = await command_calls(redis)
    settled = await lease(redis, keys, now + 2000, 1000, 1, 1, 0, 100, 5, 0, "c", 10_000, 3600,
                          4, "a", 3, 1)  # fmt: skip
    spent = await command_calls_since(redis, before)  # before the reads below
    assert settled == [1, 0, 1000, 5, 92, 0]  # "a" settled at 3 spent: 2 back, then 5 more
    assert await redis.hgetall(keys[1]) == {b"used": b"8",
                                            b"l:c": f"5:0:{now + 12_000}".encode()}  # fmt: skip
    assert {k: v for k, v in spent.items() if k not in ("eval", "info")} == {
        "hgetall": 1,
        "hdel": 1,
        "hset": 1,
        "get": 1,
        "set": 1,
    }  # no EXPIRE: the quota hash got its expiry when it was made
    assert 0 < await redis.ttl(keys[1]) <= 3600


async def test_thousands_of_expired_leases_are_reclaimed_in_one_lease(redis, settings) -> None:
    """A fleet killed at once leaves a lease per worker and renewal: 9,000 of them are more
    fields than one Lua ``unpack`` takes; they are all reclaimed and the hash shrinks."""
    keys, now = lease_keys(settings), LEASE_NOW
    leases = {f"l:w{n}": f"3:1:{now - 1}" for n in range(9000)}  # each: 3 granted, 1 spent
    await redis.hset(keys[1], mapping={"used": 27_000, **leases})
    granted = await lease(redis, keys, now, 0, 0, 0, 0, 100_000, 5, 0, "new", 10_000, 3600, 4)
    assert granted == [0, -1, 0, 5, 100_000 - 9000 - 5, 0]  # 2 of each came back
    assert await redis.hgetall(keys[1]) == {b"used": b"9005",
                                            b"l:new": f"5:0:{now + 10_000}".encode()}  # fmt: skip


async def test_a_lease_settled_after_a_report_is_gone_and_a_first_lease_restores_the_expiry(
    redis, settings
) -> None:
    keys, now = lease_keys(settings), LEASE_NOW
    await lease(redis, keys, now, 0, 0, 0, 0, 100, 10, 0, "a", 10_000, 3600, 4)
    settled = await lease(redis, keys, now, 0, 0, 0, 0, 100, 0, 0, "b", 10_000, 3600, 4,
                          "a", 2, 0, "a", 3, 1)  # fmt: skip
    assert settled[4] == 97  # 3 spent, 7 back
    assert await redis.hgetall(keys[1]) == {b"used": b"3"}  # and its field not written again
    await redis.persist(keys[1])  # restored without TTLs, say
    await lease(redis, keys, now, 0, 0, 0, 0, 100, 1, 0, "c", 10_000, 3600, 4)  # a first lease
    assert 0 < await redis.ttl(keys[1]) <= 3600  # the expiry is back


async def test_shutdown_with_redis_gone_gives_up_handing_back_after_one_failure(
    settings, caplog
) -> None:
    """One timeout per consumer would outlast a process manager's grace period (and the
    flush comes first): after one failure the leases are left to Redis's deadline."""
    from meterwall.embedded import EmbeddedRedis

    server = EmbeddedRedis().start()
    try:
        own = limited(settings, "p: 100/s, 100000 requests/month", default_plan="p",
                      redis_url=server.url, records="off", flush_interval=60)  # fmt: skip
        client = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(server.url)
        keys = [(await make_key(client, own, consumer=f"c{i}"))[1] for i in range(6)]
        await client.aclose()
        app = Meterwall(api_app, settings=own)
        for key in keys:
            [reply] = await send(app, key, 1)
            assert reply.status_code == 200
        assert app.access is not None
        assert app.access.limiter is not None
        assert len(app.access.limiter._tokens) == 6
        server.stop()
        with caplog.at_level("WARNING", logger="meterwall"):
            await app.aclose(timeout=0.5)
        handing_back = [r for r in caplog.records if "give leased tokens back" in r.message]
        assert len(handing_back) == 1, [r.message for r in handing_back]
        assert "6 consumer(s)" in handing_back[0].getMessage()
    finally:
        server.stop()


def two_workers(redis: Any, settings: Settings, clock: FixedClock) -> tuple[Limiter, Limiter]:
    """Two workers' limiters of a plan of 40 requests a month, on one clock."""
    own = limited(settings, "q: 40 requests/month", default_plan="q")

    def worker() -> Limiter:
        limiter = Limiter(own.keyspace(), parse_plans(own.plans), default_plan="q", clock=clock)
        limiter.bind(redis)
        return limiter

    return worker(), worker()


async def test_a_quota_is_not_overshot_when_a_live_worker_goes_quiet(redis, settings) -> None:
    """Worker A leased 8 tokens and spent 1 (reported with its next lease call, which never
    comes: the consumer's traffic moved to worker B). A settles the lease before it lapses;
    left to lapse, Redis would reclaim it as if nothing was spent, and admit one too many."""
    clock = FixedClock(T0)
    a, b = two_workers(redis, settings, clock)
    admitted = not (await a.admit("acme", "", "/x")).reason
    assert a._tokens["acme"].quota_held(clock.now_ns()) == 7
    assert a._settler is not None  # settling quiet consumers every second from here on
    clock.advance(8.5)  # the lease lapses within the 2 s its renewal looks ahead
    await a.settle_quiet()  # what the settler does on its next round
    if a._tokens["acme"].pending is not None:
        await a._tokens["acme"].pending
    assert a._tokens["acme"].leases == []
    clock.advance(11.5)  # the consumer's next requests reach worker B
    for _ in range(60):
        admitted += not (await b.admit("acme", "", "/x")).reason
        if b._tokens["acme"].pending is not None:
            await b._tokens["acme"].pending
    assert admitted == 40
    await a.aclose()
    await b.aclose()
    assert a._settler is None


async def test_a_request_during_a_settlement_waits_for_it(redis, settings) -> None:
    """The settlement reports every lease final with what was spent when it was sent: a token
    spent from one of them meanwhile would go back to Redis unspent (and be admitted twice)."""
    clock = FixedClock(T0)
    a, b = two_workers(redis, settings, clock)
    admitted = not (await a.admit("acme", "", "/x")).reason
    clock.advance(8.5)
    await a.settle_quiet()
    assert a._tokens["acme"].settling
    admitted += not (await a.admit("acme", "", "/x")).reason  # while the settlement is sent
    if a._tokens["acme"].pending is not None:
        await a._tokens["acme"].pending
    clock.advance(8.5)  # A's new lease (leased by that request) goes quiet too
    await a.settle_quiet()
    if a._tokens["acme"].pending is not None:
        await a._tokens["acme"].pending
    clock.advance(3)
    for _ in range(80):
        admitted += not (await b.admit("acme", "", "/x")).reason
        if b._tokens["acme"].pending is not None:
            await b._tokens["acme"].pending
    await a.aclose()
    await b.aclose()
    assert admitted == 40


def test_the_settler_of_a_closed_loop_does_not_break_a_later_aclose(settings) -> None:
    """The flusher may be closed from another loop than the one that served; so may the
    limiter, whose settler task belongs to the serving loop."""
    import redis.asyncio as aioredis

    own = limited(settings, "q: 40 requests/month", default_plan="q")
    limiter = Limiter(own.keyspace(), parse_plans(own.plans), default_plan="q")
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        client = aioredis.Redis.from_url(own.redis_url)
        limiter.bind(client)
        assert not (await limiter.admit("acme", "", "/x")).reason
        assert limiter._settler is not None
        await client.aclose()

    loop.run_until_complete(serve())
    loop.close()  # the serving loop ends without cancelling its tasks

    async def shutdown() -> None:
        client = aioredis.Redis.from_url(own.redis_url)
        limiter.bind(client)
        await limiter.aclose()  # gives the lease back from this loop
        await client.aclose()

    asyncio.run(shutdown())
    assert limiter._settler is None
    assert limiter._tokens == {}


def test_a_settlement_left_in_flight_by_a_closed_loop_does_not_block_the_consumer(
    settings,
) -> None:
    """A loop closed while its settlement waited for Redis: the next loop's requests for that
    consumer must not wait on (or fail at) a task of the dead loop."""
    import redis.asyncio as aioredis

    from tests.faults import FaultProxy, Faults

    own = limited(settings, "q: 40 requests/month", default_plan="q")
    clock = FixedClock(T0)
    limiter = Limiter(own.keyspace(), parse_plans(own.plans), default_plan="q", clock=clock)
    port = int(own.redis_url.rsplit(":", 1)[1].split("/")[0])
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        faults = Faults()
        async with FaultProxy(port, faults) as proxy:
            client = aioredis.Redis(port=proxy.port, socket_timeout=30)
            limiter.bind(client)
            assert not (await limiter.admit("acme", "", "/x")).reason
            clock.advance(8.5)
            faults.mute_replies = True  # the settlement reaches Redis; its answer never comes
            await limiter.settle_quiet()
            await asyncio.sleep(0.05)
            assert limiter._tokens["acme"].settling

    loop.run_until_complete(serve())
    loop.close()  # with the settlement still in flight

    async def serve_again() -> None:
        client = aioredis.Redis.from_url(own.redis_url)
        limiter.bind(client)
        for _ in range(7):  # not from the leases that settlement handed back
            verdict = await asyncio.wait_for(limiter.admit("acme", "", "/x"), 10)
            assert not verdict.reason
        await limiter.aclose()
        month = datetime.fromtimestamp(T0 // 10**9, UTC).strftime("%Y-%m")
        used = int(await client.hget(month_quota(own, "acme", month), "used"))
        await client.aclose()
        assert used == 8  # every admitted request is known to Redis

    asyncio.run(serve_again())
