"""Tests for meterwall.redaction: what leaves the request must be safe to store for 24 h."""

from __future__ import annotations

import hashlib
import hmac
import re
import string
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterwall.redaction import SECRET_MASK, Redactor

KEY = b"k" * 32
IP_KEY = b"ip-test-key"
_FORM = "application/x-www-form-urlencoded"


def pseudo(address: str) -> str:
    """Test pseudonymiser: garbage -> ip:invalid, like the real one; never raises."""
    if not address or not all(c in string.hexdigits + ".:" for c in address):
        return "ip:invalid"
    return "ip:" + hmac.new(IP_KEY, address.encode(), hashlib.sha256).hexdigest()[:16]


@pytest.fixture
def redactor() -> Redactor:
    return Redactor(KEY, pseudo)


def header(r: Redactor, name: str, value: str) -> str:
    [[out_name, out_value]] = r.headers([(name.encode(), value.encode("latin-1"))])
    assert out_name == name
    return out_value


def dump(value: Any) -> bytes:
    return orjson.dumps(value)


# --- fingerprints and credential headers ---------------------------------------------------------


def test_fingerprint_format_and_keying(redactor: Redactor) -> None:
    fp = redactor.fingerprint(b"tok")
    assert fp.startswith("fp:")
    assert len(fp) == 3 + 12
    assert all(c in "0123456789abcdef" for c in fp[3:])
    assert fp == redactor.fingerprint(b"tok")
    assert fp != redactor.fingerprint(b"tok2")
    assert fp != Redactor(b"o" * 32, pseudo).fingerprint(b"tok")
    expected = hmac.new(KEY, b"tok", hashlib.sha256).hexdigest()[:12]
    assert fp == "fp:" + expected


def test_short_key_refused() -> None:
    with pytest.raises(ValueError, match="fingerprint_key"):
        Redactor(b"short", pseudo)


@pytest.mark.parametrize(
    "name",
    [
        "x-api-key",
        "x-auth-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-amz-security-token",
        "set-cookie",
        "x-my-token-thing",
        "x-client-secret",
        "x-session-id",
        "x-user-password",
        "my-apikey",
        "x-authorization",
        "x-auth-key",
        "ocp-apim-subscription-key",
        "x-hub-signature-256",
        "x-goog-credential",
    ],
)
def test_credential_headers_fingerprinted(redactor: Redactor, name: str) -> None:
    value = "s3cr3t-value-123"
    out = header(redactor, name, value)
    assert out == redactor.fingerprint(value.encode())
    assert value not in out


def test_equal_tokens_correlate_across_requests(redactor: Redactor) -> None:
    a = header(redactor, "x-api-key", "abc")
    b = header(redactor, "x-api-key", "abc")
    c = header(redactor, "x-api-key", "abd")
    assert a == b
    assert a != c


def test_authorization_keeps_scheme(redactor: Redactor) -> None:
    out = header(redactor, "authorization", "Bearer eyJhbGciOi.payload.sig")
    assert out == "Bearer " + redactor.fingerprint(b"eyJhbGciOi.payload.sig")
    assert "eyJ" not in out
    assert header(redactor, "proxy-authorization", "Basic dXNlcjpwdw==").startswith("Basic fp:")


def test_authorization_unknown_scheme_or_bare_token_fingerprinted_whole(
    redactor: Redactor,
) -> None:
    assert header(redactor, "authorization", "hunter2") == redactor.fingerprint(b"hunter2")
    out = header(redactor, "authorization", "hunter2 more")
    assert out == redactor.fingerprint(b"hunter2 more")
    assert "hunter2" not in out


def test_cookie_keeps_names_drops_values(redactor: Redactor) -> None:
    out = header(redactor, "cookie", "sid=abc123; theme=dark;lang=en")
    assert out == (
        f"sid={redactor.fingerprint(b'abc123')}; theme={redactor.fingerprint(b'dark')}; "
        f"lang={redactor.fingerprint(b'en')}"
    )
    for secret in ("abc123", "dark", "=en"):
        assert secret not in out


def test_extra_credential_headers() -> None:
    r = Redactor(KEY, pseudo, extra_credential_headers=["X-Tenant-Key"])
    assert header(r, "x-tenant-key", "v") == r.fingerprint(b"v")


def test_other_headers_kept(redactor: Redactor) -> None:
    headers = [(b"content-type", b"application/json"), (b"user-agent", b"curl/8.0 \xe9")]
    assert redactor.headers(headers) == [
        ["content-type", "application/json"],
        ["user-agent", "curl/8.0 \xe9"],
    ]


