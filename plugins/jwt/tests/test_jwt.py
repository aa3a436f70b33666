"""meterwall_jwt: what a JWT must pass, what each rejection is called, the path through meterwall.

Valid tokens are made with PyJWT; the forgeries (``alg: none``, an HS256 token keyed with the RSA
public key) are crafted by hand, because PyJWT rightly refuses to make them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import meterwall_jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key
from meterwall_jwt import JwtResolver, plugin
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from meterwall import Meterwall
from meterwall.apikeys import KeyStore
from meterwall.errors import ConfigurationError
from meterwall.plugins import Caller, InvalidCaller, describe
from meterwall.pseudonyms import derive
from meterwall.reader import RecordReader
from meterwall.retention import key_parts
from meterwall.usage import UsageReader

ISSUER = "https://id.example.com/"
AUDIENCE = "https://api.example.com"
SECRET = "an-hs256-secret-of-at-least-32-bytes!!"
ENV = ("MW_JWT_ISSUER", "MW_JWT_AUDIENCE", "MW_JWT_ALGORITHMS", "MW_JWT_KEY", "MW_JWT_KEY_FILE",
       "MW_JWT_CONSUMER_CLAIM", "MW_JWT_LEEWAY")  # fmt: skip


# --- keys, tokens and requests -------------------------------------------------------------------


def pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.fixture(scope="module")
def rsa_key() -> RSAPrivateKey:
    return generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "acme", "iat": now,
                            "exp": now + 300, "scope": "items:read items:list"}  # fmt: skip
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}  # None: leave the claim out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: unsigned, or HMAC-keyed with whatever we like."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def request(token: str | None = None, scheme: str = "Bearer") -> dict[str, Any]:
    headers = [] if token is None else [(b"authorization", f"{scheme} {token}".encode())]
    return {"type": "http", "method": "GET", "path": "/x", "headers": headers}


def resolver_for(algorithm: str, rsa_key: RSAPrivateKey, ed_key: Ed25519PrivateKey,
                 **options: Any) -> tuple[JwtResolver, Any]:  # fmt: skip
    """A resolver for ``algorithm`` and the key that signs its tokens."""
    signing: Any = {"HS256": SECRET, "RS256": rsa_key, "EdDSA": ed_key}[algorithm]
    verifying = SECRET if algorithm == "HS256" else pem(signing)
    resolver = JwtResolver(issuer=ISSUER, audience=AUDIENCE, key=verifying,
                           algorithms=(algorithm,), **options)  # fmt: skip
    return resolver, signing


# --- accepted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "EdDSA"])
async def test_a_valid_token_names_its_caller(algorithm, rsa_key, ed_key) -> None:
    resolver, signing = resolver_for(algorithm, rsa_key, ed_key)
    token = jwt.encode(claims(), signing, algorithm=algorithm)
    caller = await resolver.resolve(request(token))
    assert caller is not None
    assert (caller.consumer, caller.scopes) == ("acme", frozenset({"items:read", "items:list"}))
    assert caller.key_id.startswith("jwt-")
    assert len(caller.key_id) == 20
    assert token not in repr(resolver)
    assert token.split(".")[2] not in caller.key_id


async def test_key_id_is_stable_per_client_and_scopes_may_be_a_list(rsa_key, ed_key) -> None:
    resolver, signing = resolver_for("EdDSA", rsa_key, ed_key, consumer_claim="org")
    first = await resolver.resolve(request(jwt.encode(
        claims(org="globex", azp="mobile-app", scope=None, scp=["a", "b"], jti="1"), signing,
        algorithm="EdDSA")))  # fmt: skip
    renewed = await resolver.resolve(request(jwt.encode(
        claims(org="globex", azp="mobile-app", scope=None, scp=["a", "b"], jti="2"), signing,
        algorithm="EdDSA")))  # fmt: skip
    other_client = await resolver.resolve(request(jwt.encode(
        claims(org="globex", client_id="web-app"), signing, algorithm="EdDSA")))  # fmt: skip
    assert first is not None
    assert renewed is not None
    assert other_client is not None
    assert (first.consumer, first.scopes) == ("globex", frozenset({"a", "b"}))
    assert first.key_id == renewed.key_id != other_client.key_id  # a renewal keeps its key id
    expected = hashlib.sha256(f"{ISSUER}\x00azp\x00mobile-app".encode()).hexdigest()[:16]
    assert first.key_id == "jwt-" + expected


async def test_the_leeway_admits_a_token_just_past_exp_without_caching_it(rsa_key, ed_key) -> None:
    resolver, signing = resolver_for("HS256", rsa_key, ed_key, leeway=30)
    now = int(time.time())
    token = jwt.encode(claims(exp=now - 10, nbf=now + 10), signing, algorithm="HS256")
    assert await resolver.resolve(request(token)) is not None
    assert resolver._cache == {}  # past its exp: verified again on every request


# --- rejected ------------------------------------------------------------------------------------


def forged(case: str, rsa_key: RSAPrivateKey) -> str:
    now = int(time.time())
    if case == "bad signature":
        return jwt.encode(claims(), generate_private_key(65537, 2048), algorithm="RS256")
    if case == "tampered signature":
        head, body, signature = jwt.encode(claims(), rsa_key, algorithm="RS256").split(".")
        middle = len(signature) // 2
        flipped = "A" if signature[middle] != "A" else "B"
        return f"{head}.{body}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    if case == "tampered payload":
        head, _, signature = jwt.encode(claims(), rsa_key, algorithm="RS256").split(".")
        return f"{head}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    if case == "alg none":
        return hand_made({"alg": "none", "typ": "JWT"}, claims(), None)
    if case == "alg None, signed":
        return hand_made({"alg": "None", "typ": "JWT"}, claims(), b"x" * 32)
    if case == "algorithm confusion":  # HS256 keyed with the public key everyone may know
        return hand_made({"alg": "HS256", "typ": "JWT"}, claims(), pem(rsa_key))
    if case == "malformed":
        return "eyJub3Q.anNvbg.c2ln"
    if case == "expired":
        return jwt.encode(claims(exp=now - 120), rsa_key, algorithm="RS256")
    if case == "not yet valid":
        return jwt.encode(claims(nbf=now + 3600), rsa_key, algorithm="RS256")
    if case == "absurd exp":
        return jwt.encode(claims(exp=10**400), rsa_key, algorithm="RS256")
    if case == "without exp":
        return jwt.encode(claims(exp=None), rsa_key, algorithm="RS256")
    if case == "wrong audience":
        return jwt.encode(claims(aud="https://other.example.com"), rsa_key, algorithm="RS256")
    if case == "without aud":
        return jwt.encode(claims(aud=None), rsa_key, algorithm="RS256")
    if case == "wrong issuer":
        return jwt.encode(claims(iss="https://evil.example.com/"), rsa_key, algorithm="RS256")
    if case == "without iss":
        return jwt.encode(claims(iss=None), rsa_key, algorithm="RS256")
    if case == "without consumer":
        return jwt.encode(claims(sub=None), rsa_key, algorithm="RS256")
    if case == "unprintable consumer":
        return jwt.encode(claims(sub="a\x1fb"), rsa_key, algorithm="RS256")
    if case == "unreadable scopes":
        return jwt.encode(claims(scope={"items": "write"}), rsa_key, algorithm="RS256")
    if case == "oversized":
        return jwt.encode(claims(pad="x" * 20_000), rsa_key, algorithm="RS256")
    raise AssertionError(case)


REJECTIONS = {
    "bad signature": "invalid-token",
    "tampered signature": "invalid-token",
    "tampered payload": "invalid-token",
    "alg none": "invalid-token",
    "alg None, signed": "invalid-token",
    "algorithm confusion": "invalid-token",
    "malformed": "invalid-token",
    "expired": "expired-token",
    "not yet valid": "invalid-token",
    "without exp": "invalid-token",
    "absurd exp": "invalid-token",
    "wrong audience": "wrong-audience",
    "without aud": "wrong-audience",
    "wrong issuer": "wrong-issuer",
    "without iss": "wrong-issuer",
    "without consumer": "invalid-token",
    "unprintable consumer": "invalid-token",
    "unreadable scopes": "invalid-token",
    "oversized": "invalid-token",
}


@pytest.mark.parametrize(("case", "reason"), REJECTIONS.items())
async def test_a_rejected_token_has_a_stable_reason(case, reason, rsa_key, ed_key) -> None:
    resolver, _ = resolver_for("RS256", rsa_key, ed_key)
    token = forged(case, rsa_key)
    with pytest.raises(InvalidCaller) as caught:
        await resolver.resolve(request(token))
    assert caught.value.reason == reason
    error = caught.value  # PyJWT's exception is not chained: nothing of the token travels on
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    assert token not in str(caught.value)
    assert resolver._cache == {}


async def test_an_hs256_resolver_refuses_tokens_of_other_algorithms(rsa_key, ed_key) -> None:
    resolver, _ = resolver_for("HS256", rsa_key, ed_key)
    for token in (jwt.encode(claims(), rsa_key, algorithm="RS256"),
                  jwt.encode(claims(), ed_key, algorithm="EdDSA"),
                  hand_made({"alg": "none"}, claims(), None)):  # fmt: skip
        with pytest.raises(InvalidCaller) as caught:
            await resolver.resolve(request(token))
        assert caught.value.reason == "invalid-token"


@pytest.mark.parametrize(
    "value",
    [None, "", "mw_live_0123456789ab_" + "a" * 38, "not-a-jwt", "a.b.c.d.e", "a..c", "a.b"],
)
async def test_what_is_not_a_jwt_bearer_is_left_to_the_api_key_check(
    value, rsa_key, ed_key
) -> None:
    resolver, signing = resolver_for("RS256", rsa_key, ed_key)
    assert await resolver.resolve(request(value)) is None
    token = jwt.encode(claims(), signing, algorithm="RS256")
    assert await resolver.resolve(request(token, scheme="Basic")) is None
    assert (
        await resolver.resolve({"type": "http", "headers": [(b"x-api-key", token.encode())]})
        is None
    )
    assert await resolver.resolve({"type": "http"}) is None


# --- the cache -----------------------------------------------------------------------------------


async def test_a_reused_token_is_verified_once_for_at_most_30s_or_until_exp(
    rsa_key, ed_key, monkeypatch
) -> None:
    resolver, signing = resolver_for("RS256", rsa_key, ed_key, cache_size=2)
    decoded: list[bytes] = []
    real = jwt.decode

    def counting(token: bytes, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(meterwall_jwt.jwt, "decode", counting)
    now = time.time()
    long_lived = jwt.encode(claims(), signing, algorithm="RS256")
    short_lived = jwt.encode(claims(exp=int(now) + 5), signing, algorithm="RS256")
    for _ in range(3):
        assert await resolver.resolve(request(long_lived)) is not None
        assert await resolver.resolve(request(short_lived)) is not None
    assert len(decoded) == 2
    deadlines = {d: deadline for d, (deadline, _) in resolver._cache.items()}
    long_digest = hashlib.sha256(long_lived.encode()).digest()
    short_digest = hashlib.sha256(short_lived.encode()).digest()
    assert now + 29 < deadlines[long_digest] <= time.time() + 30
    assert deadlines[short_digest] == int(now) + 5  # never beyond the token's exp
    resolver._cache[long_digest] = (time.time() - 1, resolver._cache[long_digest][1])
    assert await resolver.resolve(request(long_lived)) is not None
    assert len(decoded) == 3  # a stale entry is verified again
    third = jwt.encode(claims(sub="globex"), signing, algorithm="RS256")
    await resolver.resolve(request(third))
    assert len(resolver._cache) == 2
    assert short_digest not in resolver._cache
    assert all(len(d) == 32 for d in resolver._cache)  # digests only, never the token


# --- configuration -------------------------------------------------------------------------------


def test_a_key_of_the_wrong_family_cannot_be_configured(rsa_key, ed_key) -> None:
    rsa_pem, ed_pem = pem(rsa_key), pem(ed_key)
    private_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())  # fmt: skip
    cases = [
        ({"key": rsa_pem, "algorithms": ("HS256",)}, "algorithms"),  # algorithm confusion
        ({"key": SECRET, "algorithms": ("RS256",)}, "algorithms"),
        ({"key": ed_pem, "algorithms": ("RS256",)}, "algorithms"),
        ({"key": rsa_pem, "algorithms": ("RS256", "HS256")}, "algorithms"),
        ({"key": rsa_pem, "algorithms": ("RS256", "none")}, "algorithms"),
        ({"key": rsa_pem, "algorithms": ("RS512",)}, "algorithms"),
        ({"key": rsa_pem, "algorithms": ()}, "algorithms"),
        ({"key": "short", "algorithms": ("HS256",)}, "key"),
        ({"key": private_pem, "algorithms": ("RS256",)}, "key"),
        (
            {
                "key": b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----",
            },
            "key",
        ),
        ({"key": pem(generate_private_key(65537, 1024))}, "key"),
        ({"key": rsa_pem, "issuer": " "}, "issuer"),
        ({"key": rsa_pem, "audience": []}, "audience"),
        ({"key": rsa_pem, "consumer_claim": ""}, "consumer_claim"),
        ({"key": rsa_pem, "leeway": 3600}, "leeway"),
        ({"key": rsa_pem, "leeway": float("nan")}, "leeway"),
    ]
    for options, setting in cases:
        arguments = {"issuer": ISSUER, "audience": AUDIENCE, **options}
        with pytest.raises(ConfigurationError) as caught:
            JwtResolver(**arguments)
        assert caught.value.setting == setting, options
    accepted = JwtResolver(issuer=ISSUER, audience=[AUDIENCE, "other"], key=rsa_key.public_key(),
                           algorithms=["rs256"])  # fmt: skip
    assert accepted.algorithms == ("RS256",)
    assert accepted.audience == (AUDIENCE, "other")
    assert "PUBLIC" not in repr(accepted)


def environment(**values: str) -> dict[str, str]:
    base = {"MW_JWT_ISSUER": ISSUER, "MW_JWT_AUDIENCE": AUDIENCE, "MW_JWT_ALGORITHMS": "HS256",
            "MW_JWT_KEY": SECRET}  # fmt: skip
    base.update(values)
    return {k: v for k, v in base.items() if v}


def test_the_factory_reads_mw_jwt_variables_and_names_the_bad_one(tmp_path: Path, rsa_key) -> None:
    made = plugin.create(None, environment(MW_JWT_CONSUMER_CLAIM="org", MW_JWT_LEEWAY="5s"))
    assert (made.name, made.algorithms, made.consumer_claim, made.leeway) == (
        "jwt", ("HS256",), "org", 5.0)  # fmt: skip
    key_file = tmp_path / "issuer.pem"
    key_file.write_bytes(pem(rsa_key))
    from_file = plugin.create(None, environment(MW_JWT_KEY="", MW_JWT_ALGORITHMS="",
                                                MW_JWT_KEY_FILE=str(key_file)))  # fmt: skip
    assert (from_file.algorithms, from_file.consumer_claim, from_file.leeway) == (
        ("RS256",), "sub", 30.0)  # the defaults  # fmt: skip
    short = tmp_path / "short.key"
    short.write_text("short\n")
    cases = {
        "MW_JWT_ISSUER": environment(MW_JWT_ISSUER=""),
        "MW_JWT_AUDIENCE": environment(MW_JWT_AUDIENCE=" , "),
        "MW_JWT_ALGORITHMS": environment(MW_JWT_ALGORITHMS="none"),
        "MW_JWT_KEY": environment(MW_JWT_KEY=""),
        "MW_JWT_KEY_FILE": environment(MW_JWT_KEY="", MW_JWT_KEY_FILE=str(tmp_path / "missing")),
        "MW_JWT_CONSUMER_CLAIM": environment(MW_JWT_CONSUMER_CLAIM="  "),
        "MW_JWT_LEEWAY": environment(MW_JWT_LEEWAY="soon"),
    }
    cases_more = [
        ("MW_JWT_KEY", environment(MW_JWT_KEY_FILE=str(key_file))),  # both: ambiguous
        ("MW_JWT_KEY_FILE", environment(MW_JWT_KEY="", MW_JWT_KEY_FILE=str(short))),
        ("MW_JWT_ALGORITHMS", environment(MW_JWT_KEY="", MW_JWT_KEY_FILE=str(key_file))),
        ("MW_JWT_LEEWAY", environment(MW_JWT_LEEWAY="-1")),
    ]
    for setting, env in [*cases.items(), *cases_more]:
        with pytest.raises(ConfigurationError) as caught:
            plugin.create(None, env)
        assert caught.value.setting == setting, env
        assert SECRET not in str(caught.value)
    assert plugin.kind == "resolver"
    assert "JWT" in plugin.summary
    assert {"name": "jwt", "kind": "resolver", "summary": plugin.summary,
            "module": "meterwall_jwt:plugin"} in describe()  # fmt: skip


# --- through meterwall ---------------------------------------------------------------------------


async def hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


api_app = Starlette(routes=[Route("/health", hello),
                            Route("/items/{n}", hello, methods=["GET", "POST"])])  # fmt: skip


async def call(app: Meterwall, *requests: tuple[str, str, str | None]) -> list[httpx.Response]:
    """Each (method, path, bearer) through the app, within one lifespan (flushed at its end)."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("127.0.0.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return [
                await client.request(method, path,
                                     headers={"Authorization": f"Bearer {b}"} if b else {})
                for method, path, b in requests
            ]  # fmt: skip


