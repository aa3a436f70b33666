"""meterwall for aiohttp.web: the same capture, access control, metering and sealed records.

Call ``setup(app, settings)`` before the app starts: aiohttp freezes its middlewares and its
cleanup hooks at start-up, so a bare middleware factory could not register the final flush.

What differs from the ASGI middleware (documented in the README):

* aiohttp has no public way to tee a request body while the handler streams it. When the body's
  length is known and within ``MW_BODY_LIMIT`` it is read ahead (aiohttp keeps it, so the handler
  reads it again for free); otherwise only its size (``Content-Length``, when sent) and type are
  recorded, and it is marked truncated.
* The duration of a plain ``Response`` ends when the handler returns it (aiohttp writes it
  afterwards); a streamed response is timed to its first byte by ``on_response_prepare``.
* A refused websocket handshake gets the HTTP answer (401/403/429), since aiohttp decides before
  the upgrade; the ASGI middleware can only close the socket (code 1008).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from meterwall import Meterwall, Settings
from meterwall.access import denial
from meterwall.capture import UNMATCHED, Exchange
from meterwall.clock import SYSTEM_CLOCK, Clock
from meterwall.types import Message

__all__ = ["plugin", "setup"]

_CORE = web.AppKey("meterwall", Meterwall)
_REQUEST_EXCHANGE = web.RequestKey("meterwall.exchange", tuple)
_REQUEST_PREPARED = web.RequestKey("meterwall.prepared", web.StreamResponse)


async def _no_receive() -> Message:  # the adapter never reads through ASGI
    return {"type": "http.disconnect"}


async def _no_send(message: Message) -> None:  # the adapter never writes through ASGI
    return None


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("meterwall_aiohttp serves aiohttp, not ASGI")


def setup(app: web.Application, settings: Settings | None = None, *,
          clock: Clock = SYSTEM_CLOCK) -> Meterwall:  # fmt: skip
    """Mount meterwall on ``app``; returns the core (``health()``, ``aclose()``)."""
    core = Meterwall(_no_app, settings=settings, clock=clock)
    app[_CORE] = core
    app.middlewares.append(_middleware(core))
    app.on_response_prepare.append(_on_prepare)
    app.on_startup.append(_start)
    app.on_cleanup.append(_cleanup)
    return core


async def _start(app: web.Application) -> None:
    app[_CORE].flusher.start()


async def _cleanup(app: web.Application) -> None:
    await app[_CORE].aclose()  # the final flush


def _middleware(core: Meterwall) -> Any:
    body_limit = core.settings.body_limit

    @web.middleware
    async def meterwall_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        scope = _scope(request)
        ex = Exchange(scope, _no_receive, _no_send, body_limit, core.clock.now_ns())
        t0 = time.perf_counter_ns()
        request[_REQUEST_EXCHANGE] = (ex, t0)
        cost = 0
        try:
            if core.access is not None:
                decision = await core.decide(scope, ex)
                if decision.status:
                    status, headers, body = denial(decision)
                    ex.status, ex.bytes_out = status, len(body)
                    _finish(ex, request, t0)
                    core.complete(ex)
                    return web.Response(status=status, body=body, headers=_text(headers))
                cost = decision.cost
            await _read_ahead(request, ex, body_limit)  # a refused body is never read, as in ASGI
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:  # a raised answer is an answer (404, 403, ...)
            ex.status, ex.bytes_out = exc.status, _size(exc.body)
            _finish(ex, request, t0)
            core.complete(ex, cost)
            raise
        except BaseException:
            ex.error = True
            prepared = request.get(_REQUEST_PREPARED)
            if prepared is not None:  # the status line went out: that is what the client got
                ex.status, ex.bytes_out = prepared.status, _bytes_sent(prepared)
            ex.status = ex.status or 500
            _finish(ex, request, t0)
            core.complete(ex, cost)
            raise
        _finish(ex, request, t0)
        ex.status = ex.status or response.status
        if response.prepared:  # streamed: its bytes are written already
            ex.bytes_out = _bytes_sent(response)
        else:
            ex.bytes_out = _size(getattr(response, "body", None))
        core.complete(ex, cost)
        return response

    return meterwall_middleware


def _bytes_sent(response: web.StreamResponse) -> int:
    """A prepared response's bytes so far: ``body_length`` is set only by ``write_eof``, which
    aiohttp calls after the middleware returns (or never, when the handler raised)."""
    writer = getattr(response, "_payload_writer", None)  # gone once write_eof ran
    return response.body_length or int(getattr(writer, "output_size", 0))


def _finish(ex: Exchange, request: web.Request, t0: int) -> None:
    ex.duration_ns = time.perf_counter_ns() - t0
    if ex.ttfb_ns < 0:  # a plain Response starts going out when the handler returns it
        ex.ttfb_ns = ex.duration_ns
    ex.route = _template(request)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers go out: the time to the first byte of a streamed answer, the RateLimit headers."""
    noted = request.get(_REQUEST_EXCHANGE)
    if noted is None:
        return
    ex, t0 = noted
    request[_REQUEST_PREPARED] = response
    if ex.ttfb_ns < 0:
        ex.ttfb_ns = time.perf_counter_ns() - t0
    for name, value in ex.extra_headers:
        response.headers[name.decode()] = value.decode()


async def _read_ahead(request: web.Request, ex: Exchange, limit: int) -> None:
    """Capture the body when aiohttp can keep it for the handler (length known, within limit)."""
    length = request.content_length
    if not request.body_exists:
        return
    if length is not None and length <= limit:
        body = await request.read()  # cached: the handler's read() gets the same bytes
        ex.body, ex.bytes_in = [body], len(body)
    else:
        ex.bytes_in, ex.truncated = length or 0, True


def _scope(request: web.Request) -> dict[str, Any]:
    """An ASGI-shaped view of the request: what the access check and the records read."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    sock = transport.get_extra_info("sockname") if transport is not None else None
    version = request.version
    return {
        "type": "http",
        "method": request.method,
        "scheme": request.scheme,
        "http_version": f"{version.major}.{version.minor}",
        "path": request.path,
        "raw_path": request.raw_path.encode(),
        "query_string": request.query_string.encode(),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": (peer[0], peer[1]) if isinstance(peer, tuple) else None,
        "server": (sock[0], sock[1]) if isinstance(sock, tuple) else None,
    }


def _template(request: web.Request) -> str:
    """The matched resource's pattern (``/items/{id}``), never the raw path."""
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    if resource is None:
        return UNMATCHED
    canonical: str = resource.canonical
    return canonical


def _size(body: object) -> int:
    return len(body) if isinstance(body, bytes | bytearray) else 0


def _text(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers}


class _Plugin:
    """What ``meterwall plugins list`` shows for this package."""

    name = "aiohttp"
    kind = "adapter"
    summary = "meterwall for aiohttp.web: meterwall_aiohttp.setup(app, settings)"


plugin = _Plugin()
