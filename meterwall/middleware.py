"""The ASGI middleware: a plain ASGI callable (never ``BaseHTTPMiddleware``).

Per HTTP request it wraps receive and send, lets the app run, then hands the finished exchange to
the flusher (metering in memory, queueing for sealing): no I/O, no await on Redis. Websockets and
other scopes pass straight through; lifespan messages pass through unchanged while the middleware
watches them to start the flusher and to flush everything before the server reports shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Iterable
from typing import Any

from .access import DEGRADED, AccessControl, Decision, parse_networks, parse_rules, send_denial
from .capture import Exchange, route_before_app
from .clock import SYSTEM_CLOCK, Clock
from .errors import ConfigurationError
from .flusher import Flusher
from .journal import Journal
from .limits import Limiter, PathWeights, parse_plans
from .plugins import Loaded, parse_names
from .plugins import load as load_plugins
from .pseudonyms import derive
from .settings import Settings
from .store import connect
from .types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("meterwall")

_INSTANCES: weakref.WeakSet[Meterwall] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for instance in list(_INSTANCES):
        instance.flusher.after_fork()
        if instance.access is not None and instance.access.limiter is not None:
            instance.access.limiter.after_fork()


# A forked worker (gunicorn --preload, multiprocessing) must get its own writer id: two
# processes numbering batches under one id would make the script drop one of them as duplicates.
os.register_at_fork(after_in_child=_after_fork_in_child)


class Meterwall:
    """Mount with ``app = Meterwall(app, settings=Settings.from_env())`` or ``add_middleware``.

    ``settings`` defaults to ``Settings.from_env()``, so invalid ``MW_*`` variables fail here, at
    start-up. ``clock`` is injectable for tests. Raises ``ConfigurationError``.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        journal: Journal | None = None,
        plugins: Iterable[Any] = (),
    ) -> None:
        self.app = app
        # The router a request enters, for route templates under mounts: the wrapped app's own
        # (Meterwall(app)), else the Starlette app that runs this middleware (add_middleware),
        # which is scope["app"] when a request arrives here.
        self._router_app = app if getattr(app, "router", None) is not None else None
        self.settings = settings if settings is not None else Settings.from_env()
        self.clock = clock
        self.plugins = load_plugins(parse_names(self.settings.plugins), self.settings, plugins)
        if self.plugins.resolvers and self.settings.access != "keys":
            raise ConfigurationError("MW_ACCESS", "a caller resolver plugin needs MW_ACCESS=keys")
        self.flusher = Flusher(self.settings, clock, journal, self.plugins.redactors)
        header = self.settings.consumer_header
        self._consumer_header = header.lower().encode() if header else None
        self._consumers: dict[bytes, str] = {}  # header value -> consumer id
        self._body_limit = self.settings.body_limit
        self.access = _access_control(self.settings, self.flusher, clock, self.plugins)
        if self.plugins.names:
            log.info("meterwall: plugins: %s", ", ".join(self.plugins.names))
        self._access_loop: asyncio.AbstractEventLoop | None = None
        for note in self.settings.weakened():
            log.warning("meterwall: trade-off in force: %s", note)
        if os.environ.get("MW_RECORD_PRIVATE_KEY_FILE"):
            log.warning(
                "meterwall: MW_RECORD_PRIVATE_KEY_FILE is set on an app server: the private key "
                "belongs to the reader side (trace, admin security routes) only; remove it here"
            )
        if self.settings.records == "off":
            log.warning("meterwall: MW_RECORDS=off: no raw records are kept, only counts")
        _INSTANCES.add(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":  # a handshake is a request: decided, metered
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _bind_access(self, access: AccessControl) -> None:
        """Redis clients belong to the loop they were made in: (re)bind them to this one."""
        loop = asyncio.get_running_loop()
        if self._access_loop is not loop:
            self._access_loop = loop
            access.bind(connect(self.settings, timeout=self.settings.access_timeout),
                        connect(self.settings, timeout=None, one_node=True))  # fmt: skip

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(scope, receive, send, self._body_limit, self.clock.now_ns())
        root_path = scope.get("root_path", "")
        router_app = self._router_app or scope.get("app")
        cost = 0
        try:
            if self.access is not None:
                decision = await self.decide(scope, ex)
                if decision.status:
                    await send_denial(decision, scope, ex.send)
                    ex.route = route_before_app(scope, self.app)
                    return
                cost = decision.cost
            await self.app(scope, ex.receive, ex.send)
        except BaseException:
            ex.error = True
            if not ex.status:
                ex.status = 500
            raise
        finally:
            try:
                ex.finish(root_path, router_app)
            except Exception:  # metering must never break the app
                log.exception("meterwall: could not record a request")
            else:
                self.complete(ex, cost)

    async def decide(self, scope: Scope, ex: Exchange) -> Decision:
        """The access decision for a request, noted on its exchange (adapters call this too)."""
        access = self.access
        assert access is not None
        self._bind_access(access)
        decision = await access.decide(scope)
        if decision.key is not None:
            ex.consumer, ex.key_id = decision.key.consumer, decision.key.id
        if decision.status:
            ex.denied = decision.reason
        else:
            ex.extra_headers = (
                decision.headers + DEGRADED if decision.degraded else decision.headers
            )
        return decision

    def complete(self, ex: Exchange, cost: int = 0) -> None:
        """Hand a finished exchange to the flusher; never raises into the app."""
        try:
            if cost and ex.status >= 500 and self.access is not None:
                self.access.refund(ex.consumer, cost)  # a 5xx answer carries no units
            if self._consumer_header is not None and not ex.key_id:
                ex.consumer = self._consumer(ex.scope)
            self.flusher.submit(ex)
        except Exception:  # metering must never break the app
            log.exception("meterwall: could not record a request")

    def _consumer(self, scope: Scope) -> str:
        for name, value in scope.get("headers") or ():
            if name == self._consumer_header:
                consumer = self._consumers.get(value)  # a few consumers send most requests
                if consumer is None:
                    text: str = value.decode("latin-1").strip()
                    consumer = text[:128] if text.isprintable() else ""
                    if len(self._consumers) >= 4096:  # the values come from clients
                        self._consumers.clear()
                    self._consumers[value] = consumer
                return consumer
        return ""

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.flusher.start()
            return message

        async def watch_send(message: Message) -> None:
            # Also when the app's own shutdown failed: what was captured is flushed all the same.
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        await self.app(scope, watch_receive, watch_send)

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Flush everything and stop the flusher; True if nothing was left behind.

        The flush comes first: it carries the counts, while leased tokens that cannot be given
        back are reclaimed by Redis anyway.
        """
        flushed = await self.flusher.aclose(timeout)
        if self.access is not None:
            await self.access.aclose()
            self._access_loop = None
        return flushed

    def health(self) -> dict[str, Any]:
        return self.flusher.health()


async def aclose(timeout: float = 5.0) -> bool:
    """Flush every meterwall instance of this process (for apps without lifespan events)."""
    results = [await instance.aclose(timeout) for instance in list(_INSTANCES)]
    return all(results)


def health() -> list[dict[str, Any]]:
    """The flusher state of every instance in this process (``state``: ok, degraded, stopped)."""
    return [instance.health() for instance in list(_INSTANCES)]


def _access_control(
    settings: Settings, flusher: Flusher, clock: Clock, plugins: Loaded
) -> AccessControl | None:
    if settings.access == "off":
        log.info("meterwall: MW_ACCESS=off: API keys are not checked (MW_ACCESS=keys to do so)")
        return None
    secret = settings.pseudonym_secret
    assert secret is not None  # Settings refuses MW_ACCESS=keys without it
    return AccessControl(
        settings.keyspace(), derive(secret.reveal(), "api-keys"),
        parse_rules(settings.access_rules), header=settings.api_key_header,
        allow=parse_networks(settings.access_allow, setting="MW_ACCESS_ALLOW"),
        deny=parse_networks(settings.access_deny, setting="MW_ACCESS_DENY"),
        on_redis_error=settings.access_on_redis_error, query_parameter=settings.api_key_query,
        trusted_proxies=settings.trusted_proxies, resolvers=plugins.resolvers,
        limiter=Limiter(settings.keyspace(), parse_plans(settings.plans),
                        default_plan=settings.default_plan, zone_of=flusher.zone_of,
                        weight_of=PathWeights(settings.route_weights), clock=clock),
    )  # fmt: skip