async def test_through_meterwall_tokens_are_checked_scoped_counted_and_never_stored(
    redis, settings, private_key, rsa_key
) -> None:
    own = settings.replace(access="keys", access_rules="/health=public, POST /items/*=items:write")
    resolver = JwtResolver(issuer=ISSUER, audience=AUDIENCE, key=pem(rsa_key),
                           algorithms=("RS256",), consumer_claim="org")  # fmt: skip
    assert own.pseudonym_secret is not None
    keys = KeyStore(redis, own.keyspace(), derive(own.pseudonym_secret.reveal(), "api-keys"))
    _, api_key = await keys.create("keyed")
    reader = jwt.encode(claims(org="acme-jwt", azp="cli"), rsa_key, algorithm="RS256")
    writer = jwt.encode(claims(org="acme-jwt", azp="cli", scope="items:read items:write"),
                        rsa_key, algorithm="RS256")  # fmt: skip
    bad = forged("tampered signature", rsa_key)
    expired = forged("expired", rsa_key)
    app = Meterwall(api_app, settings=own, plugins=[resolver])
    replies = await call(
        app,
        ("GET", "/items/1", reader),
        ("GET", "/items/2", reader),  # from the cache
        ("POST", "/items/1", reader),  # the token lacks items:write
        ("POST", "/items/1", writer),
        ("GET", "/items/1", bad),
        ("GET", "/items/1", expired),
        ("GET", "/items/1", api_key),  # not a JWT: meterwall's own key check
        ("GET", "/items/1", None),
        ("GET", "/health", None),
    )
    assert [r.status_code for r in replies] == [200, 200, 403, 200, 401, 401, 200, 401, 200]
    assert replies[2].json()["type"].endswith("/scope")
    assert replies[4].json()["type"].endswith("/invalid-token")
    assert replies[4].headers["content-type"] == "application/problem+json"
    assert replies[5].json()["type"].endswith("/expired-token")
    assert replies[7].json()["type"].endswith("/missing-key")

    month = datetime.now(UTC).strftime("%Y-%m")
    rows = await UsageReader(redis, own.keyspace()).totals("acme-jwt", month, ["route"])
    items = [r for r in rows if r["route"] == "/items/{n}"]
    assert sum(r["requests"] for r in items) == 3 + 1  # three admitted, one denied (scope)
    assert sum(r["denied"] for r in rows) == 1
    assert (await UsageReader(redis, own.keyspace()).totals("keyed", month))[0]["requests"] == 1

    tokens = [reader, writer, bad, expired]
    secrets = {part.encode() for t in tokens for part in t.split(".")[1:]} | {
        t.encode() for t in tokens
    }
    scanned = 0
    async for key in redis.scan_iter(match=f"{own.key_prefix}:*"):
        blob = key + b"".join(value for _, value in await key_parts(redis, key))
        assert not [s for s in secrets if s in blob], key
        scanned += 1
    assert scanned > 0
    records = await RecordReader(redis, own, private_key).records()
    opened = json.dumps(records, default=str)
    assert not [s for s in secrets if s.decode() in opened]
    admitted = [r for r in records if r["decision"] == "admitted" and r["consumer"] == "acme-jwt"]
    expected_key_id = (await resolver.resolve(request(reader)) or Caller("")).key_id
    assert len(admitted) == 3
    assert {r["key_id"] for r in admitted} == {expected_key_id}


