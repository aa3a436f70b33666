"""meterwall_jwt: callers identified by JWT bearer tokens (a ``resolver`` plugin).

A ``JwtResolver`` verifies ``Authorization: Bearer <jwt>`` with PyJWT before meterwall's API-key
check, so an API can accept its identity provider's access tokens and meterwall's own keys side
by side. What it checks, and why each check is not optional:

* the signature, with one configured key and an explicit allow list of algorithms (``HS256``,
  ``RS256``, ``EdDSA``). ``none`` is never accepted, and every configured algorithm must belong to
  the key's family: a public RSA key can then never be used as an HMAC secret (the classic
  algorithm-confusion forgery, where anyone holding the public key signs HS256 tokens with it);
* ``exp`` (required: a token without an end would be valid forever), ``nbf`` when present, with a
  small leeway for clock skew between the issuer and this server;
* ``iss`` and ``aud`` (both required in configuration): a token the same provider issued for
  another API, or another provider's token signed by a shared key, is not a credential here.

Rejections raise ``InvalidCaller`` with a stable reason (meterwall answers 401 with a problem
type ending in it): ``expired-token``, ``wrong-audience`` (also when ``aud`` is missing),
``wrong-issuer`` (also when ``iss`` is missing), and ``invalid-token`` for everything else (bad
signature, malformed, an algorithm not allowed, ``alg: none``, no ``exp``, not yet valid, no
usable consumer claim). A request without a bearer token, or whose bearer value is not shaped
like a JWT (three dot-separated segments, e.g. a meterwall ``mw_live_...`` key), is not ours:
``resolve`` returns None and the API-key check decides.

The caller: ``consumer`` is the configured claim (default ``sub``); ``scopes`` come from
``scope`` (a space-separated string) or, when absent, ``scp`` (a list, or a string as some
providers send it); ``key_id`` is ``jwt-`` + 16 hex of SHA-256 over the issuer and the client
the token was issued to (``azp``, else ``client_id``, else ``sub``, else the consumer). It is
stable across token renewals (a ``jti`` would give every token its own row in the ledger), not
secret, and never derived from the token itself. It is an unkeyed hash, not a pseudonym: it
hides nothing the ledger does not already hold in clear (the consumer).

The token is never stored, logged or put in an exception: verified tokens are remembered in
process by their SHA-256, for at most min(30 s, time to ``exp``), in a bounded dict, so a client
that reuses its token costs one hash and one dict lookup instead of a signature check.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from meterwall.errors import ConfigurationError
from meterwall.plugins import Caller, InvalidCaller
from meterwall.types import Scope

__all__ = ["ALGORITHMS", "JwtResolver", "plugin"]

PublicKey = RSAPublicKey | Ed25519PublicKey | Ed448PublicKey

# The algorithms this resolver can be configured with, by key family. A family is what the key
# is; an algorithm outside the key's family is refused at start-up, never tried at request time.
ALGORITHMS: Mapping[str, str] = {"HS256": "secret", "RS256": "rsa", "EdDSA": "eddsa"}

CACHE_SECONDS = 30.0  # how long a verified token is trusted without checking it again
CACHE_SIZE = 8192
MAX_LEEWAY = 300.0  # more than five minutes of skew is a broken clock, not a tolerance
MAX_TOKEN = 16_384  # longer bearer values are refused before any parsing
MAX_CONSUMER = 128  # as meterwall's consumer header: consumers name Redis keys
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
MIN_RSA_BITS = 2048

# Three base64url segments; the third may be empty so that an unsigned ``alg: none`` token is
# recognised as ours and rejected, rather than passed on to the API-key check.
_JWT_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = b"bearer"

# The constructor's parameters and the variables the factory reads them from, so that a
# configuration error names what the operator actually set.
_VARIABLES = {
    "issuer": "MW_JWT_ISSUER",
    "audience": "MW_JWT_AUDIENCE",
    "algorithms": "MW_JWT_ALGORITHMS",
    "key": "MW_JWT_KEY",
    "consumer_claim": "MW_JWT_CONSUMER_CLAIM",
    "leeway": "MW_JWT_LEEWAY",
}


class JwtResolver:
    """Identifies callers by a JWT bearer token signed by one trusted issuer.

    ``key`` is an HS256 secret (str or bytes, at least 32 bytes), a PEM public key or
    certificate (RSA for RS256, Ed25519/Ed448 for EdDSA), or a loaded ``cryptography`` public
    key. ``audience`` may list several accepted audiences. Raises ``ConfigurationError`` naming
    the parameter when the configuration could not verify tokens safely.
    """

    name = "jwt"

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Sequence[str],
        key: str | bytes | PublicKey,
        algorithms: Iterable[str] = ("RS256",),
        consumer_claim: str = "sub",
        leeway: float = 30.0,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if not isinstance(issuer, str) or not issuer.strip():
            raise ConfigurationError("issuer", "the expected issuer (iss) is required")
        audiences = [audience] if isinstance(audience, str) else list(audience)
        audiences = [a.strip() for a in audiences if isinstance(a, str) and a.strip()]
        if not audiences:
            raise ConfigurationError("audience", "the expected audience (aud) is required")
        if not isinstance(consumer_claim, str) or not consumer_claim.strip():
            raise ConfigurationError("consumer_claim", "name the claim that holds the consumer")
        if not math.isfinite(leeway) or not 0 <= leeway <= MAX_LEEWAY:
            raise ConfigurationError("leeway", f"seconds between 0 and {MAX_LEEWAY:g}")
        self.issuer = issuer.strip()
        self.audience: tuple[str, ...] = tuple(audiences)
        self.algorithms = _algorithms(algorithms)
        self.consumer_claim = consumer_claim.strip()
        self.leeway = float(leeway)
        self._key = _key_for(key, self.algorithms)
        self._cache_size = max(1, cache_size)
        # SHA-256 of a verified token -> (wall-clock deadline, its caller). Keyed by the digest so
        # the process never holds the token itself longer than the request does.
        self._cache: dict[bytes, tuple[float, Caller]] = {}

    def __repr__(self) -> str:  # no key material, ever
        return (
            f"JwtResolver(issuer={self.issuer!r}, audience={self.audience!r}, "
            f"algorithms={self.algorithms!r}, consumer_claim={self.consumer_claim!r})"
        )

    async def resolve(self, scope: Scope) -> Caller | None:
        """The caller of a JWT bearer token, None when there is none, ``InvalidCaller`` if bad."""
        token = _bearer_jwt(scope)
        if token is None:
            return None
        digest = hashlib.sha256(token).digest()
        now = time.time()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[digest]
        caller, expires = self._verify(token)
        deadline = min(now + CACHE_SECONDS, expires)
        if deadline > now:  # a token only within its leeway is checked again on every request
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest entry goes first
            self._cache[digest] = (deadline, caller)
        return caller

    def _verify(self, token: bytes) -> tuple[Caller, float]:
        """(the caller, its token's ``exp``) of a token that passed every check."""
        if len(token) > MAX_TOKEN:
            raise InvalidCaller("invalid-token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(self.algorithms),
                audience=list(self.audience),
                issuer=self.issuer,
                leeway=self.leeway,
                # a short key is refused at start-up; should one get here, it fails closed
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidCaller("expired-token") from None
        except jwt.InvalidAudienceError:
            raise InvalidCaller("wrong-audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidCaller("wrong-issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            missing = {"aud": "wrong-audience", "iss": "wrong-issuer"}.get(exc.claim)
            raise InvalidCaller(missing or "invalid-token") from None
        except Exception:  # any other failure, PyJWT's or not: never trusted, never a 500
            raise InvalidCaller("invalid-token") from None
        try:
            expires = float(claims["exp"])  # PyJWT accepted it as an integer of any size
        except (TypeError, ValueError, OverflowError):
            raise InvalidCaller("invalid-token") from None
        return self._caller(claims), expires

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        """The caller a verified token names; a token without a usable consumer is refused."""
        consumer = claims.get(self.consumer_claim)
        if isinstance(consumer, int) and not isinstance(consumer, bool):
            consumer = str(consumer)
        if (
            not isinstance(consumer, str)
            or not consumer
            or len(consumer) > MAX_CONSUMER
            or not consumer.isprintable()  # consumers name Redis keys and ledger fields
        ):
            raise InvalidCaller("invalid-token")
        return Caller(consumer, key_id=self._key_id(claims, consumer), scopes=_scopes(claims))

    def _key_id(self, claims: Mapping[str, Any], consumer: str) -> str:
        """A stable, non-secret id of the client the token was issued to (see the module doc)."""
        for claim in ("azp", "client_id", "sub"):
            value = claims.get(claim)
            if isinstance(value, str) and value:
                basis = f"{claim}\x00{value}"
                break
        else:
            basis = f"consumer\x00{consumer}"
        text = f"{self.issuer}\x00{basis}".encode()
        return "jwt-" + hashlib.sha256(text).hexdigest()[:16]


def _bearer_jwt(scope: Scope) -> bytes | None:
    """The bearer value of the first Authorization header, if it is shaped like a JWT."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() != _BEARER:
                return None
            token: bytes = rest.strip()
            return token if _JWT_SHAPE.fullmatch(token) else None
    return None


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated) or ``scp`` (list or string); malformed: refused."""
    raw = claims.get("scope", claims.get("scp"))
    if raw is None:
        return frozenset()
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return frozenset(s for s in raw if s)
    raise InvalidCaller("invalid-token")  # a scope claim we cannot read grants nothing


def _algorithms(names: Iterable[str]) -> tuple[str, ...]:
    """The allow list, spelled as PyJWT spells it; ``none`` and unknown names are refused."""
    if isinstance(names, str):
        names = names.split(",")
    canonical = {name.lower(): name for name in ALGORITHMS}
    chosen: list[str] = []
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        if name.lower() == "none":
            raise ConfigurationError("algorithms", "'none' (unsigned tokens) is never accepted")
        if name.lower() not in canonical:
            known = ", ".join(ALGORITHMS)
            raise ConfigurationError("algorithms", f"{name!r} is not supported (use {known})")
        if canonical[name.lower()] not in chosen:
            chosen.append(canonical[name.lower()])
    if not chosen:
        raise ConfigurationError("algorithms", "list at least one algorithm")
    if len({ALGORITHMS[a] for a in chosen}) > 1:
        raise ConfigurationError(
            "algorithms", f"{', '.join(chosen)} need different kinds of key; one key, one family"
        )
    return tuple(chosen)


def _key_for(key: str | bytes | PublicKey, algorithms: tuple[str, ...]) -> bytes | PublicKey:
    """The verification key, checked against the algorithms' family.

    The family is decided from the key, never from a token's header: that is what makes
    algorithm confusion impossible rather than merely unlikely.
    """
    family = ALGORITHMS[algorithms[0]]
    loaded: bytes | PublicKey
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, bytes):
        is_pem = key.lstrip().startswith(b"-----BEGIN")
        loaded = _load_pem(key.strip()) if is_pem else key
    elif isinstance(key, RSAPublicKey | Ed25519PublicKey | Ed448PublicKey):
        loaded = key
    else:
        raise ConfigurationError("key", "a secret, a PEM public key or a public key object")
    if isinstance(loaded, bytes):
        kind = "secret"
    elif isinstance(loaded, RSAPublicKey):
        kind = "rsa"
        if loaded.key_size < MIN_RSA_BITS:
            raise ConfigurationError("key", f"an RSA key needs at least {MIN_RSA_BITS} bits")
    else:
        kind = "eddsa"
    if kind != family:
        wanted = {"secret": "an HS256 secret", "rsa": "an RSA public key",
                  "eddsa": "an Ed25519 public key"}  # fmt: skip
        raise ConfigurationError(
            "algorithms",
            f"{', '.join(algorithms)} needs {wanted[family]}, the key is {wanted[kind]}",
        )
    if isinstance(loaded, bytes) and len(loaded) < MIN_SECRET_BYTES:
        raise ConfigurationError("key", f"an HS256 secret needs at least {MIN_SECRET_BYTES} bytes")
    return loaded


def _load_pem(pem: bytes) -> PublicKey:
    """A public key from a PEM public key or certificate; a private key is refused."""
    if b"PRIVATE KEY-----" in pem:
        raise ConfigurationError("key", "this is a private key: give the issuer's public key")
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            public: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            public = load_pem_public_key(pem)
    except Exception:
        raise ConfigurationError("key", "not a readable PEM public key or certificate") from None
    if not isinstance(public, RSAPublicKey | Ed25519PublicKey | Ed448PublicKey):
        raise ConfigurationError("key", f"{type(public).__name__} keys are not supported")
    return public


class _Factory:
    """What ``MW_PLUGINS=jwt`` creates, configured from ``MW_JWT_*`` environment variables.

    The meterwall ``Settings`` object does not know these variables, so they are read here, at
    start-up; an invalid or missing one stops the app with an error naming it.
    """

    name = "jwt"
    kind = "resolver"
    summary = "callers from JWT bearer tokens (MW_JWT_ISSUER, MW_JWT_AUDIENCE, MW_JWT_KEY)"

    def create(self, settings: Any, environ: Mapping[str, str] | None = None) -> JwtResolver:
        env = os.environ if environ is None else environ
        issuer = env.get("MW_JWT_ISSUER", "")
        audience = [a for a in env.get("MW_JWT_AUDIENCE", "").split(",") if a.strip()]
        # What is missing is named in the order of the README, not in the order of the checks.
        if not issuer.strip():
            raise ConfigurationError("MW_JWT_ISSUER", "the expected issuer (iss) is required")
        if not audience:
            raise ConfigurationError("MW_JWT_AUDIENCE", "the expected audience (aud) is required")
        key_text, key_file = env.get("MW_JWT_KEY", ""), env.get("MW_JWT_KEY_FILE", "")
        variables = dict(_VARIABLES)
        key: bytes
        if key_text and key_file:
            raise ConfigurationError("MW_JWT_KEY", "set MW_JWT_KEY or MW_JWT_KEY_FILE, not both")
        if key_file:
            variables["key"] = "MW_JWT_KEY_FILE"
            try:
                key = Path(key_file).read_bytes().rstrip(b"\r\n")
            except OSError as exc:
                raise ConfigurationError(
                    "MW_JWT_KEY_FILE", f"cannot read: {exc.strerror}"
                ) from None
        elif key_text:
            key = key_text.encode()
        else:
            raise ConfigurationError(
                "MW_JWT_KEY", "set the verification key (or MW_JWT_KEY_FILE): a secret or PEM"
            )
        leeway_text = env.get("MW_JWT_LEEWAY", "30").strip()
        try:
            leeway = float(leeway_text.removesuffix("s"))
        except ValueError:
            raise ConfigurationError("MW_JWT_LEEWAY", f"{leeway_text!r} is not seconds") from None
        try:
            return JwtResolver(
                issuer=issuer,
                audience=audience,
                key=key,
                algorithms=env.get("MW_JWT_ALGORITHMS", "RS256"),
                consumer_claim=env.get("MW_JWT_CONSUMER_CLAIM", "sub"),
                leeway=leeway,
            )
        except ConfigurationError as exc:
            setting = variables.get(exc.setting, exc.setting)
            raise ConfigurationError(setting, exc.problem) from None


plugin = _Factory()
