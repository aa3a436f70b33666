"""Client addresses: which one to believe, and one canonical form for it.

By default the client is the address the ASGI server reports (``scope["client"]``): anything a
client writes into a header is attacker-controlled. Behind a reverse proxy that address is the
proxy's, so with ``MW_TRUSTED_PROXIES`` set we read ``Forwarded`` (RFC 7239) or, failing that,
``X-Forwarded-For`` right to left, and step over a hop only while the hop that reported it is a
proxy we trust. The left-most entries were written by whoever sent the request and are never
taken on faith.

Addresses are pseudonymised and counted as 16 bytes, with IPv4 stored IPv4-mapped
(``::ffff:a.b.c.d``): a dual-stack server reports ``::ffff:1.2.3.4`` for the same client another
reports as ``1.2.3.4``, and they must get the same pseudonym.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from .errors import ConfigurationError

_MAPPED = b"\0" * 10 + b"\xff\xff"
_MAX_TEXT = 128  # "[v6%zone]:port" fits easily; longer is garbage and must not fill the cache
_PORT = r"(?::(?:[0-9]{1,5}|_[A-Za-z0-9._-]+))?"  # RFC 7239 allows obfuscated "_port"s
_BRACKETED = re.compile(r"\[([^\[\]]+)\]" + _PORT)
_V4_PORT = re.compile(r"([0-9.]+)" + _PORT)
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_FORWARDED = re.compile(rf'(?:[^"]|{_QUOTED})*')  # well-formed: every quote is closed
_ELEMENT = re.compile(rf'(?:[^,"]|{_QUOTED})+')
_PAIR = re.compile(rf'(?:[^;"]|{_QUOTED})+')
_ESCAPE = re.compile(r"\\(.)")
_LIST_SEP = re.compile(r"[\s,]+")
_ALL = (1 << 128) - 1


def canonical_ip(text: str) -> bytes | None:
    """16 bytes for an address in any form a server or proxy writes; ``None``, never an error,
    for anything else, because the input comes straight from the network."""
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        return None
    return _canonical(text)


@lru_cache(maxsize=4096)  # the same clients come back again and again
def _canonical(text: str) -> bytes | None:
    text = text.strip()
    match = _BRACKETED.fullmatch(text) or _V4_PORT.fullmatch(text)
    host = match.group(1) if match else text
    host = host.split("%", 1)[0] if ":" in host else host  # a zone names a link, not a host
    try:
        address = ip_address(host)
    except ValueError:
        return None
    return _MAPPED + address.packed if address.version == 4 else address.packed


@lru_cache(maxsize=4096)
def ip_text(ip16: bytes) -> str:
    """Display form: dotted IPv4 for mapped addresses, so records read like access logs."""
    if len(ip16) == 16 and ip16.startswith(_MAPPED):
        return str(IPv4Address(ip16[12:]))
    return str(IPv6Address(ip16))


def network_prefix(ip16: bytes) -> bytes:
    """The /24 (IPv4) or /48 (IPv6) an address belongs to: the unit one site or customer
    typically gets, so abuse can be grouped without keeping the address itself."""
    if ip16.startswith(_MAPPED):
        return ip16[:15] + b"\0"
    return ip16[:6] + b"\0" * 10


def _as_network(entry: str | IPv4Network | IPv6Network, setting: str) -> IPv4Network | IPv6Network:
    if isinstance(entry, IPv4Network | IPv6Network):
        return entry
    try:
        return ip_network(entry.strip())
    except ValueError as exc:
        raise ConfigurationError(setting, f"{entry!r} is not an address or CIDR ({exc})") from None


#: The forwarding headers a proxy may write (``MW_PROXY_HEADER``).
PROXY_HEADERS = ("x-forwarded-for", "forwarded")


class TrustedProxies:
    """The reverse proxies whose forwarding header we believe; empty means believe none.

    Only the one header the proxies write is read (``header``): a proxy that appends to
    X-Forwarded-For passes a client's own ``Forwarded`` header through untouched, so reading
    both would let a client choose its address.
    """

    __slots__ = ("_by_mask", "_header", "_key", "_networks", "chosen")

    def __init__(
        self,
        networks: Iterable[str | IPv4Network | IPv6Network] = (),
        *,
        header: str | None = None,
    ) -> None:
        """``header``: the one the proxies write; None leaves it to ``Settings.proxy_header``
        (whose default is X-Forwarded-For)."""
        if header is not None and header not in PROXY_HEADERS:
            choices = ", ".join(PROXY_HEADERS)
            raise ConfigurationError("MW_PROXY_HEADER", f"must be one of {choices}")
        self.chosen = header is not None
        self._header = (header or PROXY_HEADERS[0]).encode()
        nets = [_as_network(n, "MW_TRUSTED_PROXIES") for n in networks]
        self._networks = tuple(dict.fromkeys(nets))
        # Everything as 128-bit (mapped) integers grouped by mask: one AND and one set lookup
        # per distinct prefix length, however many networks are configured.
        grouped: dict[int, set[int]] = {}
        for net in self._networks:
            value, bits = int(net.network_address), net.prefixlen
            if net.version == 4:
                value, bits = (0xFFFF << 32) | value, bits + 96
            grouped.setdefault(_ALL ^ ((1 << (128 - bits)) - 1), set()).add(value)
        self._by_mask = tuple((mask, frozenset(values)) for mask, values in grouped.items())
        self._key = (frozenset(self._by_mask), self._header)

    @classmethod
    def parse(
        cls, text: str, *, setting: str = "MW_TRUSTED_PROXIES", header: str | None = None
    ) -> TrustedProxies:
        """``"10.0.0.0/8, 127.0.0.1 ::1"``; host bits in a CIDR are an error, not rounded off,
        because a typo in this list widens who may claim to be any client."""
        return cls([_as_network(e, setting) for e in _LIST_SEP.split(text) if e], header=header)

    def __bool__(self) -> bool:
        return bool(self._networks)

    @property
    def header(self) -> str:
        return self._header.decode()

    @property
    def networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return self._networks

    def reading(self, header: str) -> TrustedProxies:
        """The same proxies, believed in ``header`` (``MW_PROXY_HEADER``)."""
        if header == self.header:
            return self
        copy = TrustedProxies(self._networks, header=header)
        copy.chosen = self.chosen  # still the Settings' choice to make, if it was
        return copy

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self._networks]!r}, header={self.header!r})"

    def forwarded(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, ...]:
        """The values of the one header ``resolve`` reads: with the peer, all it depends on."""
        return tuple([v for n, v in headers if n == self._header])

    def is_trusted(self, ip16: bytes) -> bool:
        """Whether a canonical address is one of ours (IPv4 networks match mapped addresses)."""
        value = int.from_bytes(ip16)
        return any(value & mask in values for mask, values in self._by_mask)

    def resolve(self, peer: str | None, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The client address: ``peer`` unless it is a trusted proxy, else the right-most
        forwarded hop that is not.

        ``peer`` is returned unchanged when no proxies are configured or it is missing or
        untrusted: an untrusted sender's headers are never read. A resolved hop comes back in
        :func:`ip_text` form, port and brackets gone. When the walk meets an entry it cannot use
        (``unknown``, an obfuscated ``_name``, garbage) it stops at the last trusted hop, the
        closest address we can vouch for, rather than trust anything left of the gap. If every
        hop is trusted the left-most one is the client. Only ``header`` is read.
        """
        if not self._by_mask or peer is None:
            return peer
        ip16 = canonical_ip(peer)
        if ip16 is None or not self.is_trusted(ip16):
            return peer
        last = peer
        for hop in reversed(_hops(headers, self._header)):
            ip16 = canonical_ip(hop) if hop else None
            if ip16 is None:
                return last
            last = ip_text(ip16)
            if not self.is_trusted(ip16):
                return last
        return last


