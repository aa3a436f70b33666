"""meterwall_webhook: signed, idempotent deliveries to a real local aiohttp server.

The receiver below is what a billing endpoint should do: verify the signature over the raw body,
check that the ``Idempotency-Key`` header is the signed ``id``, and store each key once. It can be
told to answer 503, or to store a report and then drop the connection before answering (the
case where only idempotency keeps a retry from billing twice). Tests read what it received from
its own records, never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import meterwall_webhook
import pytest
from aiohttp import web
from meterwall_webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    DeliveryFailed,
    WebhookExporter,
    WebhookSink,
    closed_report,
    delivery_status,
    idempotency_key,
    plugin,
    sign,
    state_key,
    verify,
)

from meterwall import FixedClock, Meterwall
from meterwall.errors import ConfigurationError
from meterwall.periods import close_period
from meterwall.plugins import UsageSink, describe, load
from meterwall.retention import Auditor
from tests.test_cli import meterwall
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope

SECRET = "a-webhook-signing-secret-of-32+-bytes"
FAST = {"base_delay": 0.002, "max_delay": 0.01, "timeout": 5.0}


# --- a deduplicating receiver --------------------------------------------------------------------


@dataclass
class Seen:
    key: str | None
    verified: bool
    duplicate: bool
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    secret: str
    url: str = ""
    fail_next: int = 0  # answer 503 to this many requests
    fail_status: int = 503
    drop_next: int = 0  # store, then drop the connection without answering
    seen: list[Seen] = field(default_factory=list)
    stored: dict[str, Any] = field(default_factory=dict)  # idempotency key -> document

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = request.headers.get(IDEMPOTENCY_HEADER)
        verified = verify(self.secret, request.headers.get(SIGNATURE_HEADER), body)
        seen = Seen(key, verified, False, body, dict(request.headers))
        self.seen.append(seen)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=self.fail_status)
        if not verified:
            return web.Response(status=401)
        document = json.loads(body)
        if key is None or document["id"] != key:  # the header is not signed; the body's id is
            return web.Response(status=400)
        seen.duplicate = key in self.stored
        self.stored.setdefault(key, document)
        if self.drop_next > 0:
            self.drop_next -= 1
            assert request.transport is not None
            request.transport.close()  # the report is stored, the sender never hears so
            raise ConnectionResetError("dropped on purpose")
        return web.json_response({"duplicate": seen.duplicate})

    @property
    def unique(self) -> int:
        return len(self.stored)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver(SECRET)
    app = web.Application()
    app.router.add_post("/usage", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/usage"
    try:
        yield state
    finally:
        await runner.cleanup()


# --- usage in Redis: a closed month --------------------------------------------------------------


def past_month() -> str:
    """A month that ended weeks ago, whatever today is."""
    return (date.today().replace(day=1) - timedelta(days=20)).strftime("%Y-%m")


async def meter(settings: Any, month: str, requests: dict[str, int]) -> None:
    """Count requests of each consumer on the 15th of ``month`` (UTC) through meterwall."""
    day = datetime.fromisoformat(f"{month}-15T12:00:00").replace(tzinfo=UTC)
    clock = FixedClock(int(day.timestamp() * 1e9))
    mw = Meterwall(ok_app, settings=settings.replace(consumer_header="X-Consumer"), clock=clock)
    for consumer, count in requests.items():
        for n in range(count):
            path = "/items" if n % 2 == 0 else "/orders"
            headers = [(b"x-consumer", consumer.encode())]
            await mw(http_scope(path, headers=headers), body_receive(), _discard)
    await mw.aclose()


async def closed_month(redis: Any, settings: Any, requests: dict[str, int]) -> str:
    month = past_month()
    await meter(settings, month, requests)
    report = await close_period(redis, settings.keyspace(), month, grace_s=0)
    assert sorted(report.closed) == sorted(requests)
    return month


def sink(url: str, **options: Any) -> WebhookSink:
    return WebhookSink(url, SECRET, **{**FAST, **options})


# --- signatures ----------------------------------------------------------------------------------


def test_a_signature_verifies_and_a_tampered_body_or_an_old_timestamp_does_not() -> None:
    body = b'{"id":"k","rows":[]}'
    now = 1_800_000_000
    header = sign(SECRET, now, body)
    assert header.startswith(f"t={now},v1=")
    assert verify(SECRET, header, body, now=now)
    assert verify(SECRET, header, body, now=now + 300)  # the edge of the window
    assert not verify(SECRET, header, body + b" ", now=now)  # tampered body
    assert not verify(SECRET, header, body, now=now + 301)  # replayed too late
    assert not verify(SECRET, header, body, now=now - 301)  # from the future: a broken clock
    assert not verify(SECRET, header, body, now=now + 30, window=10)
    assert not verify("another-secret-of-at-least-32-bytes!!", header, body, now=now)
    moved = header.replace(f"t={now}", f"t={now + 100}")  # a moved timestamp breaks the MAC
    assert not verify(SECRET, moved, body, now=now + 100)


@pytest.mark.parametrize(
    "header",
    [None, "", "v1=" + "0" * 64, "t=1800000000", "t=1800000000,t=1800000000,v1=00",
     "t=-5,v1=00", "t=١٨,v1=00", "garbage", "t=1800000000,v1", "t=1800000000," + "v1=0," * 300],
)  # fmt: skip
def test_malformed_signature_headers_are_false_never_an_exception(header: str | None) -> None:
    assert not verify(SECRET, header, b"{}", now=1_800_000_000)


def test_a_rotation_may_sign_with_two_secrets() -> None:
    old, new = SECRET, "the-next-webhook-secret-of-32-bytes!!"
    body, now = b"{}", 1_800_000_000
    both = sign(old, now, body) + "," + sign(new, now, body).split(",")[1]
    assert verify(old, both, body, now=now)
    assert verify(new, both, body, now=now)


def test_the_idempotency_key_is_the_hash_of_consumer_period_and_checksum() -> None:
    import hashlib

    key = idempotency_key("acme", "2026-10", "ab" * 32)
    assert key == hashlib.sha256(f"acme|2026-10|{'ab' * 32}".encode()).hexdigest()
    assert idempotency_key("acme", "2026-10", "ab" * 32, kind="running") != key


# --- configuration -------------------------------------------------------------------------------


def test_the_factory_reads_mw_webhook_variables_and_names_what_is_wrong() -> None:
    env = {"MW_WEBHOOK_URL": "https://billing.example.com/usage", "MW_WEBHOOK_SECRET": SECRET}
    created = plugin.create(None, env)
    assert isinstance(created, UsageSink)
    assert (created.name, created.cloudevents) == ("webhook", False)
    assert plugin.create(None, {**env, "MW_WEBHOOK_CLOUDEVENTS": "true"}).cloudevents
    assert SECRET not in repr(created)
    cases = [
        ({**env, "MW_WEBHOOK_SECRET": "short"}, "MW_WEBHOOK_SECRET: .*at least 32 bytes"),
        ({"MW_WEBHOOK_URL": env["MW_WEBHOOK_URL"]}, "MW_WEBHOOK_SECRET: is not set"),
        ({"MW_WEBHOOK_SECRET": SECRET}, "MW_WEBHOOK_URL: is not set"),
        ({**env, "MW_WEBHOOK_URL": "http://billing.example.com/"}, "MW_WEBHOOK_URL: plain http"),
        ({**env, "MW_WEBHOOK_URL": "https://u:p@billing.example.com/"}, "credentials"),
        ({**env, "MW_WEBHOOK_URL": "billing.example.com"}, "MW_WEBHOOK_URL: expected"),
        ({**env, "MW_WEBHOOK_CLOUDEVENTS": "maybe"}, "MW_WEBHOOK_CLOUDEVENTS: expected true"),
    ]
    for environ, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            plugin.create(None, environ)
    allowed = {**env, "MW_WEBHOOK_URL": "http://billing.internal/", "MW_WEBHOOK_ALLOW_HTTP": "1"}
    assert plugin.create(None, allowed).url == "http://billing.internal/"
    assert WebhookSink("http://[::1]:9/x", SECRET).url == "http://[::1]:9/x"  # loopback


def test_it_is_installed_as_a_sink_and_mw_plugins_loads_it(monkeypatch) -> None:
    rows = {row["name"]: row for row in describe()}
    assert rows["webhook"]["kind"] == "sink"
    assert rows["webhook"]["module"] == "meterwall_webhook:plugin"
    monkeypatch.setenv("MW_WEBHOOK_URL", "https://billing.example.com/usage")
    monkeypatch.setenv("MW_WEBHOOK_SECRET", SECRET)
    loaded = load(["webhook"], None)
    assert [s.name for s in loaded.sinks] == ["webhook"]


# --- delivery to a real server -------------------------------------------------------------------


REPORT = {"kind": "closed", "consumer": "acme", "period": "2026-10", "zone": "UTC",
          "closed_at": 1_793_500_000, "checksum": "c" * 64, "rows": [{"route": "/a"}]}  # fmt: skip


async def test_the_receiver_verifies_the_signature_and_sees_a_duplicate_by_its_key(
    receiver: Receiver,
) -> None:
    async with sink(receiver.url) as target:
        await target.deliver(dict(REPORT))
        again = await target.send(dict(REPORT))  # e.g. an operator's re-run
    first, second = receiver.seen
    assert first.verified
    assert second.verified
    assert first.key == second.key == again.key == idempotency_key("acme", "2026-10", "c" * 64)
    assert (first.duplicate, second.duplicate) == (False, True)
    assert receiver.unique == 1
    stored = receiver.stored[again.key]
    assert {k: stored[k] for k in REPORT} == REPORT
    assert first.headers["Content-Type"] == "application/json"
    assert time.time() - int(first.headers[SIGNATURE_HEADER].split(",")[0][2:]) < 60


async def test_failures_then_recovery_deliver_exactly_once(receiver: Receiver) -> None:
    receiver.fail_next = 2  # two 503s
    receiver.drop_next = 1  # then stored, but the answer is lost: the retry is a duplicate
    async with sink(receiver.url, attempts=5) as target:
        done = await target.send(dict(REPORT))
    assert done.attempts == 4
    assert done.status == 200
    assert [s.duplicate for s in receiver.seen] == [False, False, False, True]
    assert len({s.key for s in receiver.seen}) == 1
    assert all(s.verified for s in receiver.seen)  # each attempt signed afresh, all valid
    assert receiver.unique == 1  # exactly once


async def test_the_budget_ends_in_a_clear_error_and_4xx_is_not_retried(
    receiver: Receiver,
) -> None:
    receiver.fail_next = 10
    async with sink(receiver.url, attempts=3) as target:
        with pytest.raises(DeliveryFailed, match=r"after 3 attempt\(s\): HTTP 503") as caught:
            await target.deliver(dict(REPORT))
        assert caught.value.retryable
        receiver.fail_next, receiver.fail_status = 10, 401
        with pytest.raises(DeliveryFailed, match=r"after 1 attempt\(s\): HTTP 401") as refused:
            await target.deliver(dict(REPORT))
        assert not refused.value.retryable
    assert len(receiver.seen) == 4
    assert receiver.unique == 0


async def test_a_server_that_is_gone_is_a_connection_failure_without_its_address() -> None:
    app_runner = web.AppRunner(web.Application())
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    port = app_runner.addresses[0][1]
    await app_runner.cleanup()  # nothing listens there any more
    async with sink(f"http://127.0.0.1:{port}/usage", attempts=2) as target:
        with pytest.raises(DeliveryFailed) as caught:
            await target.deliver(dict(REPORT))
    assert caught.value.reason.startswith("connection failed (")
    assert "127.0.0.1" not in str(caught.value)


async def test_a_cloudevents_envelope_carries_the_report_as_data(receiver: Receiver) -> None:
    async with sink(receiver.url, cloudevents=True) as target:
        await target.deliver(dict(REPORT))
    [seen] = receiver.seen
    assert seen.verified
    assert seen.headers["Content-Type"] == "application/cloudevents+json"
    event = json.loads(seen.body)
    assert event["specversion"] == "1.0"
    assert event["type"] == "meterwall.usage.closed"
    assert event["source"] == "urn:meterwall"
    assert event["id"] == seen.key
    assert event["subject"] == "acme"
    assert event["time"] == "2026-11-01T02:26:40Z"
    assert event["datacontenttype"] == "application/json"
    assert {k: event["data"][k] for k in REPORT} == REPORT


# --- exporting closed months with state in Redis -------------------------------------------------


async def test_a_closed_month_is_exported_once_and_open_ones_are_skipped(
    redis, settings, receiver: Receiver
) -> None:
    keyspace = settings.keyspace()
    month = await closed_month(redis, settings, {"acme": 3, "globex": 1})
    await meter(settings, month, {"late": 2})  # counted after the close: its month is open
    async with sink(receiver.url) as target:
        exporter = WebhookExporter(redis, keyspace, target)
        rows = await exporter.export(month)
        assert [(r.consumer, r.state, r.attempts) for r in rows] == [
            ("acme", "delivered", 1), ("globex", "delivered", 1), ("late", "skipped", 0),
        ]  # fmt: skip
        again = await exporter.export(month)  # an idempotent re-run sends nothing
    assert [r.state for r in again] == ["already delivered", "already delivered", "skipped"]
    assert len(receiver.seen) == 2
    assert receiver.unique == 2
    report = await closed_report(redis, keyspace, "acme", month)
    assert report is not None
    stored = receiver.stored[idempotency_key("acme", month, report["checksum"])]
    assert (stored["consumer"], stored["period"], stored["zone"]) == ("acme", month, "UTC")
    assert stored["closed_at"] == report["closed_at"]
    assert sorted((r["route"], r["status"], r["requests"]) for r in stored["rows"]) == [
        ("<unmatched>", 200, 3)
    ]
    status = await delivery_status(redis, keyspace, month)
    assert [(s["consumer"], s["state"]) for s in status] == [
        ("acme", "delivered"), ("globex", "delivered"),
    ]  # fmt: skip
    assert 0 < await redis.ttl(state_key(keyspace, month)) <= 762 * 86400
    checks = await Auditor(redis, keyspace, settings=settings).run()
    plaintext = next(c for c in checks if c.name == "plaintext")
    assert plaintext.ok, plaintext.problems  # no URL, address or error text at rest


async def test_an_exhausted_delivery_stays_pending_and_the_next_run_delivers_it(
    redis, settings, receiver: Receiver
) -> None:
    keyspace = settings.keyspace()
    month = await closed_month(redis, settings, {"acme": 2})
    receiver.fail_next = 3
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix}
    async with sink(receiver.url, attempts=3) as target:
        [row] = await WebhookExporter(redis, keyspace, target).export(month)
    assert (row.state, row.attempts, row.last_error) == ("pending", 3, "HTTP 503")
    raw = await redis.hget(state_key(keyspace, month), "closed:acme")
    entry = json.loads(raw)
    assert (entry["state"], entry["attempts"], entry["last_error"]) == ("pending", 3, "HTTP 503")

    shown = await asyncio.to_thread(meterwall, "export", "status", "--format", "json", env=env)
    assert shown.returncode == 0, shown.stderr
    [pending] = json.loads(shown.stdout)
    assert (pending["consumer"], pending["period"], pending["state"]) == ("acme", month, "pending")
    assert pending["key"] == receiver.seen[0].key

    rerun = await asyncio.to_thread(
        meterwall, "export", "--sink", "webhook", "--url", receiver.url, "--period", month,
        "--format", "json", env={**env, "MW_WEBHOOK_SECRET": SECRET},
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout) == [
        {"consumer": "acme", "kind": "closed", "state": "delivered", "attempts": 4,
         "last_error": None},
    ]  # fmt: skip
    assert receiver.unique == 1
    assert len(receiver.seen) == 4
    entry = json.loads(await redis.hget(state_key(keyspace, month), "closed:acme"))
    assert (entry["state"], entry["attempts"]) == ("delivered", 4)


async def test_the_export_command_exits_1_while_a_delivery_is_pending(
    redis, settings, receiver: Receiver
) -> None:
    month = await closed_month(redis, settings, {"acme": 1})
    receiver.fail_next = 100
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix,
           "MW_WEBHOOK_SECRET": SECRET}  # fmt: skip
    args = ("export", "--url", receiver.url, "--period", month, "--attempts", "2")
    done = await asyncio.to_thread(meterwall, *args, env=env)
    assert done.returncode == 1
    assert "pending" in done.stdout
    assert "HTTP 503" in done.stdout
    assert len(receiver.seen) == 2
    assert "1 delivery(ies) not done" in done.stderr
    status = await asyncio.to_thread(meterwall, "export", "status", "--period", month, env=env)
    assert "pending" in status.stdout
    assert "acme" in status.stdout


def test_the_export_command_takes_its_secret_from_the_environment_only(settings) -> None:
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix}
    url = "https://billing.example.com/usage"
    missing = meterwall("export", "--url", url, "--period", "2026-10", env=env)
    assert missing.returncode == 2
    assert missing.stderr.startswith("meterwall: error: MW_WEBHOOK_SECRET: is not set")
    short = meterwall("export", "--url", url, "--period", "2026-10", "--secret-env", "MY_SECRET",
                      env={**env, "MY_SECRET": "short"})  # fmt: skip
    assert short.returncode == 2
    assert "MY_SECRET: " in short.stderr
    assert len(short.stderr.splitlines()) == 1
    no_secret_option = meterwall("export", "--secret", SECRET, env=env)
    assert no_secret_option.returncode == 2
    assert "--secret" in no_secret_option.stderr
    day = meterwall("export", "--url", url, "--period", "2026-10-01", env={**env,
                    "MW_WEBHOOK_SECRET": SECRET})  # fmt: skip
    assert day.returncode == 2
    assert "--period: expected a month (YYYY-MM)" in day.stderr
    plain = meterwall("export", "--url", "http://billing.example.com/", "--period", "2026-10",
                      env={**env, "MW_WEBHOOK_SECRET": SECRET})  # fmt: skip
    assert plain.returncode == 2
    assert "plain http" in plain.stderr


async def test_running_totals_are_sent_when_they_change_and_the_final_report_supersedes_them(
    redis, settings, receiver: Receiver
) -> None:
    keyspace = settings.keyspace()
    month = past_month()
    await meter(settings, month, {"acme": 2})
    async with sink(receiver.url) as target:
        exporter = WebhookExporter(redis, keyspace, target)
        [first] = await exporter.export(month, running=True)
        [same] = await exporter.export(month, running=True)  # nothing changed: not sent again
        await meter(settings, month, {"acme": 1})
        [changed] = await exporter.export(month, running=True)
        assert [first.state, same.state, changed.state] == [
            "delivered", "already delivered", "delivered",
        ]  # fmt: skip
        await close_period(redis, keyspace, month, grace_s=0)
        [final] = await exporter.export(month)
        [after] = await exporter.export(month, running=True)
    assert (final.kind, final.state, after.state) == ("closed", "delivered", "skipped")
    kinds = [(d["kind"], sum(r["requests"] for r in d["rows"])) for d in receiver.stored.values()]
    assert kinds == [("running", 2), ("running", 3), ("closed", 3)]
    assert all(d["kind"] != "running" or d["as_of"] for d in receiver.stored.values())
    status = await delivery_status(redis, keyspace, month)
    assert [(s["kind"], s["state"]) for s in status] == [("closed", "delivered")]


def test_the_module_documents_its_public_names() -> None:
    for name in meterwall_webhook.__all__:
        assert getattr(meterwall_webhook, name) is not None


async def test_a_snapshot_that_fails_its_checksum_is_never_sent(
    redis, settings, receiver: Receiver
) -> None:
    keyspace = settings.keyspace()
    month = await closed_month(redis, settings, {"acme": 2})
    name = keyspace.closed("acme", month)
    frozen = json.loads(await redis.get(name))
    frozen["fields"] = {k: v * 10 for k, v in frozen["fields"].items()}  # edited by hand
    await redis.set(name, json.dumps(frozen))
    async with sink(receiver.url) as target:
        [row] = await WebhookExporter(redis, keyspace, target).export(month)
    assert row.state == "invalid"
    assert "does not match its checksum" in (row.last_error or "")
    assert receiver.seen == []
