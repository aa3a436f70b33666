"""Capture: what one HTTP exchange looked like, observed by wrapping ASGI receive and send.

This is the request path, so it only copies references and adds integers: the request body is
teed up to the capture limit as it streams to the app (the app still gets every byte), the
response is passed through untouched (streaming responses are never buffered), and everything
expensive (client-IP resolution, redaction, pseudonyms, sealing) happens later in the flusher.
"""

from __future__ import annotations

import os
import time
from itertools import chain
from typing import Any, NamedTuple

from .types import Message, Receive, Scope, Send

UNMATCHED = "<unmatched>"


class Captured(NamedTuple):
    """A finished exchange as it waits to be sealed: plain values only.

    An ``Exchange`` holds the scope (the app, the router, per-request state) and the server's
    receive and send callables (its connection objects). Kept for a flush interval, thousands of
    them would keep all of that alive and hand the garbage collector tens of thousands of
    containers to walk on every pass: under load that was 13 µs per request and pauses of up to
    50 ms. This tuple holds bytes, strings and numbers; the server's objects are freed with the
    request.

    Queued, it is a plain tuple (``Exchange.captured``) whose headers are one flat run of names
    and values: the collector untracks a tuple of bytes, strings and numbers at its first pass,
    but a tuple of tracked tuples only one nesting level per pass, so nested headers would ride
    into the oldest generation and trigger full collections. ``Captured.from_row`` reads it.
    """

    start_ns: int
    method: str
    path: str
    query_string: bytes
    scheme: str
    http_version: str
    server: Any  # (host, port) or None
    client: Any  # (host, port) or None
    headers: tuple[tuple[bytes, bytes], ...]
    route: str
    consumer: str
    key_id: str
    denied: str
    status: int
    error: bool
    disconnected: bool
    duration_ns: int
    ttfb_ns: int
    bytes_in: int
    bytes_out: int
    body: bytes
    truncated: bool

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Captured:
        """A queued row (``Exchange.captured``), with its headers paired again."""
        flat = row[8]
        return cls._make((*row[:8], tuple(zip(flat[::2], flat[1::2], strict=True)), *row[9:]))


class Exchange:
    """One request and its response, as seen by the middleware.

    ``receive`` and ``send`` are the wrappers handed to the app. Times are nanoseconds: ``start_ns``
    on the wall clock, durations from the monotonic clock.
    """

    __slots__ = (
        "_body_limit",
        "_body_sent",
        "_receive",
        "_send",
        "_sent_all",
        "_t0",
        "body",
        "bytes_in",
        "bytes_out",
        "consumer",
        "denied",
        "disconnected",
        "duration_ns",
        "error",
        "extra_headers",
        "key_id",
        "route",
        "scope",
        "start_ns",
        "status",
        "truncated",
        "ttfb_ns",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, body_limit: int, start_ns: int
    ) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._body_limit = body_limit
        self._t0 = time.perf_counter_ns()
        self.start_ns = start_ns
        self.body: list[bytes] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.ttfb_ns = -1
        self.duration_ns = 0
        self.truncated = False
        self.disconnected = False
        self.error = False
        self.route = UNMATCHED
        self.consumer = ""
        self.key_id = ""
        self.denied = ""  # the access decision's reason when the request was refused
        self.extra_headers: tuple[tuple[bytes, bytes], ...] = ()  # added to the response start
        self._body_sent = True  # whether response body bytes reach the client (not for HEAD)
        self._sent_all = False  # the response is complete

    async def receive(self) -> Message:
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                kept = self.bytes_in
                self.bytes_in = kept + len(chunk)
                room = self._body_limit - kept
                if room >= len(chunk):
                    self.body.append(chunk)
                else:
                    if room > 0:
                        self.body.append(chunk[:room])
                    self.truncated = True
        elif kind == "http.disconnect" and not self._sent_all:
            # Streaming and file responses keep listening, and servers answer a disconnect once
            # the response is complete: only one before the last body byte is the client's.
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self._body_sent:  # not for HEAD, 1xx, 204 or 304: the server sends no body
                self.bytes_out += len(message.get("body", b""))
            if not message.get("more_body", False):
                self._sent_all = True
        elif kind == "http.response.start":
            status = self.status = message["status"]
            self.ttfb_ns = time.perf_counter_ns() - self._t0
            self._body_sent = not (
                status < 200 or status in (204, 304) or self.scope.get("method") == "HEAD"
            )
            if self.extra_headers:
                message = {**message, "headers": [*message.get("headers", ()), *self.extra_headers]}
        elif kind in ("http.response.pathsend", "http.response.zerocopysend"):
            self._sent_all = True
            if self._body_sent:
                self.bytes_out += _file_size(message)
        elif kind == "websocket.accept":  # frames are not captured: the handshake's answer is
            self.status = 101
            self.ttfb_ns = time.perf_counter_ns() - self._t0
        elif kind == "websocket.close" and not self.status:  # refused: the server answers 403
            self.status = 403
        elif kind == "websocket.http.response.start":  # refused with a response of the app's
            self.status = message["status"]
            self.ttfb_ns = time.perf_counter_ns() - self._t0
        try:
            await self._send(message)
        except OSError:
            self.disconnected = True
            raise

    def captured(self) -> tuple[Any, ...]:
        """What the flusher keeps of this finished exchange: the fields of ``Captured`` as a
        plain tuple with flat headers, which the collector stops tracking at its first pass (a
        named tuple stays tracked for as long as it lives). ``Captured.from_row`` reads it."""
        scope = self.scope
        body = self.body
        return (
            self.start_ns, scope.get("method", "GET"), scope.get("path", ""),
            scope.get("query_string", b""), scope.get("scheme", "http"),
            scope.get("http_version", ""), scope.get("server"), scope.get("client"),
            tuple(chain.from_iterable(scope.get("headers") or ())), self.route, self.consumer,
            self.key_id, self.denied, self.status, self.error, self.disconnected,
            self.duration_ns, self.ttfb_ns, self.bytes_in, self.bytes_out,
            body[0] if len(body) == 1 else b"".join(body), self.truncated,
        )  # fmt: skip

    def finish(self, root_path: str, app: Any = None) -> None:
        """Called once the app returned or raised: fix the duration and the route template
        (unless one is known already: a refused request's, found before the app ran).
        ``app``: the application whose router the request entered (see ``route_template``)."""
        self.duration_ns = time.perf_counter_ns() - self._t0
        if self.route == UNMATCHED:
            self.route = route_template(self.scope, root_path, app)


