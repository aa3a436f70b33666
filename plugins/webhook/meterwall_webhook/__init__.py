"""meterwall_webhook: closed billing periods pushed to an HTTP endpoint (a ``sink`` plugin).

A ``WebhookSink`` POSTs one usage report per consumer and period as JSON (optionally wrapped in a
CloudEvents 1.0 envelope, for metering services that take CloudEvents), and ``WebhookExporter``
decides what to send from Redis and remembers what was sent. Why it is built the way it is:

* **Idempotency.** A billing endpoint must be able to receive the same report twice (a retry
  after a lost answer, an operator re-running the export) and bill it once. Every report has an
  idempotency key, the SHA-256 of ``consumer|period|checksum`` (the closed snapshot's checksum),
  sent as the ``Idempotency-Key`` header and, signed, as the body's ``id`` (the CloudEvents
  ``id``). Running totals add ``|running`` so that they can never be mistaken for the final
  report of the month. Receivers dedupe by the body's ``id``: the header is not signed.
* **Authenticity.** ``Meterwall-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`` over
  ``"<t>." + body`` with a shared secret of at least 32 bytes. The timestamp is signed, so a
  captured request can only be replayed within the receiver's window (``REPLAY_WINDOW``, five
  minutes either way); inside that window the idempotency key makes a replay harmless. Each
  attempt is signed afresh, so a retry after a long backoff is not rejected as stale. ``verify``
  is the receiver's half: constant-time, and strict about the header's form.
* **Retries.** Connection failures, timeouts, 408, 425, 429 and 5xx are retried with exponential
  backoff and jitter (a ``Retry-After`` in seconds is honoured up to ``max_delay``); any other
  answer outside 2xx (a wrong secret, a wrong URL) will not heal by itself, so it stops at once.
  Redirects are not followed: a signed report goes to the configured URL or nowhere. When the
  budget is spent ``deliver`` raises ``DeliveryFailed``; the exporter records the delivery as
  pending in Redis and the next ``meterwall export`` retries it.
* **Nothing personal at rest.** The delivery state in Redis holds consumers, periods, counts and
  an error *class* (``HTTP 503``, ``connection failed (ServerDisconnectedError)``), never a URL,
  an address or a response body, so ``meterwall audit``'s plaintext check stays clean.
* **Confidentiality.** Usage is commercial data: plain ``http://`` is accepted only to loopback
  addresses unless explicitly allowed (``allow_http``, for a private network's own TLS-less hop).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from meterwall.consumers import ConsumerRegistry
from meterwall.errors import ConfigurationError, MeterwallError
from meterwall.keyspace import Keyspace
from meterwall.periods import (
    SNAPSHOT_RETENTION,
    check_month,
    consumers_with_usage,
    period_end,
    snapshot,
)
from meterwall.usage import UsageReader

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MIN_SECRET_BYTES",
    "REPLAY_WINDOW",
    "SIGNATURE_HEADER",
    "Delivery",
    "DeliveryFailed",
    "ExportRow",
    "WebhookExporter",
    "WebhookSink",
    "closed_report",
    "delivery_status",
    "idempotency_key",
    "plugin",
    "running_report",
    "secret_from_env",
    "sign",
    "state_key",
    "verify",
]

SIGNATURE_HEADER = "Meterwall-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAY_WINDOW = 300  # seconds either side of the receiver's clock a signature is accepted
MIN_SECRET_BYTES = 32  # as long as the HMAC-SHA256 output: a shorter key weakens the MAC
MAX_SIGNATURE_HEADER = 1024  # a longer header is not ours; refused before any parsing
GROUP_BY = ("route", "status")  # the rows of a report
RETRY_STATUSES = frozenset({408, 425, 429})  # and every 5xx
CLOUDEVENTS_TYPES = {"closed": "meterwall.usage.closed", "running": "meterwall.usage.running"}
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX = re.compile(r"[0-9a-f]{64}")


# --- signing: both halves ------------------------------------------------------------------------


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _mac(secret: str | bytes, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The ``Meterwall-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds).

    ``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``: the timestamp is part
    of the MAC, so it cannot be moved forward to replay an old request.
    """
    return f"t={int(timestamp)},v1={_mac(secret, int(timestamp), body)}"