def _hops(headers: Sequence[tuple[bytes, bytes]], header: bytes) -> list[str | None]:
    """Forwarded-for entries of ``header``, left to right, from every header line in order;
    ``None`` for an element we cannot read, so the walk stops there."""
    if header == b"forwarded":
        forwarded = [v for k, v in headers if k == b"forwarded"]
        if not forwarded:
            return []
        text = ",".join(v.decode("latin-1") for v in forwarded)
        if not _FORWARDED.fullmatch(text):
            return [None]  # an unclosed quote: nothing in it can be located reliably
        return [_for_param(element) for element in _ELEMENT.findall(text) if element.strip()]
    lines = (v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for")
    return [entry.strip() for line in lines for entry in line.split(",") if entry.strip()]


def _for_param(element: str) -> str | None:
    """The one ``for=`` value of a Forwarded element, unquoted; ``None`` if absent or repeated."""
    found: list[str] = []
    for pair in _PAIR.findall(element):
        name, eq, value = pair.partition("=")
        if eq and name.strip().lower() == "for":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = _ESCAPE.sub(r"\1", value[1:-1])
            found.append(value)
    return found[0] if len(found) == 1 else None


def forget_addresses() -> None:
    """Empty the parsing caches, whose keys are plaintext addresses (called after each flush)."""
    _canonical.cache_clear()
    ip_text.cache_clear()
