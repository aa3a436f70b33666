"""The admin HTTP API: JSON over Starlette, bearer tokens with disjoint roles, problem+json errors.

Roles are disjoint on purpose: ``billing`` reads usage and closes periods, ``admin`` manages
consumers and API keys, ``security`` traces records; ``admin`` does not imply the others.
Tokens are shown once at creation; Redis keeps only their SHA-256 (a token carries 256 random
bits, so an unkeyed hash is enough), compared in constant time. ``/openapi.json`` is public.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .apikeys import KeyStore
from .consumers import Consumer, ConsumerRegistry, check_consumer_id
from .errors import ConfigurationError, RetentionExceeded
from .keyspace import Keyspace
from .periods import adjustments, close_period
from .settings import Settings, parse_duration
from .store import connect, eviction_policy, server_run_id, stored_shards
from .tracing import TraceQuery, Tracer, parse_instant
from .usage import DIMENSIONS, UsageReader

Role = Literal["billing", "security", "admin"]
ROLES: tuple[Role, ...] = ("billing", "security", "admin")
Handler = Callable[[Request], Awaitable[Response]]


def _token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AdminTokens:
    """Create and check admin API tokens (``mwa_<id>_<secret>``)."""

    def __init__(self, redis: Any, keyspace: Keyspace) -> None:
        self._redis = redis
        self._key = f"{keyspace.prefix}:admin:tokens"

    async def create(self, name: str, role: Role) -> str:
        """A new token; the only time it is ever shown."""
        if role not in ROLES:
            raise ConfigurationError("--role", f"use one of {', '.join(ROLES)}")
        token_id, secret = os.urandom(6).hex(), os.urandom(32).hex()
        token = f"mwa_{token_id}_{secret}"
        entry = {
            "name": name,
            "role": role,
            "sha256": _token_hash(token),
            "created": int(time.time()),
        }
        await self._redis.hset(self._key, token_id, orjson.dumps(entry))
        return token

    async def check(self, token: str) -> dict[str, Any] | None:
        """The token's entry, or None; unknown ids and wrong secrets take the same path."""
        parts = token.split("_")
        token_id = parts[1] if len(parts) == 3 and parts[0] == "mwa" else ""
        raw = await self._redis.hget(self._key, token_id) if token_id else None
        entry: dict[str, Any] = orjson.loads(raw) if raw else {"sha256": "0" * 64}
        matches = hmac.compare_digest(entry["sha256"], _token_hash(token))
        return entry if matches and raw else None


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def bad_parameter(name: str, reason: str) -> JSONResponse:
    return problem(
        400, "Bad parameter", f"{name}: {reason}", invalid_params=[{"name": name, "reason": reason}]
    )