def verify(
    secret: str | bytes, header_value: str | None, body: bytes, *, now: float | None = None,
    window: float = REPLAY_WINDOW,
) -> bool:  # fmt: skip
    """True when ``header_value`` is a valid signature of exactly ``body`` made within ``window``
    seconds of ``now`` (default: this machine's clock), either way.

    For receivers: pass the raw body bytes as received (not re-serialised JSON). The comparison
    is constant-time; several ``v1=`` values are accepted (any may match), so a sender can sign
    with an old and a new secret while a rotation is under way. A missing or repeated ``t``, a
    timestamp outside the window (old: a replay; far ahead: a broken clock) or a header of
    another form is False, never an exception.
    """
    if not header_value or len(header_value) > MAX_SIGNATURE_HEADER:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header_value.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(value):
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
        # other schemes (a future v2) are ignored, so receivers keep working during an upgrade
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > window:
        return False
    expected = _mac(secret, timestamp, body).encode()
    matched = False
    for candidate in candidates:  # every candidate is compared: no early exit to time
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    return matched


def idempotency_key(consumer: str, period: str, checksum: str, *, kind: str = "closed") -> str:
    """SHA-256 (hex) of ``consumer|period|checksum`` (``|running`` appended for running totals).

    The same closed snapshot always gives the same key, whoever sends it and how often.
    """
    text = f"{consumer}|{period}|{checksum}" + ("" if kind == "closed" else f"|{kind}")
    return hashlib.sha256(text.encode()).hexdigest()


# --- configuration -------------------------------------------------------------------------------


def check_secret(secret: str | bytes, *, setting: str = "secret") -> bytes:
    key = _key(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            setting, f"the webhook signing secret must be at least {MIN_SECRET_BYTES} bytes "
            f"(got {len(key)}); e.g. `openssl rand -base64 32`",
        )  # fmt: skip
    return key


def secret_from_env(name: str, environ: Mapping[str, str] | None = None) -> bytes:
    """The signing secret from the environment variable ``name`` (never from an argument:
    a command-line secret lands in shell history and in every process listing)."""
    env = os.environ if environ is None else environ
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigurationError("--secret-env", f"{name!r} is not an environment variable name")
    value = env.get(name, "")
    if not value:
        raise ConfigurationError(name, "is not set: the webhook signing secret (32+ bytes)")
    return check_secret(value, setting=name)


def check_url(url: str, *, allow_http: bool = False, setting: str = "url") -> str:
    """An absolute http(s) URL without credentials; plain http only to loopback (or allowed)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(setting, "expected an absolute https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(setting, "must not carry credentials (the secret signs requests)")
    if parts.scheme == "http" and not allow_http and not _loopback(parts.hostname):
        raise ConfigurationError(
            setting, "plain http sends usage in clear; use https (http is accepted only to "
            "loopback addresses unless explicitly allowed)",
        )  # fmt: skip
    return url.strip()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(name, f"expected true or false, got {value!r}")


# --- delivery ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivered report: the idempotency key, the receiver's status and how many tries."""

    key: str
    status: int
    attempts: int


class DeliveryFailed(MeterwallError):
    """A report was not delivered within the retry budget (or was refused for good)."""

    def __init__(self, key: str, attempts: int, reason: str, *, retryable: bool = True) -> None:
        self.key = key
        self.attempts = attempts
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"webhook delivery failed after {attempts} attempt(s): {reason}")