def test_referer_query_masked(redactor: Redactor) -> None:
    out = header(redactor, "referer", "https://a.example/p?token=abc&q=1#frag")
    assert out == f"https://a.example/p?token={SECRET_MASK}&q=1#frag"


def test_a_password_in_a_url_header_is_masked(redactor: Redactor) -> None:
    out = header(redactor, "referer", "https://ada:hunter2@a.example/p?q=1")
    assert out == f"https://ada:{SECRET_MASK}@a.example/p?q=1"
    out = header(redactor, "referer", "https://ghp_tok3n@github.example/org")
    assert out == f"https://{SECRET_MASK}@github.example/org"
    assert header(redactor, "referer", "https://a.example/@ada") == "https://a.example/@ada"
    assert header(redactor, "referer", "https://a.example#team@x") == "https://a.example#team@x"


@pytest.mark.parametrize("name", ["x-original-uri", "x-original-url", "x-forwarded-uri"])
def test_urls_proxies_pass_on_have_their_query_masked(redactor: Redactor, name: str) -> None:
    out = header(redactor, name, "/login?access_token=tok_9f8e7d&next=/home")
    assert out == f"/login?access_token={SECRET_MASK}&next=/home"


# --- client addresses ----------------------------------------------------------------------------


def test_x_forwarded_for_every_element(redactor: Redactor) -> None:
    value = "203.0.113.7, 10.0.0.1:8080,[2001:db8::1]:443, 2001:db8::2"
    out = header(redactor, "x-forwarded-for", value)
    assert out == ", ".join(
        [pseudo("203.0.113.7"), pseudo("10.0.0.1"), pseudo("2001:db8::1"), pseudo("2001:db8::2")]
    )
    for plain in ("203.0.113.7", "10.0.0.1", "2001:db8::1", "2001:db8::2", "8080"):
        assert plain not in out


@pytest.mark.parametrize(
    "name",
    ["x-real-ip", "true-client-ip", "cf-connecting-ip", "x-client-ip", "fastly-client-ip"],
)
def test_single_address_headers(redactor: Redactor, name: str) -> None:
    out = header(redactor, name, "198.51.100.23")
    assert out == pseudo("198.51.100.23")
    assert "198.51.100.23" not in out


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("client-ip", "198.51.100.23", "{198.51.100.23}"),
     ("x-origin-addr", "[2001:db8::5]:443, 198.51.100.9:80",
      "[{2001:db8::5}]:443, {198.51.100.9}:80"),
     ("x-upstream", '"203.0.113.4"', '"{203.0.113.4}"'),
     ("x-spaced", "198.51.100.1 198.51.100.2,\t198.51.100.3",
      "{198.51.100.1} {198.51.100.2},\t{198.51.100.3}"),
     ("x-obfuscated-port", "198.51.100.4:_x", "{198.51.100.4}:_x"),
     ("via", "1.1 10.0.0.1, 1.0 fred", "1.1 {10.0.0.1}, 1.0 fred"),
     ("x-mixed", "198.51.100.7, unknown", "{198.51.100.7}, unknown"),
     ("x-pairs", "for=198.51.100.5;proto=https", "for={198.51.100.5};proto=https"),
     ("x-note", "note=203.0.113.9", "note={203.0.113.9}"),
     ("x-array", '["1.2.3.4","5.6.7.8"]', '["{1.2.3.4}","{5.6.7.8}"]'),
     ("x-bracketed-list", "[1.2.3.4, 5.6.7.8]", "[{1.2.3.4}, {5.6.7.8}]"),
     ("x-wrapped", "(1.2.3.4) <5.6.7.8> '9.9.9.9'", "({1.2.3.4}) <{5.6.7.8}> '{9.9.9.9}'"),
     ("x-query", "a=1.2.3.4&b=2", "a={1.2.3.4}&b=2"),
     ("x-network", "1.2.3.4/32", "{1.2.3.4}/32"),
     ("x-labelled", "ip:1.2.3.4, client:5.6.7.8", "ip:{1.2.3.4}, client:{5.6.7.8}"),
     ("x-mapped", "::ffff:1.2.3.4", "{1.2.3.4}"),
     ("x-link-local", "fe80::1%eth0, [fe80::2%25eth0]:80", "{fe80::1}, [{fe80::2}]:80"),
     ("x-url", "http://203.0.113.9/path", "http://{203.0.113.9}/path"),
     ("x-path", "see /10.0.0.1", "see /{10.0.0.1}")],
)  # fmt: skip
def test_every_address_standing_in_any_header_is_pseudonymised(
    redactor: Redactor, name: str, value: str, expected: str
) -> None:
    """Each address in its canonical form (a mapped IPv6 address is its IPv4 address, a zone
    names a link, not a host), so the pseudonym is the same however it was written."""
    out = header(redactor, name, value)
    assert out == re.sub(r"\{([^}]*)\}", lambda m: pseudo(m.group(1)), expected)


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-version", "1.2.3"), ("content-length", "1024"), ("x-request-id", "deadbeef"),
     ("x-hex", "cafe:f00d"), ("x-time", "12:30:45"), ("x-empty", ", ,"),
     ("x-glued", "ip:203.0.113.9x"), ("x-five-parts", "1.2.3.4.5"), ("x-octet", "256.1.1.1"),
     ("x-mac", "00:1a:2b:3c:4d:5e"), ("host", "10.0.0.5:8000"),
     ("date", "Mon, 30 Nov 2026 05:00:00 GMT"),
     ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0.6099.109 Safari/537.36"),
     ("user-agent", "Mozilla/5.0 (Windows NT 10.0) Chrome/131.0.0.0 Safari/537.36"),
     ("x-client", "MyApp/1.0.0.1 (build 7)")],
)  # fmt: skip
def test_values_without_an_address_and_the_host_stay_as_they_are(
    redactor: Redactor, name: str, value: str
) -> None:
    assert header(redactor, name, value) == value