async def test_activated_by_name_from_mw_jwt_variables(monkeypatch, settings, ed_key) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    own = settings.replace(access="keys", plugins="jwt")
    with pytest.raises(ConfigurationError) as caught:
        Meterwall(api_app, settings=own)
    assert caught.value.setting == "MW_JWT_ISSUER"  # start-up fails naming the variable
    monkeypatch.setenv("MW_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("MW_JWT_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("MW_JWT_ALGORITHMS", "EdDSA")
    monkeypatch.setenv("MW_JWT_KEY", pem(ed_key).decode())
    app = Meterwall(api_app, settings=own)
    assert app.plugins.names == ["jwt"]
    good = jwt.encode(claims(), ed_key, algorithm="EdDSA")
    wrong = jwt.encode(claims(aud="https://other.example.com"), ed_key, algorithm="EdDSA")
    replies = await call(app, ("GET", "/items/1", good), ("GET", "/items/1", wrong))
    assert [r.status_code for r in replies] == [200, 401]
    assert replies[1].json()["type"].endswith("/wrong-audience")
    monkeypatch.setenv("MW_JWT_ALGORITHMS", "HS256")  # an Ed25519 public key as an HMAC secret
    with pytest.raises(ConfigurationError) as confused:
        Meterwall(api_app, settings=own)
    assert confused.value.setting == "MW_JWT_ALGORITHMS"
