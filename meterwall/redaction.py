"""Redaction of a captured request before it is sealed (DESIGN decision 6).

A sealed record is still plaintext to whoever holds the reading key, and it lives for 24 h, so
what goes into it must already be safe to show to an operator:

* credentials are replaced by keyed fingerprints (``fp:`` + 12 hex): two requests with the same
  token correlate, but the token cannot be read back nor brute-forced without the key;
* client addresses in proxy headers are replaced by the caller's IP pseudonymiser, whose keys are
  destroyed after the retention window, so the plaintext address never reaches storage;
* fields whose *names* look secret are masked in query strings, JSON and form bodies;
* any other body is kept only as a SHA-256 digest: free text may hold secrets we cannot find.

This runs in the background flusher, not on the request path, but it sees every request: patterns
are compiled and name lookups are cached once per ``Redactor``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import orjson

from .clientip import canonical_ip, ip_text

__all__ = ["SECRET_MASK", "IpPseudonymFn", "Redactor"]

IpPseudonymFn = Callable[[str], str]
"""Maps an address text to its pseudonym text (``"ip:3fa9..."``); never raises."""

SECRET_MASK = "***"  # noqa: S105 - the mask itself, not a credential

_FINGERPRINT_HEX = 12
_MIN_KEY_BYTES = 16
_CACHE_LIMIT = 4096
# orjson refuses to serialise deeper than 254 levels; the record wraps the body in a few more, so
# a deeper document is kept as a digest rather than making the whole record unstorable.
_MAX_JSON_DEPTH = 128

_CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-auth-token", "x-csrf-token", "x-xsrf-token", "x-amz-security-token",
})  # fmt: skip
# Any header name holding one of these is a credential: vendors name theirs freely
# (X-Authorization, X-Auth-Key, Ocp-Apim-Subscription-Key). A false match costs only a
# fingerprint in place of a value that was never secret.
_CREDENTIAL_HEADER_PARTS = (
    "token", "secret", "key", "auth", "session", "password", "passwd", "signature", "credential",
)  # fmt: skip
_AUTHORIZATION_HEADERS = frozenset({"authorization", "proxy-authorization"})
# Only well-known schemes are kept in clear: an unknown first word may itself be the secret
# (``Authorization: s3cr3t other``), so such a value is fingerprinted whole.
_AUTH_SCHEMES = frozenset({
    "basic", "bearer", "digest", "negotiate", "ntlm", "hoba", "mutual", "vapid", "dpop", "token",
    "apikey", "hawk", "oauth", "gnap", "privatetoken", "concealed", "scram-sha-1",
    "scram-sha-256", "aws4-hmac-sha256", "aws", "kerberos", "jwt", "sso",
})  # fmt: skip
_ADDRESS_HEADERS = frozenset({
    "x-forwarded-for", "forwarded", "x-real-ip", "true-client-ip", "cf-connecting-ip",
    "x-client-ip", "x-cluster-client-ip", "fastly-client-ip", "x-original-forwarded-for",
    "x-envoy-external-address",
})  # fmt: skip
# A Referer carries the previous page's query string, which is where tokens in URLs end up.
# Proxies pass the original request line's URL on in headers of their own.
_URL_HEADERS = frozenset({
    "referer", "x-original-uri", "x-original-url", "x-forwarded-uri", "x-rewrite-url",
})  # fmt: skip

_SECRET_NAME_PARTS = (
    "password", "passwd", "secret", "token", "apikey", "accesskey", "privatekey", "authorization",
    "authkey", "authcode", "credential", "cardnumber", "cardno", "creditcard", "ccnumber",
    "sessionid", "cookie", "signature", "pincode", "otpcode", "passcode",
)  # fmt: skip
# Too short to match inside other words ("shipping", "author", "discard", "footprint",
# "classname"): only the whole name counts.
_SECRET_WHOLE_NAMES = frozenset(
    {"pin", "pwd", "auth", "card", "cards", "cvv", "cvc", "cvv2", "ssn", "iban", "otp", "pan"}
)
# The words of a field name: split at anything but letters and digits and at camelCase humps.
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# One Forwarded pair (RFC 7239): token "=" (token | quoted-string), ending at ";", "," or the end.
_FORWARDED_PAIR = re.compile(
    r"""\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,"\s]*)\s*(?=[;,]|\Z)"""
)
_FORWARDED_ADDRESS_KEYS = frozenset({"for", "by"})
_JSON_TYPE = "application/json"
_CONTAINERS = (dict, list)  # a tuple: ``dict | list`` would build a union object per test
_FORM_TYPE = "application/x-www-form-urlencoded"