class WebhookSink:
    """Delivers usage reports to one URL, signed, with retries (a ``UsageSink``).

    ``attempts`` is the whole budget (first try included); the n-th retry waits about
    ``base_delay * 2**(n-1)`` seconds (half of it fixed, half random, so that many exporters
    failing together do not retry in lockstep), at most ``max_delay``. ``timeout`` bounds one
    attempt. Use ``async with`` or ``aclose()``: the HTTP session is kept between deliveries.
    """

    name = "webhook"

    def __init__(
        self, url: str, secret: str | bytes, *, cloudevents: bool = False, attempts: int = 5,
        base_delay: float = 0.5, max_delay: float = 30.0, timeout: float = 10.0,
        source: str = "urn:meterwall", allow_http: bool = False,
    ) -> None:  # fmt: skip
        self.url = check_url(url, allow_http=allow_http)
        self._secret = check_secret(secret)
        if attempts < 1:
            raise ConfigurationError("attempts", "at least 1")
        if base_delay < 0 or max_delay < base_delay or timeout <= 0:
            raise ConfigurationError(
                "base_delay", "needs 0 <= base_delay <= max_delay; timeout > 0"
            )
        self.cloudevents = cloudevents
        self.attempts = attempts
        self.base_delay, self.max_delay, self.timeout = base_delay, max_delay, timeout
        self.source = source
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the secret, and not the URL's path or query either
        host = urlsplit(self.url).hostname
        return f"WebhookSink(host={host!r}, cloudevents={self.cloudevents})"

    async def __aenter__(self) -> WebhookSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, report: Mapping[str, Any]) -> tuple[str, bytes, str]:
        """(idempotency key, body bytes, content type) of a report, as it will be sent."""
        kind = str(report.get("kind", "closed"))
        key = idempotency_key(
            str(report["consumer"]), str(report["period"]), str(report["checksum"]), kind=kind
        )
        payload: dict[str, Any] = {**report, "id": key}  # the signed id is always the key
        content_type = "application/json"
        if self.cloudevents:
            instant = report.get("closed_at") or report.get("as_of") or time.time()
            payload = {
                "specversion": "1.0",
                "type": CLOUDEVENTS_TYPES.get(kind, f"meterwall.usage.{kind}"),
                "source": self.source,
                "id": key,
                "subject": str(report["consumer"]),
                "time": datetime.fromtimestamp(float(instant), UTC).isoformat().replace(
                    "+00:00", "Z"),
                "datacontenttype": "application/json",
                "data": payload,
            }  # fmt: skip
            content_type = "application/cloudevents+json"
        return key, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS), content_type

    async def deliver(self, report: dict[str, Any]) -> None:
        """Deliver one report; raises ``DeliveryFailed`` when the budget is spent."""
        await self.send(report)

    async def send(self, report: Mapping[str, Any]) -> Delivery:
        """Deliver one report and say how; raises ``DeliveryFailed`` like ``deliver``."""
        key, body, content_type = self.body(report)
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        reason = ""
        for attempt in range(1, self.attempts + 1):
            headers = {
                "Content-Type": content_type,
                IDEMPOTENCY_HEADER: key,
                SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
                "User-Agent": "meterwall-webhook/1",
            }
            wait: float | None = None
            try:
                async with session.post(
                    self.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()  # drain, so the connection can be reused
                    if 200 <= response.status < 300:
                        return Delivery(key, response.status, attempt)
                    reason = f"HTTP {response.status}"
                    if response.status not in RETRY_STATUSES and response.status < 500:
                        raise DeliveryFailed(key, attempt, reason, retryable=False)
                    wait = _retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                reason = f"timed out after {self.timeout:g} s"
            except aiohttp.ClientError as exc:  # the class only: messages carry host and port
                reason = f"connection failed ({type(exc).__name__})"
            if attempt < self.attempts:
                await asyncio.sleep(self._delay(attempt, wait))
        raise DeliveryFailed(key, self.attempts, reason)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the HTTP-date form is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


# --- reports -------------------------------------------------------------------------------------


async def closed_report(
    redis: Any, keyspace: Keyspace, consumer: str, period: str
) -> dict[str, Any] | None:
    """The report of a closed month, or None while it is open.

    Rows are the snapshot's fields grouped by route and status (every measure, denials and
    latency percentiles); ``checksum`` is the snapshot's own, so a receiver that keeps the
    snapshot can check it. Raises ``ValueError`` if the snapshot does not match its checksum.
    """
    frozen = await snapshot(redis, keyspace, consumer, period)
    if frozen is None:
        return None
    rows = await UsageReader(redis, keyspace).totals(consumer, period, GROUP_BY)
    return {"kind": "closed", "consumer": consumer, "period": period, "zone": frozen["zone"],
            "closed_at": frozen["closed_at"], "checksum": frozen["checksum"],
            "rows": rows}  # fmt: skip


async def running_report(
    redis: Any, keyspace: Keyspace, consumer: str, period: str, *, now_s: int | None = None
) -> dict[str, Any]:
    """The running totals of a month not yet closed (``kind: running``, ``as_of`` = now).

    Not final: a later running report or the closed one supersedes it. Its checksum is the
    SHA-256 of the rows themselves, so unchanged totals give the same idempotency key and are
    not sent again.
    """
    rows = await UsageReader(redis, keyspace).totals(consumer, period, GROUP_BY)
    known = await ConsumerRegistry(redis, keyspace).get(consumer)
    zone_name = "UTC" if known is None else known.tz_at(period_end(period, known.tz) - 1)
    digest = hashlib.sha256(orjson.dumps(rows, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {"kind": "running", "consumer": consumer, "period": period, "zone": zone_name,
            "as_of": int(time.time()) if now_s is None else now_s, "checksum": digest,
            "rows": rows}  # fmt: skip


# --- export with state in Redis ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportRow:
    """What happened to one consumer's report in one run.

    ``state``: ``delivered`` (now), ``already delivered`` (by an earlier run: not sent again),
    ``pending`` (not delivered; the next run retries), ``skipped`` (the month is not closed, or
    for running totals: already closed), ``invalid`` (the snapshot fails its checksum).
    """

    consumer: str
    kind: str
    state: str
    attempts: int = 0
    last_error: str | None = None

    def public(self) -> dict[str, Any]:
        return {"consumer": self.consumer, "kind": self.kind, "state": self.state,
                "attempts": self.attempts, "last_error": self.last_error}  # fmt: skip


def state_key(keyspace: Keyspace, period: str) -> str:
    """The hash of one month's webhook deliveries: ``<prefix>:export:webhook:<YYYY-MM>``."""
    return keyspace.export_state("webhook", period)


class WebhookExporter:
    """Sends a month's reports through a ``WebhookSink`` and keeps the delivery state in Redis.

    State is one hash per month (``state_key``), field ``<kind>:<consumer>``, value JSON
    ``{consumer, period, kind, key, checksum, state, attempts, last_error, at}``; it expires with
    the snapshots (25 months). A delivered report is not sent again while its idempotency key is
    unchanged; a pending one is retried by the next run. Running in parallel with another export
    is safe for the receiver (it dedupes by key) but may send a report twice.
    """

    def __init__(
        self, redis: Any, keyspace: Keyspace, sink: WebhookSink, *, concurrency: int = 8
    ) -> None:
        self._redis = redis
        self._keyspace = keyspace
        self._sink = sink
        self._gate = asyncio.Semaphore(max(1, concurrency))

    async def export(
        self, period: str, *, running: bool = False, now_s: int | None = None
    ) -> list[ExportRow]:
        """Deliver every closed snapshot of ``period`` (or, with ``running``, the running totals
        of every consumer whose month is still open); one row per consumer, sorted."""
        _check_month(period)
        closed = await self._closed_consumers(period)
        known = set(await ConsumerRegistry(self._redis, self._keyspace).all())
        with_usage = await consumers_with_usage(self._redis, self._keyspace, period)
        if running:
            targets, skipped = with_usage - closed, closed
        else:
            targets, skipped = closed, (with_usage | known) - closed
        jobs = [self._one(c, period, running, now_s) for c in sorted(targets)]
        rows = list(await asyncio.gather(*jobs))
        kind = "running" if running else "closed"
        rows += [ExportRow(c, kind, "skipped") for c in sorted(skipped)]
        return sorted(rows, key=lambda row: row.consumer)

    async def status(self, period: str | None = None) -> list[dict[str, Any]]:
        """Every recorded delivery (of one month, or of all), pending first."""
        return await delivery_status(self._redis, self._keyspace, period)

    async def _closed_consumers(self, period: str) -> set[str]:
        found = set()
        pattern = f"{self._keyspace.prefix}:{{s*}}:closed:*:{period}"
        async for raw_key in self._redis.scan_iter(match=pattern):
            found.add(raw_key.decode().split(":closed:", 1)[1].rsplit(":", 1)[0])
        return found

    async def _one(self, consumer: str, period: str, running: bool, now_s: int | None) -> ExportRow:
        kind = "running" if running else "closed"
        async with self._gate:
            try:
                report = (
                    await running_report(self._redis, self._keyspace, consumer, period, now_s=now_s)
                    if running
                    else await closed_report(self._redis, self._keyspace, consumer, period)
                )
            except ValueError as exc:
                return ExportRow(consumer, kind, "invalid", 0, str(exc))
            if report is None:  # erased between the scan and the read
                return ExportRow(consumer, kind, "skipped")
            key = idempotency_key(consumer, period, report["checksum"], kind=kind)
            field = f"{kind}:{consumer}"
            raw = await self._redis.hget(state_key(self._keyspace, period), field)
            before = orjson.loads(raw) if raw is not None else None
            if before is not None and before["key"] == key and before["state"] == "delivered":
                return ExportRow(consumer, kind, "already delivered", before["attempts"])
            earlier = before["attempts"] if before is not None and before["key"] == key else 0
            try:
                done = await self._sink.send(report)
            except DeliveryFailed as failed:
                attempts = earlier + failed.attempts
                await self._record(period, field, report, key, "pending", attempts, failed.reason)
                return ExportRow(consumer, kind, "pending", attempts, failed.reason)
            attempts = earlier + done.attempts
            await self._record(period, field, report, key, "delivered", attempts, None)
            return ExportRow(consumer, kind, "delivered", attempts)

    async def _record(
        self, period: str, field: str, report: Mapping[str, Any], key: str, state: str,
        attempts: int, error: str | None,
    ) -> None:  # fmt: skip
        entry = {"consumer": report["consumer"], "period": period, "kind": report["kind"],
                 "key": key, "checksum": report["checksum"], "state": state,
                 "attempts": attempts, "last_error": error, "at": int(time.time())}  # fmt: skip
        name = state_key(self._keyspace, period)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, field, orjson.dumps(entry))
            if state == "delivered" and report["kind"] == "closed":
                pipe.hdel(name, f"running:{report['consumer']}")  # superseded by the final one
            pipe.expire(name, SNAPSHOT_RETENTION)
            await pipe.execute()


async def delivery_status(
    redis: Any, keyspace: Keyspace, period: str | None = None
) -> list[dict[str, Any]]:
    """Every recorded webhook delivery (of one month, or of all), pending ones first."""
    if period is not None:
        _check_month(period)
        keys = [state_key(keyspace, period)]
    else:
        pattern = f"{keyspace.prefix}:export:webhook:*"
        keys = sorted([k.decode() async for k in redis.scan_iter(match=pattern)])
    rows = []
    for key in keys:
        for raw in (await redis.hgetall(key)).values():
            entry = orjson.loads(raw)
            rows.append({
                "consumer": entry["consumer"], "period": entry["period"], "kind": entry["kind"],
                "state": entry["state"], "attempts": entry["attempts"],
                "last_error": entry["last_error"],
                "at": datetime.fromtimestamp(entry["at"], UTC).isoformat(timespec="seconds"),
                "key": entry["key"],
            })  # fmt: skip
    rows.sort(key=lambda r: (r["state"] != "pending", r["period"], r["consumer"], r["kind"]))
    return rows


def _check_month(period: str) -> None:
    check_month(period, setting="--period")


# --- the plugin factory --------------------------------------------------------------------------


class _Factory:
    """What ``MW_PLUGINS=webhook`` creates, configured from ``MW_WEBHOOK_*`` variables.

    ``MW_WEBHOOK_URL`` (required), ``MW_WEBHOOK_SECRET`` (required, 32+ bytes),
    ``MW_WEBHOOK_CLOUDEVENTS`` and ``MW_WEBHOOK_ALLOW_HTTP`` (true/false). Read at start-up: a
    missing or invalid one stops the app with an error naming it.
    """

    name = "webhook"
    kind = "sink"
    summary = "pushes closed usage periods to an HTTPS endpoint, signed (HMAC), idempotent"

    def create(self, settings: Any, environ: Mapping[str, str] | None = None) -> WebhookSink:
        env = os.environ if environ is None else environ
        url = env.get("MW_WEBHOOK_URL", "").strip()
        if not url:
            raise ConfigurationError("MW_WEBHOOK_URL", "is not set: the billing endpoint (https)")
        allow_http = _flag(env, "MW_WEBHOOK_ALLOW_HTTP")
        check_url(url, allow_http=allow_http, setting="MW_WEBHOOK_URL")
        secret = secret_from_env("MW_WEBHOOK_SECRET", env)
        return WebhookSink(
            url, secret, cloudevents=_flag(env, "MW_WEBHOOK_CLOUDEVENTS"), allow_http=allow_http
        )


plugin = _Factory()
