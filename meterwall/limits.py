"""Rate limits and monthly quotas, spent from tokens that each worker leases from Redis in batches.

A plan (``MW_PLANS``) gives a consumer a rate limit (GCRA: a rate and a burst) and/or a monthly
quota in requests or billable units, counted in the consumer's billing time zone. Redis holds the
exact state: one script (``lua/lease.lua``), one rate key and one quota hash per consumer. A worker
leases a few tokens at a time and spends them in process, so an admitted request does not wait on
Redis; it asks for more before it runs out, and the script shrinks a lease as a limit nears
exhaustion (a lease is at most a quarter of what is left, and a single token at the end).

The bounds, documented in the README:

* never over: tokens are deducted in Redis when leased, so admissions never exceed the limit
  while Redis answers; with one token left, exactly one request anywhere is admitted;
* under-admission is bounded by the tokens the workers hold unspent: a rate token is spent
  within a second of its lease or handed back with the next lease; a quota lease is settled
  (its unspent tokens given back) within ``QUOTA_LEASE_S``, on shutdown, or, when its worker
  was killed, reclaimed by the script ``RECLAIM_GRACE_S`` after that;
* a killed worker's tokens come back minus what it reported spent; requests it admitted after
  its last report (at most the tokens of its leases) are not known to Redis and can be admitted
  again: the only way a quota can be overshot while Redis answers. A live worker whose
  requests stop coming settles its leases before they lapse (``settle_quiet``, every second).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

from redis.exceptions import NoScriptError

from .clock import SYSTEM_CLOCK, Clock
from .consumers import next_month_start
from .errors import ConfigurationError
from .keyspace import Keyspace

log = logging.getLogger("meterwall")

LEASE_SCRIPT = resources.files("meterwall").joinpath("lua/lease.lua").read_bytes()
LEASE_SHA = hashlib.sha1(LEASE_SCRIPT, usedforsecurity=False).hexdigest()

PLAN_SYNTAX = "free: 10/s burst 20, 10000 requests/month; pro: 100/s, 1000000 units/month"
RATE_LEASE_S = 1.0  # leased rate tokens are spent within this, or handed back
# Rate tokens are renewed in the background this long before they lapse, however many are held:
# a request that finds them lapsed waits a Redis round trip (once a second per consumer).
RATE_RENEW_AHEAD_NS = int(RATE_LEASE_S * 1e9 / 2)
QUOTA_RENEW_AHEAD_NS = 2_000_000_000  # the same for quota leases, which live QUOTA_LEASE_S
QUOTA_LEASE_S = 10.0  # a quota lease is settled within this
SETTLE_EVERY_S = 1.0  # how often a worker looks for leases whose requests stopped coming
RECLAIM_GRACE_S = 5.0  # ... and reclaimed by Redis this long after, if it never was
FIRST_LEASE, MAX_LEASE, SHARE = 8, 1024, 4

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*(s|min|h)(?:\s+burst\s+(\d+))?$")
_QUOTA = re.compile(r"^(\d+)\s+(requests|units)\s*/\s*month$")
_PER = {"s": 1, "min": 60, "h": 3600}


@dataclass(frozen=True, slots=True)
class Plan:
    """A rate limit (``rate`` requests per second, 0: none) and a monthly quota (0: none)."""

    name: str
    rate: float = 0.0
    burst: int = 0
    quota: int = 0
    unit: str = "requests"  # or "units": the route weights of MW_ROUTE_WEIGHTS

    @property
    def limited(self) -> bool:
        return self.rate > 0 or self.quota > 0


def parse_plans(text: str, *, setting: str = "MW_PLANS") -> dict[str, Plan]:
    """``"free: 10/s burst 20, 10000 requests/month; pro: 100/s, 1000000 units/month"``.

    A rate is ``N/s``, ``N/min`` or ``N/h`` with an optional burst (default: one second's
    worth, at least 1); a quota is ``N requests/month`` or ``N units/month``; ``unlimited``
    names a plan without limits.
    """
    plans: dict[str, Plan] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, colon, spec = item.partition(":")
        name = name.strip()
        if not colon or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigurationError(setting, f"expected {PLAN_SYNTAX!r}, got {item!r}")
        rate, burst, quota, unit = 0.0, 0, 0, "requests"
        for part in filter(None, (p.strip().lower() for p in spec.split(","))):
            if part == "unlimited":
                continue
            if rate_match := _RATE.match(part):
                rate = float(rate_match[1]) / _PER[rate_match[2]]
                burst = int(rate_match[3]) if rate_match[3] else max(1, math.ceil(rate))
                if rate <= 0 or burst < 1:
                    raise ConfigurationError(setting, f"plan {name!r}: a rate must be positive")
            elif quota_match := _QUOTA.match(part):
                quota, unit = int(quota_match[1]), quota_match[2]
                if quota < 1:
                    raise ConfigurationError(setting, f"plan {name!r}: a quota must be positive")
            else:
                raise ConfigurationError(
                    setting, f"plan {name!r}: cannot read {part!r} (syntax: {PLAN_SYNTAX!r})"
                )
        plans[name] = Plan(name, rate, burst, quota, unit)
    return plans


class PathWeights:
    """Billable units of a request, known before routing from the path.

    ``MW_ROUTE_WEIGHTS`` names route templates; the quota must charge a request before the app
    routes it, so each template is matched against the raw path (``{name}`` matches one segment,
    ``{name:path}`` the rest). Unlisted paths weigh 1.
    """

    def __init__(self, weights: Mapping[str, int]) -> None:
        self._exact = {t: w for t, w in weights.items() if "{" not in t}
        self._patterns = [
            (re.compile(_template_regex(t)), w) for t, w in weights.items() if "{" in t
        ]

    def __call__(self, path: str) -> int:
        weight = self._exact.get(path)
        if weight is not None:
            return weight
        for pattern, weight in self._patterns:
            if pattern.match(path):
                return weight
        return 1


def _template_regex(template: str) -> str:
    parts = re.split(r"(\{[^{}]+\})", template)
    regex = "".join(
        (".*" if part.endswith(":path}") else "[^/]+") if part.startswith("{") else re.escape(part)
        for part in parts
    )
    return regex + "$"


@dataclass(slots=True)
class Verdict:
    """The limits' answer: admitted (``reason`` empty) or refused, and the RateLimit headers."""

    reason: str = ""  # "", "rate-limited" or "quota-exceeded"
    retry_after: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    cost: int = 0  # quota tokens spent (given back if the answer is not billable)