def _normalise_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _text(data: bytes) -> str:
    """Decode as UTF-8 when it is, else latin-1, which maps every byte and so never fails."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _without_password(url: str) -> str:
    """``scheme://user:password@host/...`` with the password masked; a user part alone may be
    a token (``https://ghp_...@github.com``), so it is masked whole."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find("/"), rest.find("#")) if i >= 0), default=len(rest))
    authority, after = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:{SECRET_MASK}" if colon else SECRET_MASK
    return f"{scheme}://{masked}@{host}{after}"


def _host(token: str) -> str:
    """The address part of an address token: drop quotes, ``[v6]`` brackets and a port."""
    token = token.strip().strip('"').strip()
    if token.startswith("["):
        end = token.find("]")
        return token[1:end] if end > 0 else token
    if token.count(":") == 1:  # IPv4:port; a bare IPv6 address has several colons
        return token.partition(":")[0]
    return token


# An IP address standing in other text: a dotted quad not glued to a word or another dot and not
# a product version (``Chrome/131.0.0.0``: a word, a slash, the quad; a URL's ``//1.2.3.4`` or a
# path's `` /1.2.3.4`` still counts), or an IPv6 address (two colons at least, an IPv4 tail, a
# zone) not glued to a word, dot or colon.
# Bounded repetitions only: linear. A candidate is an address only if canonical_ip parses it
# (so "12:30:45" or a MAC address stay as they are).
_ADDRESS_IN_TEXT = re.compile(
    r"(?<![\w.])(?<!\w/)\d{1,3}(?:\.\d{1,3}){3}(?![\w.])"
    r"|(?<![\w.:])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
    r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?:%[\w.-]+)?(?![\w.:])"
)
# Headers whose addresses are not the client's: the server's own name.
_SERVER_HEADERS = frozenset({"host", ":authority"})


#: The characters of a urlencoded form body (one flat class: linear, no backtracking).
_FORM_SAFE = re.compile(rb"[A-Za-z0-9%+._~*\-=&;]*")
_PAIR_SEPARATORS = re.compile("([&;])")