def test_forwarded_pairs(redactor: Redactor) -> None:
    value = (
        'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711";host=a.example'
    )
    out = header(redactor, "forwarded", value)
    assert out == (
        f'for="{pseudo("192.0.2.60")}";proto=http;by="{pseudo("203.0.113.43")}", '
        f'For="{pseudo("2001:db8:cafe::17")}";host=a.example'
    )
    for plain in ("192.0.2.60", "203.0.113.43", "2001:db8:cafe::17", "4711"):
        assert plain not in out


@pytest.mark.parametrize(
    "value", ["192.0.2.60", "for=192.0.2.60 junk", 'for="192.0.2.60', "for=192.0.2.60,", ";;"]
)
def test_malformed_forwarded_never_leaks(redactor: Redactor, value: str) -> None:
    out = header(redactor, "forwarded", value)
    assert "192.0.2.60" not in out
    assert "ip:" in out or out == ""


def test_garbage_address_becomes_invalid(redactor: Redactor) -> None:
    assert header(redactor, "x-forwarded-for", "unknown, 1.2.3.4") == (
        "ip:invalid, " + pseudo("1.2.3.4")
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("203.0.113.7", pseudo("203.0.113.7")), (" 10.0.0.1:8080 ", pseudo("10.0.0.1")),
     ("[2001:db8::1]:443", pseudo("2001:db8::1")), ("unknown", "ip:invalid"), ("  ", ""),
     ("", ""), (",", ""), ("1.2.3.4,", pseudo("1.2.3.4"))],
)  # fmt: skip
def test_one_address_or_none(redactor: Redactor, value: str, expected: str) -> None:
    assert header(redactor, "x-forwarded-for", value) == expected


def test_header_pairs_are_the_headers_as_tuples(redactor: Redactor) -> None:
    lines: list[Any] = [
        (b"authorization", b"Bearer abc"), [b"x-forwarded-for", b"203.0.113.7"],
        [b"cookie", b"a=1"], (b"accept", b"*/*"), (b"referer", b"https://a/?token=t&q=1"),
    ]  # fmt: skip
    expected = [tuple(pair) for pair in redactor.headers(lines)]
    for _ in range(2):  # the second time from the cache; a list line is cached as its tuple
        assert redactor.header_pairs(lines) == expected
        assert redactor.header_pairs([tuple(line) for line in lines]) == expected
    assert expected[0] == ("authorization", "Bearer " + redactor.fingerprint(b"abc"))
    assert expected[1] == ("x-forwarded-for", pseudo("203.0.113.7"))


def test_address_lines_are_cached_only_within_an_address_epoch() -> None:
    hour = [1]
    calls: list[str] = []

    def hourly(address: str) -> str:  # like the flusher's: the key changes with the hour
        calls.append(address)
        return f"ip:{hour[0]}:" + pseudo(address)[3:]

    r = Redactor(KEY, hourly)
    lines = [(b"x-forwarded-for", b"203.0.113.7, 10.0.0.1"), (b"forwarded", b"for=192.0.2.60")]
    first = r.header_pairs(lines, address_epoch=1)
    assert r.header_pairs(lines, address_epoch=1) == first
    assert len(calls) == 3  # the second time from the cache
    hour[0] = 2
    second = r.header_pairs(lines, address_epoch=2)
    assert second == [(n, v.replace("ip:1:", "ip:2:")) for n, v in first]
    assert r.header_pairs(lines) == second  # without an epoch: never from the cache
    assert len(calls) == 9
    assert "203.0.113.7" not in str(second)