def _file_size(message: Message) -> int:
    """The bytes a ``pathsend`` or ``zerocopysend`` message (ASGI extensions) hands the server."""
    try:
        if message["type"] == "http.response.pathsend":
            return os.stat(message["path"]).st_size
        count = message.get("count")
        if count is None:
            file = message["file"]
            size = os.fstat(file if isinstance(file, int) else file.fileno()).st_size
            return max(0, size - int(message.get("offset") or 0))
        return int(count)
    except (OSError, KeyError, TypeError, ValueError):  # the server will report it, not us
        return 0


def app_path(scope: Scope) -> str:
    """The path the app routes on: ``path`` less the server's ``root_path``.

    An ASGI server started with a root path (``uvicorn --root-path /api`` behind a proxy that
    strips ``/api``) puts it in front of ``path``, and Starlette removes it again before routing.
    Access rules and route weights are written against the app's routes, so they match this.
    """
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def route_template(scope: Scope, root_path: str, app: Any = None) -> str:
    """The matched route's path pattern, never the raw path.

    Starlette (and FastAPI) routers leave the matched route in ``scope["route"]`` and grow
    ``root_path`` by the prefix of every ``Mount`` they went through, so the template is that
    prefix plus the route's own pattern. The mounts are looked up from ``app``'s router (the
    one the request entered): a mounted sub-application replaces ``scope["app"]`` with itself.
    """
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    mounted: str = scope.get("root_path", "")[len(root_path) :]
    if mounted:  # the matched prefix is raw text ("/t/acme"): find the mounts' own patterns
        mounted = _mount_template(app if app is not None else scope.get("app"), mounted)
    if not hasattr(route, "endpoint"):  # a Mount whose app is not a router (static files, ...)
        return (mounted if mounted.endswith(path) else mounted + path) + "/{path}"
    return mounted + path


def route_before_app(scope: Scope, app: Any) -> str:
    """The route template a request would reach, for requests refused before the app ran.

    The ledger counts refusals by route too, so the router is asked (Starlette and FastAPI:
    ``router.routes`` with ``matches``); anything else, or no match, is ``<unmatched>``.
    """
    router = getattr(scope.get("app"), "router", None) or getattr(app, "router", None)
    routes: Any = getattr(router, "routes", None)
    template, child = "", dict(scope)
    while routes:
        for candidate in routes:
            matches = getattr(candidate, "matches", None)
            if matches is None:
                continue
            match, extra = matches(child)
            if getattr(match, "name", "") != "FULL":
                continue
            path = getattr(candidate, "path", "")
            if hasattr(candidate, "endpoint"):
                return template + path
            nested = getattr(candidate, "routes", None)
            if nested is None:  # a mount of another kind of app (static files, ...)
                return template + path + "/{path}"
            template, routes = template + path, nested
            child = {**child, **extra}
            break
        else:
            return UNMATCHED
    return UNMATCHED


def _mount_template(app: Any, mounted: str) -> str:
    """The path patterns of the mounts that consumed ``mounted``, or ``<mounted>``.

    Raw path text must never reach the counters: it may hold identifiers or secrets, and it
    makes their cardinality unbounded.
    """
    routes: Any = getattr(getattr(app, "router", None), "routes", None)
    template, rest = "", mounted
    while rest:
        for candidate in routes or ():
            regex = getattr(candidate, "path_regex", None)
            if regex is None or hasattr(candidate, "endpoint") or not hasattr(candidate, "routes"):
                continue
            match = regex.match(rest + "/")
            if match is not None and "path" in match.groupdict():
                consumed = rest[: match.start("path") - 1]
                if consumed:
                    template += candidate.path
                    rest = rest[len(consumed) :]
                    routes = candidate.routes
                    break
        else:
            return "<mounted>"
    return template


#: Methods counted under their own name; anything else a client sends is counted as OTHER.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