class Redactor:
    """Turns captured request parts into their redacted, storable form.

    ``fingerprint_key`` keys the credential fingerprints; ``pseudonymise_ip`` replaces addresses.
    ``extra_secret_fields`` adds name fragments (matched like the built-in ones, after
    normalisation) and ``extra_credential_headers`` adds exact header names.
    """

    def __init__(
        self,
        fingerprint_key: bytes,
        pseudonymise_ip: IpPseudonymFn,
        *,
        extra_secret_fields: Iterable[str] = (),
        extra_credential_headers: Iterable[str] = (),
        value_redactors: Iterable[Callable[[str], str]] = (),
    ) -> None:
        if len(fingerprint_key) < _MIN_KEY_BYTES:
            # A short key would let anyone holding a record brute-force short credentials.
            raise ValueError(f"fingerprint_key must be at least {_MIN_KEY_BYTES} bytes")
        self._key = bytes(fingerprint_key)
        self._pseudonymise_ip = pseudonymise_ip
        parts = {*_SECRET_NAME_PARTS, *(_normalise_name(f) for f in extra_secret_fields)}
        parts.discard("")
        # Longest first so the alternation is deterministic; search() only needs one hit.
        alternatives = sorted(parts, key=lambda p: (-len(p), p))
        self._secret_pattern = re.compile("|".join(re.escape(p) for p in alternatives))
        self._credential_headers = _CREDENTIAL_HEADERS | {
            h.strip().lower() for h in extra_credential_headers
        }
        self._value_redactors = tuple(value_redactors)  # plugins: what the names cannot tell
        self._secret_cache: dict[str, bool] = {}
        self._encoded_name_cache: dict[str, bool] = {}  # is_secret_name of urlencoded names
        self._header_cache: dict[str, str] = {}
        self._value_cache: dict[int, tuple[str, str]] = {}
        self._address_line_cache: dict[int, tuple[str, str]] = {}  # see header_pairs
        self._address_epoch: int | None = None

    # --- primitives -------------------------------------------------------------------------

    def fingerprint(self, value: bytes) -> str:
        """``fp:`` + 12 hex of HMAC-SHA256: equal values correlate, nobody can read them back."""
        digest = hmac.new(self._key, value, hashlib.sha256).hexdigest()
        return "fp:" + digest[:_FINGERPRINT_HEX]

    def is_secret_name(self, name: str) -> bool:
        """Whether a field called ``name`` must be masked (case, ``-`` and ``_`` ignored)."""
        cached = self._secret_cache.get(name)
        if cached is None:
            normalised = _normalise_name(name)
            words = {w.lower() for w in _WORDS.findall(name)}  # card[number], userPwd, api_otp
            cached = (
                normalised in _SECRET_WHOLE_NAMES
                or not words.isdisjoint(_SECRET_WHOLE_NAMES)
                or self._secret_pattern.search(normalised) is not None
            )
            if len(self._secret_cache) >= _CACHE_LIMIT:  # attacker-chosen names: stay bounded
                self._secret_cache.clear()
            self._secret_cache[name] = cached
        return cached

    # --- headers ----------------------------------------------------------------------------

    def headers(self, headers: Sequence[tuple[bytes, bytes]]) -> list[list[str]]:
        """ASGI raw headers as ``[[name, value], ...]`` text with credentials and IPs replaced."""
        return [list(pair) for pair in self.header_pairs(headers)]

    def header_pairs(
        self, headers: Sequence[tuple[bytes, bytes]], *, address_epoch: int | None = None
    ) -> list[tuple[str, str]]:
        """``headers`` as ``(name, value)`` tuples: the same JSON, without a list per line.

        ``address_epoch`` is a value that changes whenever ``pseudonymise_ip`` may answer
        differently for an address (the flusher passes the pseudonym hour). With it, address
        lines are cached too, until it changes.
        """
        out: list[tuple[str, str]] = []
        cache = self._value_cache
        addresses = self._address_line_cache
        if address_epoch is not None and address_epoch != self._address_epoch:
            addresses.clear()
            self._address_epoch = address_epoch
        for line in headers:
            # Header lines repeat from request to request. The caches are keyed by a hash, so
            # they never hold a credential or an address itself (plaintext lives no longer than
            # one flush). ASGI servers give (name, value) tuples, hashed as they are.
            try:
                key = hash(line)
            except TypeError:  # a list
                key = hash(tuple(line))
            pair = cache.get(key)
            if pair is None and address_epoch is not None:
                pair = addresses.get(key)
            if pair is None:
                raw_name, raw_value = line
                name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
                lower = name.lower()
                kind = self._header_kind(lower)
                if kind == "address":
                    forwarded = lower == "forwarded"
                    value = self._forwarded(value) if forwarded else self._address_list(value)
                elif kind == "plain":  # any other name (Client-IP, Via, a custom one)
                    found = self._addresses_in_text(value)
                    if found is not None:
                        value, kind = found, "address"
                if kind == "address":  # depends on the hour's pseudonym key
                    pair = (name, value)
                    if address_epoch is not None:
                        if len(addresses) >= _CACHE_LIMIT:
                            addresses.clear()
                        addresses[key] = pair
                    out.append(pair)
                    continue
                if kind == "credential":
                    value = self._credential(lower, value, raw_value)
                elif kind == "url":
                    value = self._url(value)
                pair = (name, value)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[key] = pair
            out.append(pair)
        return out

    def _header_kind(self, name: str) -> str:
        kind = self._header_cache.get(name)
        if kind is None:
            if name in self._credential_headers or any(
                part in name for part in _CREDENTIAL_HEADER_PARTS
            ):
                kind = "credential"
            elif name in _ADDRESS_HEADERS:
                kind = "address"
            elif name in _URL_HEADERS:
                kind = "url"
            elif name in _SERVER_HEADERS:
                kind = "server"  # kept as it is
            else:
                kind = "plain"
            if len(self._header_cache) >= _CACHE_LIMIT:
                self._header_cache.clear()
            self._header_cache[name] = kind
        return kind

    def _credential(self, name: str, value: str, raw: bytes) -> str:
        if name in _AUTHORIZATION_HEADERS:
            scheme, _, rest = value.strip().partition(" ")
            rest = rest.strip()
            if rest and scheme.lower() in _AUTH_SCHEMES:
                return f"{scheme} {self.fingerprint(rest.encode('latin-1'))}"
        elif name == "cookie":
            return "; ".join(self._cookie(part) for part in value.split(";") if part.strip())
        return self.fingerprint(raw)

    def _cookie(self, pair: str) -> str:
        name, eq, value = pair.partition("=")
        if not eq:  # no name: the whole crumb may be the secret
            return self.fingerprint(pair.strip().encode("latin-1"))
        return f"{name.strip()}={self.fingerprint(value.strip().encode('latin-1'))}"

    def _address_list(self, value: str) -> str:
        """Each comma-separated element pseudonymised; garbage becomes ``ip:invalid``."""
        if "," not in value:  # the usual single address, without a generator and a join
            return self._pseudonymise_ip(_host(value)) if value.strip() else ""
        tokens = (t for t in value.split(",") if t.strip())
        return ", ".join(self._pseudonymise_ip(_host(t)) for t in tokens)

    def _addresses_in_text(self, value: str) -> str | None:
        """``value`` with every IP address standing in it pseudonymised (with or without port,
        brackets, quotes or zone, in lists, pairs, arrays or parentheses), the rest kept; None
        if it holds none."""
        if "." not in value and ":" not in value:
            return None
        found = False

        def replace(match: re.Match[str]) -> str:
            nonlocal found
            ip16 = canonical_ip(match.group())
            if ip16 is None:
                return match.group()
            found = True
            return self._pseudonymise_ip(ip_text(ip16))

        out = _ADDRESS_IN_TEXT.sub(replace, value)
        return out if found else None

    def _forwarded(self, value: str) -> str:
        """RFC 7239: pseudonymise ``for=``/``by=`` and keep the other pairs verbatim.

        A value that does not parse is treated as a plain address list, so a malformed header can
        never smuggle an address into the record.
        """
        elements: list[str] = []
        pairs: list[str] = []
        pos, end = 0, len(value)
        while True:
            match = _FORWARDED_PAIR.match(value, pos)
            if match is None:
                return self._address_list(value)
            key, raw = match.group(1), match.group(2)
            if key.lower() in _FORWARDED_ADDRESS_KEYS:
                pairs.append(f'{key}="{self._pseudonymise_ip(_host(raw))}"')
            else:
                pairs.append(f"{key}={raw}")
            pos = match.end()
            if pos >= end:
                break
            if value[pos] == ",":
                elements.append(";".join(pairs))
                pairs = []
            pos += 1  # a ";" or "," (the lookahead guarantees one of them)
        elements.append(";".join(pairs))
        return ", ".join(elements)

    def _url(self, value: str) -> str:
        base, mark, rest = value.partition("?")
        if "@" in base:
            base = _without_password(base)
        if not mark:
            return base
        query, hash_mark, fragment = rest.partition("#")
        return f"{base}?{self._mask_pairs(query)}{hash_mark}{fragment}"

    # --- query and bodies -------------------------------------------------------------------

    def query(self, query_string: bytes) -> str:
        """The query string as text with secret-named values masked, everything else verbatim."""
        return self._mask_pairs(_text(query_string))

    def _mask_pairs(self, text: str) -> str:
        """Mask ``name=value`` pairs of a urlencoded text without re-encoding the others."""
        if not text:
            return text
        if ";" in text:  # a pair separator to python-multipart (Starlette's forms) and others
            parts = _PAIR_SEPARATORS.split(text)  # pairs at even places, separators between
            self._mask_parts(parts, 2)
            return "".join(parts)
        parts = text.split("&")
        self._mask_parts(parts, 1)
        return "&".join(parts)

    def _mask_parts(self, parts: list[str], step: int) -> None:
        """Mask the pairs at every ``step``-th place (2: separators between). A part without
        ``=`` after a masked value and a ``;`` may be the rest of that value (a secret holding a
        ``;``): it goes with the value, separator and all."""
        secret_names = self._encoded_name_cache
        masked = False
        for i in range(0, len(parts), step):
            if i and parts[i - 1] == "&":
                masked = False  # only ';' can join a secret's tail to it
            name, eq, value = parts[i].partition("=")
            if not eq:
                if masked and step == 2 and parts[i - 1] == ";":
                    parts[i - 1] = parts[i] = ""
                continue
            secret = secret_names.get(name)
            if secret is None:  # parameter names repeat: decode and classify each once
                secret = self.is_secret_name(unquote_plus(name, encoding="latin-1"))
                if len(secret_names) >= _CACHE_LIMIT:
                    secret_names.clear()
                secret_names[name] = secret
            masked = secret
            if secret:
                parts[i] = f"{name}={SECRET_MASK}"
            elif self._value_redactors:
                plain = unquote_plus(value, encoding="latin-1")
                redacted = self.redact_value(plain)
                if redacted != plain:
                    parts[i] = f"{name}={quote_plus(redacted)}"

    def redact_value(self, text: str) -> str:
        """A string value through every redactor plugin, in order."""
        for redact in self._value_redactors:
            text = redact(text)
        return text

    def body(
        self, content_type: str | None, data: bytes, *, size: int, truncated: bool
    ) -> dict[str, Any]:
        """The storable form of a captured body: masked JSON or form, else only a digest.

        ``data`` is what was captured (a prefix when ``truncated``); ``size`` is the full size.
        A truncated body is never parsed: half a document would hide where its secrets are.
        """
        media = (content_type or "").partition(";")[0].strip().lower() or None
        out: dict[str, Any] = {"size": size, "truncated": truncated, "type": media}
        if not data and not truncated:
            out["kind"] = "empty"
            return out
        if not truncated and media is not None:
            if media == _JSON_TYPE or media.endswith("+json"):
                masked = self._json(data)
                if masked is not None:
                    out["kind"] = "json"
                    out["json"] = masked[0]
                    return out
            elif media == _FORM_TYPE and _FORM_SAFE.fullmatch(data):
                # Only a body that really is urlencoded: anything else labelled as a form
                # (a JSON document, free text) would keep its secrets where no name marks them.
                out["kind"] = "form"
                out["form"] = self._mask_pairs(_text(data))
                return out
        out["kind"] = "digest"
        out["sha256_prefix" if truncated else "sha256"] = hashlib.sha256(data).hexdigest()
        return out

    def _json(self, data: bytes) -> tuple[Any] | None:
        """The parsed, masked document (in a 1-tuple, as ``null`` is a valid document), or None.

        Iterative rather than recursive: orjson accepts 1024 levels, more than Python's stack.
        """
        try:
            root = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        stack: list[tuple[Any, int]] = [(root, 1)]
        known, redactors = self._secret_cache, self._value_redactors
        while stack:
            node, depth = stack.pop()
            if depth > _MAX_JSON_DEPTH:
                return None
            if isinstance(node, dict):
                for key, value in node.items():
                    secret = known.get(key)  # is_secret_name's cache, without the call
                    if secret is None:
                        secret = self.is_secret_name(key)
                    if secret:
                        node[key] = SECRET_MASK  # same key: the dict's size does not change
                    elif isinstance(value, _CONTAINERS):
                        stack.append((value, depth + 1))
                    elif redactors and isinstance(value, str):
                        node[key] = self.redact_value(value)
            elif isinstance(node, list):
                for i, item in enumerate(node):
                    if isinstance(item, _CONTAINERS):
                        stack.append((item, depth + 1))
                    elif redactors and isinstance(item, str):
                        node[i] = self.redact_value(item)
        return (root,)