UNLIMITED = Verdict()
_UNRESOLVED = object()


class _Lease:
    __slots__ = ("deadline_ns", "granted", "id", "spent")

    def __init__(self, lease_id: str, granted: int, deadline_ns: int) -> None:
        self.id, self.granted, self.spent, self.deadline_ns = lease_id, granted, 0, deadline_ns

    def left(self, now_ns: int) -> int:
        return self.granted - self.spent if now_ns < self.deadline_ns else 0


class _Tokens:
    """One consumer's tokens in this process."""

    __slots__ = (
        "blocked",
        "blocked_until_ns",
        "credit",
        "header_cache",
        "header_key",
        "last_call_ns",
        "leases",
        "month",
        "month_end_s",
        "month_seconds",
        "pending",
        "plan",
        "policy",
        "policy_month",
        "quota_left",
        "rate",
        "rate_deadline_ns",
        "rate_left",
        "rate_return",
        "retry_s",
        "settling",
        "version",
        "want",
    )  # fmt: skip

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.month = ""
        self.month_end_s = 0
        self.month_seconds = 0
        self.rate = 0  # rate tokens held
        self.rate_deadline_ns = 0
        self.rate_return = 0  # expired rate tokens to hand back with the next lease
        self.rate_left = -1  # what Redis said was left at the last lease (-1: unknown)
        self.quota_left = -1
        self.leases: list[_Lease] = []
        self.credit = 0  # quota tokens given back by requests that were not billable
        self.blocked = ""
        self.blocked_until_ns = 0
        self.retry_s = 0
        self.pending: asyncio.Task[None] | None = None
        self.settling = False  # ``pending`` gives every lease back: nothing may be spent now
        self.want = FIRST_LEASE
        self.last_call_ns = 0
        self.policy = b""  # the RateLimit-Policy header of this plan and month
        self.policy_month = ""
        self.version = 0  # changes with every lease: the RateLimit header is made again
        self.header_key: tuple[int, int, str] | None = None
        self.header_cache: tuple[tuple[bytes, bytes], ...] = ()

    def rate_lapsing(self, now_ns: int) -> bool:
        """The rate tokens held lapse soon: time for a new lease."""
        return now_ns >= self.rate_deadline_ns - RATE_RENEW_AHEAD_NS

    def quota_lapsing(self, now_ns: int) -> bool:
        """The newest lease lapses soon (requests spend the oldest first, so it holds the last
        tokens): time for a new one. Cheap: it runs for every request of a quota plan."""
        return bool(self.leases) and self.leases[-1].deadline_ns <= now_ns + QUOTA_RENEW_AHEAD_NS

    def quota_held(self, now_ns: int) -> int:
        held = self.credit
        for lease in self.leases:
            if now_ns < lease.deadline_ns:
                held += lease.granted - lease.spent
        return held