# --- query strings -------------------------------------------------------------------------------


def test_query_masks_secret_params_keeps_others_byte_exact(redactor: Redactor) -> None:
    qs = b"q=caf%C3%A9+au+lait&api_key=abc&x=1&x=2&access-token=zz&flag&Password=p%20w&e="
    out = redactor.query(qs)
    assert out == ("q=caf%C3%A9+au+lait&api_key=***&x=1&x=2&access-token=***&flag&Password=***&e=")


def test_query_percent_encoded_secret_name(redactor: Redactor) -> None:
    for _ in range(2):  # names are classified once, then cached in their encoded form
        out = redactor.query(b"pass%77ord=x&user%5Btoken%5D=y&pass%78ord=z")
        assert out == "pass%77ord=***&user%5Btoken%5D=***&pass%78ord=z"


def test_query_empty_and_non_utf8(redactor: Redactor) -> None:
    assert redactor.query(b"") == ""
    assert redactor.query(b"a=\xff") == "a=\xff"


@pytest.mark.parametrize("name", ["shipping", "shipping_address", "spinner", "typing", "pinned"])
def test_pin_only_as_whole_name(redactor: Redactor, name: str) -> None:
    assert not redactor.is_secret_name(name)
    assert redactor.query(f"{name}=v".encode()) == f"{name}=v"


@pytest.mark.parametrize(
    "name",
    ["pin", "PIN", "pin_code", "card_number", "CVV", "ssn", "IBAN", "otp", "sessionId",
     "client_secret", "X-Signature", "privateKey", "AWS_ACCESS_KEY_ID", "authorization"],
)  # fmt: skip
def test_secret_names(redactor: Redactor, name: str) -> None:
    assert redactor.is_secret_name(name)


def test_extra_secret_fields() -> None:
    r = Redactor(KEY, pseudo, extra_secret_fields=["Date-Of-Birth"])
    assert r.query(b"date_of_birth=1990&name=x") == "date_of_birth=***&name=x"


# --- bodies --------------------------------------------------------------------------------------


def test_json_masking_nested_and_lists(redactor: Redactor) -> None:
    doc = {
        "user": {"name": "ann", "password": "hunter2", "cards": [{"cvv": 123}]},
        "items": [{"token": {"a": 1}}, {"shipping": "road 1"}, [{"apiKey": ["k1", "k2"]}]],
        "Authorization": None,
        "pin": 1234,
    }
    out = redactor.body("application/json; charset=utf-8", dump(doc), size=999, truncated=False)
    assert out == {
        "size": 999,
        "truncated": False,
        "type": "application/json",
        "kind": "json",
        "json": {
            "user": {"name": "ann", "password": SECRET_MASK, "cards": SECRET_MASK},
            "items": [
                {"token": SECRET_MASK},
                {"shipping": "road 1"},
                [{"apiKey": SECRET_MASK}],
            ],
            "Authorization": SECRET_MASK,
            "pin": SECRET_MASK,
        },
    }
    text = dump(out)
    for secret in (b"hunter2", b"123", b"k1", b"1234"):
        assert secret not in text


def test_plus_json_and_scalar_documents(redactor: Redactor) -> None:
    out = redactor.body("application/problem+json", b"null", size=4, truncated=False)
    assert out["kind"] == "json"
    assert out["json"] is None
    assert out["type"] == "application/problem+json"


def test_json_parse_failure_is_digest(redactor: Redactor) -> None:
    data = b'{"password": "hunter2"'
    out = redactor.body("application/json", data, size=len(data), truncated=False)
    assert out == {
        "size": len(data),
        "truncated": False,
        "type": "application/json",
        "kind": "digest",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_too_deep_json_is_digest(redactor: Redactor) -> None:
    data = b"[" * 300 + b"]" * 300
    out = redactor.body("application/json", data, size=len(data), truncated=False)
    assert out["kind"] == "digest"
    dump(out)


def test_truncated_body_digest_of_prefix(redactor: Redactor) -> None:
    data = b'{"password": "hun'
    out = redactor.body("application/json", data, size=5000, truncated=True)
    assert out == {
        "size": 5000,
        "truncated": True,
        "type": "application/json",
        "kind": "digest",
        "sha256_prefix": hashlib.sha256(data).hexdigest(),
    }
    assert "sha256" not in out


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data; boundary=xyz", "text/plain", "application/octet-stream", None],
)
def test_other_types_are_digest(redactor: Redactor, content_type: str | None) -> None:
    data = b"--xyz\r\nContent-Disposition: form-data; name=password\r\n\r\nhunter2\r\n--xyz--"
    out = redactor.body(content_type, data, size=len(data), truncated=False)
    assert out["kind"] == "digest"
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert b"hunter2" not in dump(out)


