"""The access decision, made before the app runs: API key, route rules, networks, scopes.

Rules match meterwall's own path patterns (the framework's route template is only known after
routing): ``{name}`` matches one path segment, a trailing ``*`` matches the rest. The first rule
whose method and pattern match decides: ``public`` needs no key, otherwise the key must carry
every scope the rule names. Routes without a rule need a valid key and no scope.

Keys are cached in process (30 s, dropped at once when a revocation is published), unknown keys
briefly too, so the steady state does no Redis I/O; a cache miss is one ``GET`` with its own
short timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .apikeys import ApiKey, KeyStore
from .capture import app_path
from .clientip import TrustedProxies
from .consumers import ConsumerRegistry
from .errors import ConfigurationError
from .keyspace import Keyspace
from .limits import Limiter
from .plugins import CallerResolver, InvalidCaller
from .types import Scope, Send

log = logging.getLogger("meterwall")

CACHE_SECONDS = 30.0
REGISTRY_SECONDS = 10.0
Networks = tuple[IPv4Network | IPv6Network, ...]
NEGATIVE_CACHE_SECONDS = 5.0
# A cached key still in use is looked up again in the background this long before its entry
# lapses: a request that found it lapsed would wait for Redis (a slow Redis's whole delay).
REFRESH_AHEAD_SECONDS = 5.0
_CACHE_LIMIT = 65536
_SEGMENT = re.compile(r"\{[^/{}]+\}")
TYPES = "https://meterwall.dev/problems/"


@dataclass(frozen=True, slots=True)
class Rule:
    methods: frozenset[str]  # empty: every method
    pattern: re.Pattern[str]
    text: str
    public: bool
    scopes: frozenset[str]


def parse_rules(text: str, *, setting: str = "MW_ACCESS_RULES") -> tuple[Rule, ...]:
    """``"/health=public, GET /docs/*=public, POST /items/*=items:write, /admin/*=admin+ops"``."""
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, eq, what = item.rpartition("=")
        words = target.split()
        if not eq or not what.strip() or len(words) not in (1, 2) or not words[-1].startswith("/"):
            raise ConfigurationError(
                setting, f"expected [METHOD] /pattern=public|scope+scope, got {item!r}"
            )
        methods = frozenset(words[0].upper().split("|")) if len(words) == 2 else frozenset()
        pattern = re.escape(words[-1]).replace(r"\*", "*").replace(r"\{", "{").replace(r"\}", "}")
        pattern = _SEGMENT.sub("[^/]+", pattern)
        pattern = pattern[:-1] + ".*" if pattern.endswith("*") else pattern
        public = what.strip() == "public"
        scopes = frozenset() if public else frozenset(s for s in what.strip().split("+") if s)
        rules.append(Rule(methods, re.compile(pattern + "$"), item, public, scopes))
    return tuple(rules)


def parse_networks(text: str, *, setting: str) -> tuple[IPv4Network | IPv6Network, ...]:
    try:
        return tuple(ip_network(p.strip()) for p in text.replace(" ", ",").split(",") if p.strip())
    except ValueError as exc:
        raise ConfigurationError(setting, str(exc)) from None


@dataclass(slots=True)
class Decision:
    """Admitted (``reason`` is empty) or denied with a status and a stable reason."""

    status: int = 0
    reason: str = ""
    key: ApiKey | None = None
    degraded: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()  # RateLimit headers, on every answer
    retry_after: int = 0
    cost: int = 0  # quota tokens spent (given back when the answer is not billable)


ADMIT = Decision()
DEGRADED = ((b"meterwall-degraded", b"access-store-unavailable"),)


class AccessControl:
    """Makes the access decision for one middleware instance."""

    def __init__(
        self, keyspace: Keyspace, server_key: bytes, rules: Sequence[Rule], *,
        header: str = "x-api-key", allow: Sequence[Any] = (), deny: Sequence[Any] = (),
        on_redis_error: str = "open", timeout: float = 0.5, limiter: Limiter | None = None,
        query_parameter: str = "", trusted_proxies: TrustedProxies | None = None,
        resolvers: Sequence[CallerResolver] = (),
    ) -> None:  # fmt: skip
        self._keyspace = keyspace
        self._server_key = server_key
        # The key cache is keyed by a keyed hash of the presented key, never by the key: BLAKE2b
        # under a key of this process only (a third of an HMAC-SHA256's cost per request).
        self._cache_key = os.urandom(32)
        self._rule_cache: dict[tuple[str, str], Rule | None] = {}
        self._rules = tuple(rules)
        self._header = header.lower().encode()
        self._allow, self._deny = tuple(allow), tuple(deny)
        self._on_error = on_redis_error
        self._timeout = timeout
        self.limiter = limiter if limiter is not None and limiter.active else None
        self._query = query_parameter
        self._resolvers = tuple(resolvers)
        self._trusted = trusted_proxies if trusted_proxies else None
        self._fences: dict[str, tuple[Networks, Networks]] | None = None  # consumer: allow, deny
        self._refresh: asyncio.Task[None] | None = None
        self._registry_due = 0.0
        self._used: dict[str, int] = {}  # key id -> minute of its last 'last used' write
        self._background: set[asyncio.Task[Any]] = set()
        self._cache: dict[bytes, tuple[float, ApiKey | None]] = {}
        self._refreshing: set[bytes] = set()  # digests being looked up again in the background
        # digest -> its lookup in Redis and the invalidation count when it started
        self._lookups: dict[bytes, tuple[asyncio.Future[Any], int]] = {}
        self._forgotten = 0  # invalidations so far: a lookup that raced one is not cached
        self._redis: Any = None
        self._listener_client: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self.degraded_decisions = 0
        self.key_events = 0  # key changes seen on the pub/sub channel (tests await them)
        self.key_event = asyncio.Event()
        self.listening = asyncio.Event()  # set once subscribed to key changes

    def bind(self, redis: Any, listener: Any) -> None:
        """Use ``redis`` (with the access timeout) for lookups and ``listener`` for revocations."""
        self._redis, self._listener_client = redis, listener
        if self.limiter is not None:
            self.limiter.bind(redis)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen(listener))

    async def _resolve(self, scope: Scope) -> tuple[ApiKey | None, Decision | None]:
        """What the resolver plugins make of the request: a caller, a refusal, or nothing."""
        for resolver in self._resolvers:
            try:
                caller = await resolver.resolve(scope)
            except InvalidCaller as exc:
                return None, Decision(401, exc.reason)
            if caller is not None:
                return ApiKey(caller.key_id, caller.consumer, "", scopes=tuple(caller.scopes)), None
        return None, None

    def _vouched(self, cached: tuple[float, ApiKey | None] | None) -> ApiKey | None:
        """The cached key if the cache may answer alone: fresh, valid now, Redis not refused."""
        if cached is None or cached[0] <= time.monotonic() or cached[1] is None:
            return None
        if self._on_error == "closed" and time.monotonic() < self._down_until:
            return None  # the slow path answers 503
        return cached[1] if cached[1].state(int(time.time())) == "valid" else None

    async def _verify(
        self, presented: str, digest: bytes, cached: tuple[float, ApiKey | None] | None
    ) -> tuple[ApiKey | None, Decision | None, bool]:
        """A key the cache could not vouch for, looked up in Redis: (key, an early answer,
        admitted from a stale cache entry while Redis is away)."""
        if self._on_error == "closed" and time.monotonic() < self._down_until:
            self.degraded_decisions += 1
            return None, Decision(503, "store-unavailable", degraded=True), False
        now = int(time.time())
        stale = False
        key: ApiKey | None
        if cached is not None and cached[0] > time.monotonic():
            key = cached[1]  # known, but not valid now (unknown, expired or revoked)
            state = "unknown" if key is None else key.state(now)
        else:
            try:
                # shielded: a request cancelled by its client must not cut a command in half
                lookup, started = self._lookup(presented, digest, now)
                key, state = await asyncio.shield(lookup)
            except Exception as exc:  # any store failure: the failure policy decides
                self._down_until = time.monotonic() + 5
                log.warning("meterwall: access check could not reach Redis: %s", exc)
                known = cached[1] if cached is not None else None
                if self._on_error == "open" and known is not None and known.state(now) == "valid":
                    key, state, stale = known, "valid", True  # known valid: admitted as is
                else:
                    self.degraded_decisions += 1
                    return None, Decision(503, "store-unavailable", degraded=True), False
            else:
                self._keep(digest, key, state, started)
        if key is None:
            reason = "malformed" if state == "malformed" else "invalid-key"
            return None, Decision(401, reason), False
        if state != "valid":  # expired or revoked: refused, and counted for its consumer
            return key, Decision(401, state, key), False
        return key, None, stale

    def rule_for(self, method: str, path: str) -> Rule | None:
        """The first rule that matches, cached per method and path (paths repeat a lot)."""
        cache_key = (method, path)
        if cache_key in self._rule_cache:
            return self._rule_cache[cache_key]
        rule = next((r for r in self._rules if (not r.methods or method in r.methods)
                     and r.pattern.match(path)), None)  # fmt: skip
        if len(self._rule_cache) >= _CACHE_LIMIT:
            self._rule_cache.clear()
        self._rule_cache[cache_key] = rule
        return rule

    async def decide(self, scope: Scope) -> Decision:
        path = app_path(scope)
        rule = self.rule_for(scope.get("method", "GET"), path)
        address = self._client_address(scope)
        if not self._network_ok(address, ()):
            return Decision(403, "network")
        key, answer = await self._resolve(scope) if self._resolvers else (None, None)
        if answer is not None:
            return answer
        stale = False
        if key is None:
            presented = self._presented_key(scope)
            if presented is None:
                return ADMIT if rule is not None and rule.public else Decision(401, "missing-key")
            digest = blake2b(presented.encode(), key=self._cache_key, digest_size=16).digest()
            cached = self._cache.get(digest)
            key = self._vouched(cached)  # the steady state: a valid key, nothing awaited
            if key is None:
                key, answer, stale = await self._verify(presented, digest, cached)
                if answer is not None:
                    return answer
            elif cached is not None and cached[0] - time.monotonic() < REFRESH_AHEAD_SECONDS:
                self._refresh_ahead(presented, digest)
        assert key is not None
        now = time.time()
        if key.cidrs and not self._network_ok(address, key.cidrs):
            return Decision(403, "network", key)
        if self._fences is not None and time.monotonic() < self._registry_due:
            fence = self._fences.get(key.consumer)
        else:
            fence = await self._consumer_networks(key.consumer)
        if fence is not None and not _fenced_ok(address, *fence):
            return Decision(403, "network", key)
        if rule is not None and not rule.public and not rule.scopes.issubset(key.scopes):
            return Decision(403, "scope", key)
        if key.digest:  # an API key (a resolver's callers have no key record)
            self._touch(key.id, int(now) // 60)
        if stale:
            return self._unlimited(key)
        if self.limiter is None:
            return Decision(0, "", key)
        if time.monotonic() < self._down_until:  # Redis was away a moment ago: no waiting
            return self._unlimited(key)
        try:
            verdict = await self.limiter.admit(key.consumer, key.plan, path)
        except Exception as exc:
            self._down_until = time.monotonic() + 5
            log.warning("meterwall: rate and quota check could not reach Redis: %s", exc)
            return self._unlimited(key)
        if verdict.reason:
            return Decision(429, verdict.reason, key, headers=verdict.headers,
                            retry_after=verdict.retry_after)  # fmt: skip
        return Decision(0, "", key, headers=verdict.headers, cost=verdict.cost)

    def refund(self, consumer: str, cost: int) -> None:
        if self.limiter is not None:
            self.limiter.refund(consumer, cost)

    def _unlimited(self, key: ApiKey) -> Decision:
        """The failure policy for the limits: ``open`` admits without them, ``closed`` refuses."""
        self.degraded_decisions += 1
        if self._on_error == "open":
            return Decision(0, "", key, degraded=True)
        return Decision(503, "store-unavailable", key, degraded=True)

    def _touch(self, key_id: str, minute: int) -> None:
        """Record when a key was last used, at most once a minute per key and process."""
        if self._used.get(key_id) == minute or self._redis is None:
            return
        if len(self._used) >= _CACHE_LIMIT:
            self._used.clear()
        self._used[key_id] = minute
        task = asyncio.get_running_loop().create_task(self._write_last_used(key_id, minute))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_last_used(self, key_id: str, minute: int) -> None:
        with contextlib.suppress(Exception):  # a lost 'last used' write costs nothing
            await self._redis.hset(self._keyspace.key_last_used(), key_id, minute * 60)

    def _client_address(self, scope: Scope) -> str | None:
        """The address network rules apply to: the same one records carry (MW_TRUSTED_PROXIES)."""
        client = scope.get("client")
        peer = client[0] if client else None
        if self._trusted is None:
            return peer
        return self._trusted.resolve(peer, scope.get("headers") or ())

    def _presented_key(self, scope: Scope) -> str | None:
        raw: bytes
        for name, raw in scope.get("headers") or ():
            if name == b"authorization" and raw[:7].lower() == b"bearer ":
                return raw[7:].strip().decode("latin-1")
            if name == self._header:
                return raw.strip().decode("latin-1")
        if self._query:  # only when MW_API_KEY_QUERY names a parameter (logged at start-up)
            query: str = scope.get("query_string", b"").decode("latin-1")
            for name_text, value in parse_qsl(query, keep_blank_values=True):
                if name_text == self._query:
                    return value.strip()
        return None

    async def _consumer_networks(self, consumer: str) -> tuple[Networks, Networks] | None:
        """The consumer's own allow and deny lists, from a snapshot of the (small) fence hash.

        The first snapshot is awaited; later ones are read in the background every
        ``REGISTRY_SECONDS`` and at once when a change is published. If Redis cannot be read,
        the last snapshot stays in force.
        """
        if self._fences is None:
            await self._read_fences()
        elif time.monotonic() >= self._registry_due and self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._read_fences())
        return (self._fences or {}).get(consumer)

    async def _read_fences(self) -> None:
        self._registry_due = time.monotonic() + REGISTRY_SECONDS
        try:
            fences = await ConsumerRegistry(self._redis, self._keyspace).fences()
        except Exception as exc:
            log.warning("meterwall: could not read the consumers' networks: %s", exc)
            if self._fences is None:
                self._registry_due = 0.0  # nothing known yet: try again with the next request
        else:
            self._fences = {c: (tuple(map(ip_network, a)), tuple(map(ip_network, d)))
                            for c, (a, d) in fences.items()}  # fmt: skip
        finally:
            self._refresh = None

    def _network_ok(self, address: str | None, cidrs: Sequence[str]) -> bool:
        """The global lists, then the key's own networks (one client, whichever IP form)."""
        if not (self._allow or self._deny or cidrs):
            return True
        if not _fenced_ok(address, self._allow, self._deny):
            return False
        return not cidrs or _fenced_ok(address, tuple(ip_network(c) for c in cidrs), ())

    def _remember(self, digest: bytes, key: ApiKey | None, state: str) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        ttl = CACHE_SECONDS if key is not None else NEGATIVE_CACHE_SECONDS
        self._cache[digest] = (time.monotonic() + ttl, key)

    async def _listen(self, redis: Any) -> None:
        """Revocations, rotations and changes reach this worker within a second."""
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._keyspace.key_events())
                    self.listening.set()
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            changed = message["data"].decode()
                            if changed.startswith("consumer:"):
                                await self._read_fences()  # a consumer's networks changed
                            else:
                                self.forget(changed)
                            self.key_events += 1
                            self.key_event.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # reconnect after any error, and start clean
                self._forgotten += 1
                self._lookups.clear()
                self._cache.clear()
                await asyncio.sleep(1)

    def _lookup(self, presented: str, digest: bytes, now: int) -> tuple[asyncio.Future[Any], int]:
        """One lookup in Redis per key at a time: the requests that find the same key missing
        from the cache (a burst after an idle spell) wait for the same answer. Returns it and
        the invalidation count when it started (``forget`` starts the next one afresh)."""
        found = self._lookups.get(digest)
        if found is None:
            store = KeyStore(self._redis, self._keyspace, self._server_key)
            found = (asyncio.ensure_future(store.verify(presented, now)), self._forgotten)
            self._lookups[digest] = found
            found[0].add_done_callback(lambda _: self._drop_lookup(digest, found))
        return found

    def _drop_lookup(self, digest: bytes, lookup: tuple[asyncio.Future[Any], int]) -> None:
        if self._lookups.get(digest) is lookup:
            del self._lookups[digest]

    def _refresh_ahead(self, presented: str, digest: bytes) -> None:
        """Look a key in use up again before its cache entry lapses, in the background."""
        if digest in self._refreshing or self._redis is None:
            return
        self._refreshing.add(digest)
        task = asyncio.get_running_loop().create_task(
            self._look_up_again(presented, digest, self._forgotten)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _look_up_again(self, presented: str, digest: bytes, forgotten: int) -> None:
        """The background half of ``_refresh_ahead``: the same shared lookup a request makes
        (requests that miss meanwhile wait for it instead of starting their own)."""
        try:
            lookup, _ = self._lookup(presented, digest, int(time.time()))
            key, state = await asyncio.shield(lookup)
        except Exception:  # the entry lapses as it would have; the failure policy applies then
            return
        finally:
            self._refreshing.discard(digest)
        self._keep(digest, key, state, forgotten)

    def _keep(self, digest: bytes, key: ApiKey | None, state: str, since: int) -> None:
        """Cache a lookup's answer unless an invalidation came after ``since`` (the count when
        the lookup was asked for): it may predate a revocation, and the next request asks."""
        if state != "malformed" and since == self._forgotten:
            self._remember(digest, key, state)

    def forget(self, key_id: str) -> None:
        self._forgotten += 1
        self._lookups.clear()  # a lookup already under way may predate the change
        for digest in [d for d, (_, k) in self._cache.items() if k is not None and k.id == key_id]:
            del self._cache[digest]

    async def aclose(self) -> None:
        if self.limiter is not None and self._redis is not None:
            await self.limiter.aclose()
        if self._refresh is not None:
            with contextlib.suppress(Exception):
                await self._refresh
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for client in (self._redis, self._listener_client):
            if client is not None:
                with contextlib.suppress(Exception):  # closing a client of a closed loop
                    await client.aclose()
        self._redis = self._listener_client = None


def _fenced_ok(address: str | None, allow: Networks, deny: Networks) -> bool:
    try:
        ip: IPv4Address | IPv6Address = ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # one client, whichever form the server reports
    return not any(ip in net for net in deny) and (not allow or any(ip in net for net in allow))


def denial(decision: Decision) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The standard answer to a refused request: status, headers and a problem+json body."""
    titles = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests",
              503: "Service Unavailable"}  # fmt: skip
    body = orjson.dumps({"type": TYPES + decision.reason, "title": titles[decision.status],
                         "status": decision.status, "detail": decision.reason})  # fmt: skip
    headers = [(b"content-type", b"application/problem+json"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    if decision.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="api"'))
    if decision.status == 503:
        headers.append((b"retry-after", b"5"))
    if decision.status == 429:
        headers.append((b"retry-after", str(max(1, decision.retry_after)).encode()))
    headers.extend(decision.headers)
    if decision.degraded:
        headers.extend(DEGRADED)
    return decision.status, headers, body


async def send_denial(decision: Decision, scope: Scope, send: Send) -> None:
    """The answer over ASGI: problem+json over HTTP, a policy close for a websocket handshake."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": decision.reason})
        return
    status, headers, body = denial(decision)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