def admin_app(
    settings: Settings, *, redis: Any = None, private_key: X25519PrivateKey | None = None
) -> Starlette:
    """The admin API for one deployment. ``redis`` defaults to a client for ``MW_REDIS_URL``.

    ``private_key`` (the reader side's, from ``MW_RECORD_PRIVATE_KEY_FILE``) enables the
    security routes; without it they answer 503.
    """
    state: dict[str, Any] = {"redis": redis, "deployed": False}
    keyspace = settings.keyspace()

    def client() -> Any:
        if state["redis"] is None:
            state["redis"] = connect(settings)
        return state["redis"]

    async def as_deployed() -> None:
        """Read and write with the deployment's shard count, recorded in Redis by its writers,
        not with whatever MW_SHARDS this process was given (the CLI does the same)."""
        nonlocal settings, keyspace
        if state["deployed"]:
            return
        shards = await stored_shards(client(), keyspace)
        if shards is None:  # no writer yet: asked again next time
            return
        if shards != settings.shards:
            settings = settings.replace(shards=shards)
            keyspace = settings.keyspace()
        state["deployed"] = True

    def guarded(role: Role, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            entry = await AdminTokens(client(), keyspace).check(token.strip()) if token else None
            if scheme.lower() != "bearer" or entry is None:
                return problem(401, "Unauthorized", "a valid bearer token is required")
            if entry["role"] != role:
                return problem(403, "Forbidden", f"this route needs the {role} role")
            request.state.actor = "token:" + str(entry.get("name", ""))
            try:
                for named in (request.path_params.get("consumer"),
                              request.query_params.get("consumer")):  # fmt: skip
                    if named is not None:  # it names keys and SCAN patterns: the usual form
                        check_consumer_id(named)
                await as_deployed()
                return await handler(request)
            except RetentionExceeded as exc:
                return bad_parameter("since", str(exc))
            except ConfigurationError as exc:
                if exc.setting == "key id":
                    return problem(404, "Not Found", exc.problem)
                if exc.setting.startswith("MW_"):
                    return problem(503, "Service Unavailable", f"{exc.setting} {exc.problem}")
                return bad_parameter(exc.setting, exc.problem)

        return endpoint

    async def usage_totals(request: Request) -> Response:
        params = request.query_params
        period, first, last, tz = (
            params.get("period"),
            params.get("from"),
            params.get("to"),
            params.get("tz"),
        )
        by = [d for d in params.get("by", "route").split(",") if d]
        consumer = request.path_params["consumer"]
        reader = UsageReader(client(), keyspace, retention_1h=settings.retention_1h,
                             retention_15m=settings.retention_15m)  # fmt: skip
        if first or last:
            if not (first and last) or period:
                return bad_parameter("from", "give period, or from and to (YYYY-MM-DD)")
            rows = await reader.totals_between(consumer, first, last, by)
            period = f"{first}..{last}"
        elif not period:
            return bad_parameter("period", "required: YYYY-MM or YYYY-MM-DD (or from and to)")
        elif tz:
            rows = await reader.totals_in_zone(consumer, period, tz, by)
        else:
            rows = await reader.totals(consumer, period, by)
        return JSONResponse({"consumer": consumer, "period": period, "rows": rows})

    async def usage_series(request: Request) -> Response:
        period = request.query_params.get("period", "")
        rows = await UsageReader(client(), keyspace).series(request.path_params["consumer"], period)
        return JSONResponse({"consumer": request.path_params["consumer"], "rows": rows})

    async def usage_top(request: Request) -> Response:
        period = request.query_params.get("period", "")
        limit = request.query_params.get("top", "10")
        if not re.fullmatch(r"[0-9]{1,5}", limit) or not 1 <= int(limit) <= 10_000:
            return bad_parameter("top", "an integer from 1 to 10000")
        measure = request.query_params.get("measure", "requests")
        rows = await UsageReader(client(), keyspace).top(period, measure=measure, n=int(limit))
        return JSONResponse({"period": period, "rows": rows})

    async def usage_adjustments(request: Request) -> Response:
        period = request.query_params.get("period", "")
        return JSONResponse(
            {"period": period, "adjustments": await adjustments(client(), keyspace, period)}
        )

    async def close(request: Request) -> Response:
        report = await close_period(client(), keyspace, request.path_params["period"])
        return JSONResponse(
            {
                "period": report.period,
                "closed": report.closed,
                "already_closed": report.already_closed,
                "not_yet": [{"consumer": c, "closable_from": at} for c, at in report.not_yet],
            }
        )

    async def consumers_list(request: Request) -> Response:
        registry = await ConsumerRegistry(client(), keyspace).all()
        return JSONResponse([_consumer(c) for _, c in sorted(registry.items())])

    async def consumer_put(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            return bad_parameter("body", "not JSON")
        if not isinstance(body, dict) or set(body) - {"name", "tz", "allow", "deny"}:
            return bad_parameter("body", "an object with optional 'name', 'tz', 'allow', 'deny'")
        for field in ("name", "tz"):
            if body.get(field) is not None and not isinstance(body[field], str):
                return bad_parameter(field, "a string")
        updated = await ConsumerRegistry(client(), keyspace).set(
            request.path_params["consumer"], name=body.get("name"), tz=body.get("tz"),
            allow=_strings(body, "allow") if "allow" in body else None,
            deny=_strings(body, "deny") if "deny" in body else None,
        )  # fmt: skip
        return JSONResponse(_consumer(updated))

    def key_store() -> KeyStore:
        return KeyStore.for_settings(client(), settings)

    async def keys_list(request: Request) -> Response:
        found = await key_store().all(request.query_params.get("consumer"))
        return JSONResponse([key.public() for key in found])

    async def key_create(request: Request) -> Response:
        body = await _json_body(request)
        allowed = {"consumer", "plan", "scopes", "cidrs", "expires", "env"}
        if not isinstance(body, dict) or set(body) - allowed or "consumer" not in body:
            return bad_parameter(
                "body", f"an object with 'consumer' and optional {sorted(allowed)}"
            )
        consumer = check_consumer_id(body["consumer"], setting="consumer")  # a string, too
        meta, full = await key_store().create(
            consumer, plan=str(body.get("plan", "")),
            scopes=tuple(_strings(body, "scopes")), cidrs=tuple(_strings(body, "cidrs")),
            expires=_integer(body, "expires"), env=str(body.get("env", "live")),
        )  # fmt: skip
        return JSONResponse({"key": full, **meta.public()}, status_code=201)

    async def key_revoke(request: Request) -> Response:
        meta = await key_store().revoke(request.path_params["key_id"])
        return JSONResponse(meta.public())

    async def key_rotate(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) - {"grace_seconds"}:
            return bad_parameter("body", "an object with optional 'grace_seconds'")
        grace = _integer(body, "grace_seconds", 86400)
        meta, full = await key_store().rotate(request.path_params["key_id"], grace)
        return JSONResponse({"key": full, **meta.public()})

    async def trace(request: Request) -> Response:
        if private_key is None:
            return problem(503, "Service Unavailable",
                           "MW_RECORD_PRIVATE_KEY_FILE is not set on the admin server")  # fmt: skip
        params = request.query_params
        since = params.get("since")
        query = TraceQuery(
            ip=params.get("ip"), subnet=params.get("subnet"), consumer=params.get("consumer"),
            key_id=params.get("key_id"), route=params.get("route"), status=params.get("status"),
            since_ns=int((time.time() - parse_duration("since", since)) * 1e9) if since
            else parse_instant("from", params.get("from")),
            until_ns=parse_instant("to", params.get("to")),
        )  # fmt: skip
        tracer = Tracer(client(), settings, private_key, actor=request.state.actor)
        found = await tracer.trace(query)
        return JSONResponse(
            {"query": found.query, "summary": found.summary(), "records": found.records}
        )

    async def health(request: Request) -> Response:
        """The deployment as Redis sees it (app workers report their own via health())."""
        redis = client()
        started = time.perf_counter()
        await redis.ping()
        latency_ms = (time.perf_counter() - started) * 1000
        shards = await stored_shards(redis, keyspace) or keyspace.shards
        async with redis.pipeline(transaction=False) as pipe:
            for shard in range(shards):
                pipe.hgetall(keyspace.stats(shard))
            replies = await pipe.execute()
        totals: dict[str, int] = {}
        for fields in replies:
            for name, value in fields.items():
                totals[name.decode()] = totals.get(name.decode(), 0) + int(value)
        policy = await eviction_policy(redis)
        return JSONResponse({
            "redis": {"ping_ms": round(latency_ms, 3), "eviction_policy": policy,
                      "run_id": await server_run_id(redis)},
            "shards": shards,
            "counts": totals,  # every field of the stats hashes (docs/keyspace.md), summed
            "warnings": [] if policy in (None, "noeviction") else
                        [f"maxmemory-policy is {policy}: counts may be lost or doubled"],
        })  # fmt: skip

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    routes = [
        Route("/openapi.json", openapi),
        Route("/usage", guarded("billing", usage_top)),
        Route("/usage/adjustments", guarded("billing", usage_adjustments)),
        Route("/usage/{consumer}", guarded("billing", usage_totals)),
        Route("/usage/{consumer}/series", guarded("billing", usage_series)),
        Route("/periods/{period}/close", guarded("billing", close), methods=["POST"]),
        Route("/consumers", guarded("admin", consumers_list)),
        Route("/consumers/{consumer}", guarded("admin", consumer_put), methods=["PUT"]),
        Route("/health", guarded("admin", health)),
        Route("/trace", guarded("security", trace)),
        Route("/keys", guarded("admin", keys_list)),
        Route("/keys", guarded("admin", key_create), methods=["POST"]),
        Route("/keys/{key_id}/revoke", guarded("admin", key_revoke), methods=["POST"]),
        Route("/keys/{key_id}/rotate", guarded("admin", key_rotate), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if state["redis"] is not None and redis is None:  # ours: close it with the server
            await state["redis"].aclose()
            state["redis"] = None

    async def not_routed(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        title = "Method Not Allowed" if status == 405 else "Not Found"
        answer = problem(status, title, f"{request.method} {request.url.path}: no such route")
        answer.headers.update(getattr(exc, "headers", None) or {})  # Allow, for a 405
        return answer

    handlers = {404: not_routed, 405: not_routed}  # problem+json, as every other answer
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


async def _json_body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        raise ConfigurationError("body", "not JSON") from None


def _strings(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(name, "a list of strings")
    return value


def _integer(body: dict[str, Any], name: str, default: int = 0) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(name, "a non-negative integer")
    return value


def _consumer(consumer: Consumer) -> dict[str, Any]:
    return {
        "id": consumer.id,
        "name": consumer.name,
        "tz": consumer.tz,
        "next_tz": consumer.next_tz or None,
        "next_from": consumer.next_from or None,
        "allow": list(consumer.allow),
        "deny": list(consumer.deny),
    }


def _param(
    name: str, description: str, *, required: bool = False, where: str = "query"
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "description": description,
        "schema": {"type": "string"},
    }


_PERIOD = _param("period", "YYYY-MM or YYYY-MM-DD in the consumer's billing zone", required=True)
_CONSUMER = _param("consumer", "consumer id", where="path")
_ERRORS = {
    "400": {"description": "a parameter is invalid (problem+json naming it)"},
    "401": {"description": "missing or invalid bearer token"},
    "403": {"description": "the token's role may not use this route"},
}


def _op(summary: str, role: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": f"Role: {role}.",
        "parameters": params,
        "security": [{"bearer": []}],
        "responses": {"200": {"description": "JSON"}, **_ERRORS},
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "meterwall admin API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/usage": {
            "get": _op(
                "Top consumers of a period",
                "billing",
                [
                    _PERIOD,
                    _param("top", "how many (1-10000)"),
                    _param("measure", "requests|units|bytes_in|bytes_out"),
                ],
            )
        },
        "/usage/adjustments": {
            "get": _op("Deltas that arrived after a close", "billing", [_PERIOD])
        },
        "/usage/{consumer}": {
            "get": _op(
                "A consumer's usage of a period",
                "billing",
                [
                    _CONSUMER,
                    {**_PERIOD, "required": False},
                    _param("from", "first local day YYYY-MM-DD (with to, instead of period)"),
                    _param("to", "last local day YYYY-MM-DD"),
                    _param("tz", "another zone than the consumer's (served from UTC buckets)"),
                    _param("by", "comma list of " + ",".join(DIMENSIONS)),
                ],
            )
        },
        "/usage/{consumer}/series": {
            "get": _op("One row per local day", "billing", [_CONSUMER, _PERIOD])
        },
        "/periods/{period}/close": {
            "post": _op("Close a month", "billing", [_param("period", "YYYY-MM", where="path")])
        },
        "/consumers": {"get": _op("The consumer registry", "admin", [])},
        "/consumers/{consumer}": {
            "put": _op(
                "Create or change a consumer (JSON name, tz, allow, deny: CIDR lists)",
                "admin",
                [_CONSUMER],
            )
        },
        "/health": {
            "get": _op(
                "Redis reachability, eviction policy and the deployment's counts of "
                "dropped, expired and late records",
                "admin",
                [],
            )
        },
        "/trace": {
            "get": _op(
                "A subject's records within the retention window, opened (audited)",
                "security",
                [
                    _param("ip", "an IP address"),
                    _param("subnet", "a network (CIDR)"),
                    _param("consumer", "consumer id"),
                    _param("key_id", "API key id"),
                    _param("route", "route template filter"),
                    _param("status", "status (429) or class (5xx) filter"),
                    _param("since", "how far back, e.g. 6h (default: the whole window)"),
                    _param("from", "start, ISO 8601 (instead of since)"),
                    _param("to", "end, ISO 8601 (default: now)"),
                ],
            )
        },
        "/keys": {
            "get": _op("API keys (never a secret)", "admin", [_param("consumer", "consumer id")]),
            "post": _op(
                "Create a key (JSON consumer, plan, scopes, cidrs, expires, env); the answer "
                "holds the key, shown this once",
                "admin",
                [],
            ),
        },
        "/keys/{key_id}/revoke": {
            "post": _op("Revoke a key", "admin", [_param("key_id", "key id", where="path")])
        },
        "/keys/{key_id}/rotate": {
            "post": _op(
                "A new secret (JSON grace_seconds: how long the old one works, default 86400)",
                "admin",
                [_param("key_id", "key id", where="path")],
            )
        },
    },
}