def test_form_masking(redactor: Redactor) -> None:
    data = b"user=ann&password=hunter2&card%5Bnumber%5D=4111&note=a+b%21"
    out = redactor.body(
        "Application/X-WWW-Form-Urlencoded; charset=utf-8", data, size=len(data), truncated=False
    )
    assert out == {
        "size": len(data),
        "truncated": False,
        "type": "application/x-www-form-urlencoded",
        "kind": "form",
        "form": "user=ann&password=***&card%5Bnumber%5D=***&note=a+b%21",
    }


def test_semicolon_separated_pairs_are_masked_too(redactor: Redactor) -> None:
    """python-multipart (Starlette's and FastAPI's forms) splits pairs on ';' as well as '&':
    the app gets password=hunter2 from such a body, so the record must not."""
    data = b"user=ada;password=hunter2&token=t0k;note=a"
    out = redactor.body(_FORM, data, size=len(data), truncated=False)
    assert out["form"] == "user=ada;password=***&token=***;note=a"
    assert redactor.query(b"q=1;api_key=sk_live_1") == "q=1;api_key=***"
    # a secret holding ';' was masked whole before ';' split pairs: it still is
    assert redactor.query(b"api_key=AKIA;SECRETTAIL") == "api_key=***"
    assert redactor.query(b"password=hunter2;x7Q&user=bob;page") == "password=***&user=bob;page"
    # only ';' joins a tail: after '&' a bare name is its own, and so is what follows it
    assert redactor.query(b"password=x&debug;verbose") == "password=***&debug;verbose"


def test_truncated_form_is_digest(redactor: Redactor) -> None:
    out = redactor.body(_FORM, b"password=hun", size=100, truncated=True)
    assert out["kind"] == "digest"
    assert "sha256_prefix" in out


def test_empty_body(redactor: Redactor) -> None:
    assert redactor.body(None, b"", size=0, truncated=False) == {
        "size": 0,
        "truncated": False,
        "type": None,
        "kind": "empty",
    }
    assert redactor.body("application/json", b"", size=0, truncated=False)["kind"] == "empty"


# --- property: a password never survives ---------------------------------------------------------

SENTINEL = "\u2603"  # appears only inside password values, so any leak is detectable
_SAFE = string.ascii_letters + string.digits + " .-"

_leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(_SAFE, max_size=8)
_secret_leaf = st.text(_SAFE, max_size=6).map(lambda s: s + SENTINEL + s)
_secret_values = st.recursive(
    _secret_leaf,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(st.text(_SAFE, max_size=6), inner, min_size=1, max_size=3)
    ),
    max_leaves=6,
)
_password_names = st.sampled_from(
    ["password", "Password", "user_password", "PASSWORD", "new-password"]
)


def _with_password(base: dict[str, Any], name: str, secret: Any) -> dict[str, Any]:
    return {**base, name: secret}


def _trees(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    dicts = st.dictionaries(st.text(_SAFE, max_size=8), children, max_size=4)
    return (
        st.lists(children, max_size=4)
        | dicts
        | st.builds(_with_password, dicts, _password_names, _secret_values)
    )


_documents = st.builds(
    _with_password,
    st.dictionaries(st.text(_SAFE, max_size=8), st.recursive(_leaves, _trees, max_leaves=25)),
    _password_names,
    _secret_values,
)


@settings(max_examples=200, deadline=None)
@given(doc=_documents)
def test_password_never_survives(doc: dict[str, Any]) -> None:
    redactor = Redactor(KEY, pseudo)
    data = orjson.dumps(doc)
    assert SENTINEL.encode() in data
    out = redactor.body("application/json", data, size=len(data), truncated=False)
    assert out["kind"] == "json"
    assert SENTINEL.encode() not in orjson.dumps(out)


def test_short_secret_names_match_only_whole_names() -> None:
    from meterwall.redaction import Redactor

    redactor = Redactor(b"k" * 32, lambda text: "ip:x")
    for harmless in ["author", "cardinality", "discard", "footprint", "classname", "shipping"]:
        assert not redactor.is_secret_name(harmless), harmless
    for secret in ["auth", "Card", "cvv", "SSN", "otp", "card_number", "auth-token", "user_pwd",
                   "card[number]", "userPwd", "X-OTP"]:  # fmt: skip
        assert redactor.is_secret_name(secret), secret