class Limiter:
    """Spends leased tokens for one middleware instance; ``admit`` is called per request."""

    def __init__(
        self, keyspace: Keyspace, plans: Mapping[str, Plan], *, default_plan: str = "",
        zone_of: Callable[[str, int], str] = lambda consumer, time_s: "UTC",
        weight_of: Callable[[str], int] = lambda path: 1, clock: Clock = SYSTEM_CLOCK,
    ) -> None:  # fmt: skip
        self._keyspace = keyspace
        self._plans = dict(plans)
        self._default = default_plan
        self._zone_of = zone_of
        self._weight_of = weight_of
        self._clock = clock
        self._pass_time = clock is not SYSTEM_CLOCK  # tests drive Redis's side with their clock
        self._writer = secrets.token_hex(4)
        self._serial = 0
        self._tokens: dict[str, _Tokens] = {}
        self._unknown_plans: set[str] = set()
        self._plan_cache: dict[str, object] = {}  # plan name -> Plan or None
        self._redis: Any = None
        self._settler: asyncio.Task[None] | None = None
        self.lease_calls = 0  # round trips to Redis (benchmarks report them per request)

    @property
    def active(self) -> bool:
        return any(plan.limited for plan in self._plans.values())

    def bind(self, redis: Any) -> None:
        self._redis = redis

    def after_fork(self) -> None:
        """A forked child holds none of its parent's leases (and must not settle them)."""
        self._writer = secrets.token_hex(4)
        self._tokens.clear()
        self._settler = None

    async def settle_quiet(self) -> None:
        """Settle the leases of consumers whose requests stopped coming (their newest lease
        lapses soon and nothing renewed it). Unsettled, Redis reclaims such a lease at its
        deadline as if its spent tokens were not: they would be admitted again elsewhere."""
        now = self._clock.now_ns()
        loop = asyncio.get_running_loop()
        for consumer, tokens in list(self._tokens.items()):
            if tokens.pending is None and tokens.quota_lapsing(now):
                tokens.settling = True  # from now on, requests wait for the settlement
                tokens.pending = loop.create_task(self._give_back(tokens, consumer))

    async def _give_back(self, tokens: _Tokens, consumer: str) -> None:
        try:
            await self._call(tokens, consumer, 0, closing=True)
        except Exception as exc:  # Redis away: it reclaims the lease at its deadline
            log.debug("meterwall: could not settle a quiet consumer's lease: %s", exc)
        finally:
            tokens.pending, tokens.settling = None, False

    async def _settle_quiet_periodically(self) -> None:
        while self._tokens:
            await asyncio.sleep(SETTLE_EVERY_S)
            await self.settle_quiet()
        if self._settler is asyncio.current_task():
            self._settler = None

    def plan_of(self, name: str) -> Plan | None:
        plan = self._plans.get(name or self._default)
        if plan is None and name:
            if name not in self._unknown_plans:
                self._unknown_plans.add(name)
                log.warning("meterwall: plan %r is not in MW_PLANS: the default plan applies", name)
            plan = self._plans.get(self._default)
        return plan if plan is not None and plan.limited else None

    async def admit(self, consumer: str, plan_name: str, path: str) -> Verdict:
        """Spend one request's tokens, leasing more when needed. Raises when Redis fails."""
        plan = self._plan_cache.get(plan_name, _UNRESOLVED)
        if plan is _UNRESOLVED:
            plan = self._plan_cache[plan_name] = self.plan_of(plan_name)
        if plan is None:
            return UNLIMITED
        assert isinstance(plan, Plan)
        cost = 0
        if plan.quota:
            weight = self._weight_of(path)
            cost = weight if plan.unit == "units" else min(weight, 1)
        tokens = self._tokens.get(consumer)
        if tokens is None or tokens.plan is not plan:
            tokens = self._tokens[consumer] = _Tokens(plan)
        now = self._clock.now_ns()
        if plan.quota and now // 1_000_000_000 >= tokens.month_end_s:
            self._roll_month(tokens, consumer, now)
        pending = tokens.pending
        if pending is not None and pending.get_loop() is not asyncio.get_running_loop():
            # That loop is gone (or another's). A settlement it had in flight may have reached
            # Redis, which then took the leases back: what they held is not ours to spend.
            if tokens.settling:
                tokens.leases, tokens.rate, tokens.rate_return = [], 0, 0
            tokens.pending, tokens.settling = None, False
        while True:
            if tokens.settling:  # its leases are being reported final: spending one now would
                assert tokens.pending is not None  # hand a spent token back to Redis
                await asyncio.shield(tokens.pending)
                now = self._clock.now_ns()
                continue
            if tokens.rate and now >= tokens.rate_deadline_ns:
                tokens.rate_return += tokens.rate
                tokens.rate = 0
            held = tokens.quota_held(now) if cost else 0
            if (not plan.rate or tokens.rate >= 1) and (not cost or held >= cost):
                return self._spend(tokens, consumer, cost, now)
            if now < tokens.blocked_until_ns:
                return self._refusal(tokens, now)
            if tokens.pending is None:
                tokens.pending = asyncio.get_running_loop().create_task(
                    self._lease(tokens, consumer, cost)
                )
            await asyncio.shield(tokens.pending)  # a cancelled request leaves the lease running
            now = self._clock.now_ns()

    def refund(self, consumer: str, cost: int) -> None:
        """Give back the quota tokens of a request that turned out not billable (a 5xx)."""
        tokens = self._tokens.get(consumer)
        if tokens is not None:
            tokens.credit += cost  # spent again here, or given back with the next lease

    def _spend(self, tokens: _Tokens, consumer: str, cost: int, now: int) -> Verdict:
        plan = tokens.plan
        if plan.rate:
            tokens.rate -= 1
        if cost:
            left = cost - min(cost, tokens.credit)
            tokens.credit -= cost - left
            for lease in tokens.leases:
                take = min(left, lease.left(now))
                lease.spent += take
                left -= take
                if not left:
                    break
        held = tokens.quota_held(now) if plan.quota else 0
        low = (plan.rate and (tokens.rate * 2 < tokens.want or tokens.rate_lapsing(now))) or (
            plan.quota and (held * 2 < tokens.want or tokens.quota_lapsing(now))
        )
        if low and tokens.pending is None and now >= tokens.blocked_until_ns:
            tokens.pending = asyncio.get_running_loop().create_task(
                self._lease(tokens, consumer, 0)
            )
        return Verdict(headers=self._headers(tokens, now, held), cost=cost)

    def _refusal(self, tokens: _Tokens, now: int) -> Verdict:
        headers = self._headers(tokens, now, tokens.quota_held(now))
        return Verdict(tokens.blocked, max(1, tokens.retry_s), headers)

    async def _lease(self, tokens: _Tokens, consumer: str, cost: int) -> None:
        settler = self._settler
        if (
            settler is None
            or settler.done()
            or settler.get_loop() is not asyncio.get_running_loop()
        ):
            self._settler = asyncio.get_running_loop().create_task(
                self._settle_quiet_periodically(), name="meterwall-lease-settler"
            )
        try:
            await self._call(tokens, consumer, cost)
        finally:
            tokens.pending = None

    async def _call(
        self, tokens: _Tokens, consumer: str, cost: int, *, closing: bool = False
    ) -> None:
        plan = tokens.plan
        now = self._clock.now_ns()
        if now - tokens.last_call_ns < RATE_LEASE_S * 1e9 / 2:
            tokens.want = min(MAX_LEASE, tokens.want * 2)  # busy: lease more per call
        elif now - tokens.last_call_ns > 4 * RATE_LEASE_S * 1e9:
            # Idle: halved per 4 s of it rather than started again from the first size, so a
            # consumer coming back at its old pace waits for one lease, not one per doubling.
            idle_periods = int((now - tokens.last_call_ns) / (4 * RATE_LEASE_S * 1e9))
            tokens.want = max(FIRST_LEASE, tokens.want >> min(idle_periods, 16))
        tokens.last_call_ns = now
        rate_want = quota_want = 0
        if plan.rate and not closing and (tokens.rate < 1 or tokens.rate * 2 < tokens.want):
            rate_want = tokens.want
        elif plan.rate and not closing and tokens.rate_lapsing(now):
            # Renewed ahead: topped up to one lease, and the tokens held live another period
            # (held tokens stay within one lease, as before: other workers are not starved).
            rate_want = max(1, tokens.want - tokens.rate)
        held = tokens.quota_held(now)
        if plan.quota and not closing and (held < cost or held * 2 < tokens.want):
            quota_want = max(tokens.want, cost - held)
        elif plan.quota and not closing and tokens.quota_lapsing(now):
            quota_want = max(1, tokens.want - held)  # renewed ahead, topped up to one lease
        settle: list[Any] = []
        finals = []
        for lease in tokens.leases:
            final = closing or lease.left(now) == 0
            settle += [lease.id, lease.spent, "1" if final else "0"]
            if final:
                finals.append(lease)
        rate_return = tokens.rate_return + (tokens.rate if closing else 0)
        quota_return, tokens.credit = tokens.credit, 0
        keep_s = tokens.month_end_s + 7 * 86400 - now // 10**9  # a week past the month's end
        self._serial += 1
        lease_id = f"{self._writer}.{self._serial}"
        shard = self._keyspace.shard_of(consumer)
        keys = [self._keyspace.rate(shard, consumer),
                self._keyspace.quota(shard, consumer, tokens.month or "-")]  # fmt: skip
        args = [now // 1_000_000 if self._pass_time else 0,
                1000 / plan.rate if plan.rate else 0, plan.burst, rate_want, rate_return,
                plan.quota, quota_want, quota_return, lease_id,
                int((QUOTA_LEASE_S + RECLAIM_GRACE_S) * 1000), keep_s,
                SHARE, *settle]  # fmt: skip
        self.lease_calls += 1
        try:
            try:
                reply = await self._redis.evalsha(LEASE_SHA, 2, *keys, *args)
            except NoScriptError:
                reply = await self._redis.eval(LEASE_SCRIPT, 2, *keys, *args)
        except BaseException:
            tokens.credit += quota_return  # not given back: still ours
            raise
        rate_granted, rate_left, retry_ms, quota_granted, quota_left, refused = map(int, reply)
        for lease in finals:
            tokens.leases.remove(lease)
        tokens.rate_return = 0
        if closing:
            tokens.rate = 0
            return
        if rate_granted:
            tokens.rate += rate_granted
            tokens.rate_deadline_ns = now + int(RATE_LEASE_S * 1e9)
        if quota_granted:
            tokens.leases.append(_Lease(lease_id, quota_granted, now + int(QUOTA_LEASE_S * 1e9)))
        tokens.rate_left, tokens.quota_left = rate_left, quota_left
        tokens.version += 1
        if refused == 2:
            tokens.blocked, tokens.retry_s = "quota-exceeded", tokens.month_end_s - now // 10**9
            recheck = (QUOTA_LEASE_S + RECLAIM_GRACE_S) * 1e9  # reclaimed leases may free some
            tokens.blocked_until_ns = min(tokens.month_end_s * 10**9, now + int(recheck))
        elif refused == 1:
            tokens.blocked, tokens.retry_s = "rate-limited", math.ceil(retry_ms / 1000)
            tokens.blocked_until_ns = now + retry_ms * 1_000_000

    def _roll_month(self, tokens: _Tokens, consumer: str, now: int) -> None:
        now_s = now // 10**9
        if now_s < tokens.month_end_s:
            return
        zone = self._zone_of(consumer, now_s)
        local = datetime.fromtimestamp(now_s, ZoneInfo(zone))
        start = int(local.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
        tokens.month = f"{local.year:04d}-{local.month:02d}"
        tokens.month_end_s = next_month_start(local.year, local.month, zone)
        tokens.month_seconds = tokens.month_end_s - start
        tokens.version += 1
        tokens.leases.clear()  # last month's leases and credit lapse with their month
        tokens.credit = 0
        tokens.quota_left = -1
        if tokens.blocked == "quota-exceeded":
            tokens.blocked_until_ns = 0

    def _headers(self, tokens: _Tokens, now: int, held: int) -> tuple[tuple[bytes, bytes], ...]:
        """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10).

        One policy named ``rate`` and one named ``quota``; never a key or consumer id. The
        policy is the same for a whole month, so it is made once.
        """
        blocked = tokens.blocked if now < tokens.blocked_until_ns else ""
        cache_key = (tokens.version, now // 10**9, blocked)
        if tokens.header_key == cache_key:  # made at most once a second and after each lease
            return tokens.header_cache
        plan = tokens.plan
        if tokens.policy_month != tokens.month or not tokens.policy:
            tokens.policy_month = tokens.month
            policies = []
            if plan.rate:
                policies.append(
                    f'"rate";q={plan.burst};w={max(1, math.ceil(plan.burst / plan.rate))}'
                )
            if plan.quota:
                policies.append(f'"quota";q={plan.quota};w={tokens.month_seconds}')
            tokens.policy = ", ".join(policies).encode()
        states = []
        if plan.rate:
            left = min(plan.burst, tokens.rate + max(0, tokens.rate_left))
            reset = 0 if left >= plan.burst else math.ceil((plan.burst - left) / plan.rate)
            if blocked == "rate-limited":
                left, reset = 0, max(1, tokens.retry_s)
            states.append(f'"rate";r={left};t={reset}')
        if plan.quota:
            left = 0 if blocked == "quota-exceeded" else max(0, tokens.quota_left) + held
            states.append(
                f'"quota";r={min(left, plan.quota)};t={tokens.month_end_s - now // 10**9}'
            )
        headers = ((b"ratelimit-policy", tokens.policy), (b"ratelimit", ", ".join(states).encode()))
        tokens.header_key, tokens.header_cache = cache_key, headers
        return headers

    async def aclose(self) -> None:
        """Give every unspent token back (graceful shutdown).

        At the first failure the rest are left to Redis, which reclaims leases at their
        deadline: one timeout per consumer would outlast a process manager's grace period.
        """
        settler, self._settler = self._settler, None
        if settler is not None and settler.get_loop() is asyncio.get_running_loop():
            settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settler
        # (a settler of another loop is that loop's: closed, or cancelled when it closes)
        held = list(self._tokens.items())
        for done, (consumer, tokens) in enumerate(held):
            if tokens.pending is not None:
                with contextlib.suppress(Exception):
                    await tokens.pending
            if tokens.leases or tokens.rate or tokens.rate_return or tokens.credit:
                try:
                    await self._call(tokens, consumer, 0, closing=True)
                except Exception as exc:
                    log.warning(
                        "meterwall: could not give leased tokens back (%s); Redis reclaims the "
                        "leases of %d consumer(s) at their deadline", exc, len(held) - done,
                    )  # fmt: skip
                    break
        self._tokens.clear()
