"""Hostile input: whatever a client sends, the app sees it unchanged, the middleware never raises,
and nothing secret is stored in clear (hypothesis, real Redis, records opened)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from meterwall import Meterwall, Settings
from meterwall.reader import RecordReader

SECRET = "s3cr3t-9f8e7d6c5b4a39281706"  # in every request's credentials and body
ADDRESSES = st.one_of(
    st.none(),
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}"),
    st.sampled_from(["", "not-an-ip", "999.1.1.1", "fe80::1%eth0", "unix:/tmp/x"]),
)
NAMES = st.sampled_from(
    [b"x-custom", b"X-Mixed-Case", b"accept", b"x-forwarded-for", b"cookie", b"x-api-key",
     b"content-type", b"x\r\ninjected", b"\xff\xfe"]
)  # fmt: skip
VALUES = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"a\r\nb", b"\x00", b"203.0.113.7, 10.0.0.1", "é".encode(), b" " * 9000]),
)
BODIES = st.one_of(
    st.just(json.dumps({"user": "ada", "password": SECRET}).encode()),
    st.just(f"password={SECRET}&x=1".encode()),
    st.binary(max_size=300),
    st.just(b'{"password": "' + SECRET.encode() + b'", "deep": ' + b"[" * 2000),  # malformed
    st.just(b"\xff\xfe" + SECRET.encode()),  # invalid UTF-8
    st.just(b"x" * 40_000),  # over the capture limit
)
CONTENT_TYPES = st.sampled_from(
    [b"application/json", b"application/x-www-form-urlencoded", b"text/plain",
     b"multipart/form-data; boundary=x", b"\xff"]
)  # fmt: skip


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    body = draw(BODIES)
    size = draw(st.sampled_from([64, 1000, 1 << 20]))
    chunks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    headers = [(b"authorization", b"Bearer " + SECRET.encode()),
               (b"content-type", draw(CONTENT_TYPES))]  # fmt: skip
    headers += draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    client = draw(ADDRESSES)
    return {
        "scope": {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": draw(st.sampled_from(["GET", "POST", "BREW", "get", ""])),
            "scheme": "http",
            "path": draw(st.sampled_from(["/", "/a/b", "/%00", "/é"])),
            "raw_path": b"/",
            "root_path": "",
            "query_string": draw(
                st.sampled_from([b"", f"token={SECRET}&q=1".encode(), b"%zz=%%", b"a=\xff"])
            ),
            "headers": headers,
            "client": None if client is None else (client, 1234),
            "server": draw(st.sampled_from([None, ("api.test", 80), ("::1", None)])),
        },
        "chunks": chunks,
    }


class Echo:
    """Reads the whole body, remembers what it saw, answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[tuple[bytes, bytes]], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((list(scope["headers"]), body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def exchange(settings: Settings, private_key: Any, request: dict[str, Any]) -> None:
    app = Echo()
    mw = Meterwall(app, settings=settings)
    chunks = list(request["chunks"])

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        return None

    sent_headers = list(request["scope"]["headers"])
    await mw(dict(request["scope"]), receive, send)  # never raises into the caller
    assert await mw.aclose()
    [(headers, body)] = app.seen
    assert headers == sent_headers  # the app saw the request unchanged
    assert body == b"".join(request["chunks"])
    from redis.asyncio import Redis

    async with Redis.from_url(settings.redis_url) as redis:
        records = await RecordReader(redis, settings, private_key).records()
        for key in await redis.keys(f"{settings.key_prefix}:*"):
            await redis.delete(key)  # the next example starts from an empty keyspace
    assert len(records) == 1
    assert SECRET not in json.dumps(records[0])  # masked, fingerprinted or digested


@hypothesis_settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(request=requests())
def test_hostile_requests_pass_through_unchanged_and_nothing_secret_is_kept(
    settings: Settings, private_key: Any, request: dict[str, Any]
) -> None:
    own = settings.replace(flush_interval=60, body_limit=32_768)
    asyncio.run(exchange(own, private_key, request))
