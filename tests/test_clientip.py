"""Tests for meterwall.clientip: whose address a request is, and one byte form for it."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterwall.clientip import TrustedProxies, canonical_ip, ip_text, network_prefix
from meterwall.errors import ConfigurationError
from meterwall.settings import Settings

PROXIES = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1 ::1,2001:db8:ffff::/48")
FWD_PROXIES = PROXIES.reading("forwarded")  # MW_PROXY_HEADER=forwarded


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode()) for v in values]


def fwd(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"forwarded", v.encode()) for v in values]


# --- canonical form ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("[::ffff:1.2.3.4]:80", "1.2.3.4"),
        (" 1.2.3.4:8080 ", "1.2.3.4"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("[2001:db8::1]:_hidden", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%eth0]:443", "fe80::1"),
    ],
)
def test_canonical_forms(text: str, expected: str) -> None:
    ip16 = canonical_ip(text)
    assert ip16 is not None
    assert len(ip16) == 16
    assert ip_text(ip16) == expected
    assert ip16 == canonical_ip(expected)


def test_ipv4_is_stored_mapped() -> None:
    assert canonical_ip("1.2.3.4") == bytes(10) + b"\xff\xff\x01\x02\x03\x04"
    assert canonical_ip("::1") == bytes(15) + b"\x01"


@pytest.mark.parametrize(
    "text",
    ["", " ", "unknown", "_hidden", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.4:",
     "1.2.3.4:99999999", "[1::2", "1::2]", "[]:80", "::g", "2001:db8::1:2:3:4:5:6:7", "%eth0",
     "localhost", "1.2.3.4%eth0", "\x00", "\u0661.\u0662.\u0663.\u0664", "[" * 200, "1" * 10_000],
)  # fmt: skip
def test_garbage_is_none(text: str) -> None:
    assert canonical_ip(text) is None


def test_non_strings_are_none() -> None:
    for value in (None, 1234, b"1.2.3.4", ["1.2.3.4"]):
        assert canonical_ip(value) is None  # type: ignore[arg-type]


@given(st.ip_addresses(v=4))
def test_ipv4_equals_ipv4_mapped_and_round_trips(address: IPv4Address) -> None:
    ip16 = canonical_ip(str(address))
    assert ip16 is not None
    assert ip16 == canonical_ip(f"::ffff:{address}")
    assert ip16 == canonical_ip(f"[::ffff:{address}]:443")
    assert ip_text(ip16) == str(address)


@given(st.ip_addresses(v=6))
def test_ipv6_round_trips(address: IPv6Address) -> None:
    ip16 = canonical_ip(str(address))
    assert ip16 == address.packed
    assert canonical_ip(ip_text(ip16)) == ip16


@given(st.text(max_size=80))
def test_never_raises(text: str) -> None:
    ip16 = canonical_ip(text)
    assert ip16 is None or len(ip16) == 16
    for headers in (fwd(_latin1(text)), xff(_latin1(text))):
        result = PROXIES.resolve("10.0.0.1", headers)
        assert result == "10.0.0.1" or canonical_ip(result or "") is not None


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def test_network_prefix() -> None:
    ip16 = canonical_ip("203.0.113.77")
    assert ip16 is not None
    assert network_prefix(ip16) == canonical_ip("203.0.113.0")
    assert network_prefix(ip16) == network_prefix(canonical_ip("::ffff:203.0.113.1") or b"")
    ip6 = canonical_ip("2001:db8:1234:5678::9")
    assert ip6 is not None
    assert network_prefix(ip6) == canonical_ip("2001:db8:1234::")
    assert network_prefix(ip6) != network_prefix(canonical_ip("2001:db8:1235::9") or b"")


# --- trusted proxies -----------------------------------------------------------------------------


def test_parse_and_value_semantics() -> None:
    parsed = TrustedProxies.parse(" 127.0.0.1,\n::1  10.0.0.0/8,, ")
    same = TrustedProxies(["127.0.0.1", IPv6Network("::1/128"), "10.0.0.0/8"])
    assert parsed == same
    assert hash(parsed) == hash(same)
    assert parsed == TrustedProxies(["::ffff:127.0.0.1", "::1", "10.0.0.0/8", "::1"])
    assert parsed != TrustedProxies(["127.0.0.1"])
    assert parsed != "127.0.0.1"
    assert "10.0.0.0/8" in repr(parsed)
    assert parsed
    assert not TrustedProxies()
    assert not TrustedProxies.parse("  ")
    assert TrustedProxies() == TrustedProxies.parse("")


@pytest.mark.parametrize("text", ["10.0.0.0/8, nope", "10.0.0.1/8", "::1/129", "1.2.3.4:80"])
def test_parse_errors_name_the_setting_and_entry(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TrustedProxies.parse(text, setting="MW_SOMETHING")
    assert info.value.setting == "MW_SOMETHING"
    assert str(info.value).startswith("MW_SOMETHING: ")
    assert repr(text.split(", ")[-1]) in info.value.problem
    with pytest.raises(ConfigurationError, match="MW_TRUSTED_PROXIES"):
        TrustedProxies.parse(text)


def test_is_trusted_matches_ipv4_networks_against_mapped_addresses() -> None:
    for text in ("10.1.2.3", "::ffff:10.1.2.3", "127.0.0.1", "::1", "2001:db8:ffff:1::5"):
        assert PROXIES.is_trusted(canonical_ip(text) or b""), text
    for text in ("11.0.0.1", "127.0.0.2", "::2", "2001:db8:fffe::1", "::a00:1"):
        assert not PROXIES.is_trusted(canonical_ip(text) or b""), text


def test_no_proxies_means_the_peer_unchanged() -> None:
    assert TrustedProxies().resolve("10.0.0.1", xff("198.51.100.5")) == "10.0.0.1"
    assert TrustedProxies().resolve(None, xff("198.51.100.5")) is None


def test_spoofed_header_from_untrusted_peer_is_ignored() -> None:
    headers = xff("10.0.0.7") + fwd("for=10.0.0.8")
    assert PROXIES.resolve("198.51.100.5", headers) == "198.51.100.5"
    assert PROXIES.resolve("[2001:db8::9]:1234", headers) == "[2001:db8::9]:1234"
    assert PROXIES.resolve("garbage", headers) == "garbage"
    assert PROXIES.resolve(None, headers) is None


def test_header_from_trusted_peer_is_honoured() -> None:
    assert PROXIES.resolve("127.0.0.1", xff("198.51.100.5")) == "198.51.100.5"
    assert PROXIES.resolve("::ffff:10.0.0.1", xff(" [::ffff:198.51.100.5]:80")) == "198.51.100.5"
    assert PROXIES.resolve("::1", xff("[2001:db8::7]:99")) == "2001:db8::7"
    assert PROXIES.resolve("127.0.0.1", []) == "127.0.0.1"
    assert PROXIES.resolve("127.0.0.1", xff("", " , ")) == "127.0.0.1"


def test_multi_hop_chain_walks_right_to_left() -> None:
    # The client forged the first two entries; 192.0.2.1 is what our edge proxy saw.
    chain = "6.6.6.6, 10.9.9.9, 192.0.2.1, 10.0.0.2"
    assert PROXIES.resolve("10.0.0.1", xff(chain)) == "192.0.2.1"
    # Repeated header lines are one list, in order.
    assert PROXIES.resolve("10.0.0.1", xff("6.6.6.6, 192.0.2.1", "10.0.0.3", "10.0.0.2")) == (
        "192.0.2.1"
    )
    assert PROXIES.resolve("10.0.0.1", xff("10.0.0.4, ::1, 10.0.0.2")) == "10.0.0.4"


def test_unusable_entry_stops_at_the_last_trusted_hop() -> None:
    assert PROXIES.resolve("10.0.0.1", xff("192.0.2.1, unknown, 10.0.0.2")) == "10.0.0.2"
    assert PROXIES.resolve("10.0.0.1", xff("192.0.2.1, garbage")) == "10.0.0.1"
    assert FWD_PROXIES.resolve("10.0.0.1", fwd("for=192.0.2.1, for=_hidden")) == "10.0.0.1"
    assert FWD_PROXIES.resolve("10.0.0.1", fwd("for=unknown, for=10.0.0.2")) == "10.0.0.2"


def test_forwarded_header() -> None:
    value = 'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"'
    assert FWD_PROXIES.resolve("10.0.0.1", fwd(value)) == "2001:db8:cafe::17"
    assert FWD_PROXIES.resolve("10.0.0.1", fwd('for="[2001:db8::1]:4711";proto=https')) == (
        "2001:db8::1"
    )
    two_lines = fwd('for="198.51.100.17:80"', 'proto=https;for=10.0.0.9;by="[::1]"')
    assert FWD_PROXIES.resolve("10.0.0.1", two_lines) == "198.51.100.17"
    assert FWD_PROXIES.resolve("10.0.0.1", fwd('for="\\1\\9\\8.51.100.1"')) == "198.51.100.1"


def test_only_the_configured_header_is_believed() -> None:
    """A proxy that appends to X-Forwarded-For passes a client's own Forwarded header through
    (nginx, HAProxy, ALB): reading it would let the client choose its address."""
    both = fwd("for=198.51.100.9") + xff("203.0.113.7")
    assert PROXIES.resolve("10.0.0.1", both) == "203.0.113.7"
    assert PROXIES.resolve("10.0.0.1", fwd("for=198.51.100.9")) == "10.0.0.1"
    assert FWD_PROXIES.resolve("10.0.0.1", both) == "198.51.100.9"
    assert FWD_PROXIES.resolve("10.0.0.1", xff("203.0.113.7")) == "10.0.0.1"
    settings = Settings(records="off", trusted_proxies=PROXIES, proxy_header="forwarded")
    assert settings.trusted_proxies == FWD_PROXIES
    env = {"MW_TRUSTED_PROXIES": "10.0.0.0/8", "MW_RECORDS": "off"}
    assert Settings.from_env(env).trusted_proxies.header == "x-forwarded-for"
    env["MW_PROXY_HEADER"] = "Forwarded"
    assert Settings.from_env(env).trusted_proxies.resolve("10.0.0.1", both) == "198.51.100.9"
    with pytest.raises(ConfigurationError, match="MW_PROXY_HEADER"):
        Settings.from_env({"MW_PROXY_HEADER": "x-real-ip", "MW_RECORDS": "off"})
    # a TrustedProxies given in code keeps the header it names; a contradiction is refused
    chosen = TrustedProxies(["10.0.0.0/8"], header="forwarded")
    assert (
        Settings(records="off", trusted_proxies=chosen).trusted_proxies.resolve("10.0.0.1", both)
        == "198.51.100.9"
    )
    assert Settings(records="off", trusted_proxies=chosen).replace().trusted_proxies == chosen
    with pytest.raises(ConfigurationError, match="MW_PROXY_HEADER"):
        Settings(records="off", trusted_proxies=chosen, proxy_header="x-forwarded-for")
    # settings derived from settings may choose again: only a header given in code is binding
    plain = Settings.from_env({"MW_RECORDS": "off", "MW_TRUSTED_PROXIES": "10.0.0.0/8"})
    assert plain.replace(proxy_header="forwarded").trusted_proxies.header == "forwarded"
    assert (
        Settings.from_env(
            {"MW_RECORDS": "off", "MW_PROXY_HEADER": "forwarded"},
            trusted_proxies=plain.trusted_proxies,
        ).trusted_proxies.header
        == "forwarded"
    )


@pytest.mark.parametrize(
    "value",
    ['for="192.0.2.60', "proto=https", "for=192.0.2.60;for=192.0.2.61", 'for="a,b"', "for="],
)
def test_malformed_forwarded_is_not_believed(value: str) -> None:
    assert FWD_PROXIES.resolve("10.0.0.1", fwd(value) + xff("6.6.6.6")) == "10.0.0.1"


def test_all_hops_trusted_gives_the_left_most() -> None:
    assert PROXIES.resolve("10.0.0.1", xff("10.0.0.3, 127.0.0.1")) == "10.0.0.3"
    assert FWD_PROXIES.resolve("10.0.0.1", fwd('for="[::1]", for=10.0.0.2')) == "::1"
