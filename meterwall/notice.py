"""The privacy notice: what meterwall stores, why, for how long and how, from the live settings.

An operator publishes this text to the users of its API. It is generated instead of written by
hand so that it cannot drift from what the middleware enforces: every duration, size and mode is
read from ``Settings``, and the lists of redacted header and field names are the redaction
module's own constants, so adding a name there changes the notice too.

The notice is built once as a small structured form (sections of paragraphs and bullet lists,
with literals such as header names marked as code) and only then rendered, so Markdown and HTML
say exactly the same thing and each renderer can escape every value in one place. It never
includes a secret (``MW_PSEUDONYM_SECRET``), the sealing public key, a trusted proxy's address or
a machine path: it describes the configuration, it does not disclose it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

from .keyspace import SLICE_SECONDS
from .periods import SNAPSHOT_RETENTION
from .redaction import (
    _ADDRESS_HEADERS,
    _CREDENTIAL_HEADER_PARTS,
    _CREDENTIAL_HEADERS,
    _FINGERPRINT_HEX,
    _MAX_JSON_DEPTH,
    _SECRET_NAME_PARTS,
    _SECRET_WHOLE_NAMES,
    _URL_HEADERS,
    SECRET_MASK,
)
from .settings import RETENTION_CEILING, Settings

__all__ = [
    "SECTION_TITLES",
    "BulletList",
    "Code",
    "Notice",
    "Paragraph",
    "Section",
    "build",
    "humane_duration",
    "humane_size",
    "render",
    "settings_fingerprint",
    "to_html",
    "to_markdown",
]

# --- the structured form ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Code:
    """A literal (header name, setting, command): shown in monospace, never read as markup."""

    text: str


Inline = str | Code
Line = tuple[Inline, ...]


@dataclass(frozen=True, slots=True)
class Paragraph:
    content: Line


@dataclass(frozen=True, slots=True)
class BulletList:
    items: tuple[Line, ...]


Block = Paragraph | BulletList


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True, slots=True)
class Notice:
    """A whole notice: a title, an introduction and the sections, ready for any renderer."""

    title: str
    intro: tuple[Block, ...]
    sections: tuple[Section, ...]


#: Every notice has these sections, in this order, whatever the settings: a reader (or a test)
#: can rely on finding each topic, even when its answer is "nothing is stored".
SECTION_TITLES = (
    "What is stored for each request",
    "Why it is used",
    "How long it is kept",
    "How IP addresses are pseudonymised",
    "How records are encrypted",
    "Redaction rules",
    "Your rights",
    "About this notice",
)


# --- formatting of values -----------------------------------------------------------------------

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def _number(n: float) -> str:
    """``16384`` and ``0.25`` as written, never ``1.6384e+04``."""
    return str(int(n)) if n == int(n) else f"{n:.6g}"


def _plural(n: float, unit: str) -> str:
    return f"{_number(n)} {unit}" + ("" if n == 1 else "s")


def humane_duration(seconds: float) -> str:
    """``86400`` -> ``"24 hours"``, ``7776000`` -> ``"90 days"``: how a person says a duration.

    Up to three days are said in hours (a "24 hours" promise reads better than "1 day"); longer
    spans in days, with months added once they are long enough for days to be hard to picture.
    """
    if seconds < 1:
        return _plural(round(seconds * 1000, 3), "millisecond")
    if seconds != int(seconds):
        return _plural(seconds, "second")
    whole = int(seconds)
    units = _UNITS if whole >= 3 * 86400 else _UNITS[1:]
    parts = []
    for unit, size in units:
        count, whole = divmod(whole, size)
        if count:
            parts.append(_plural(count, unit))
    text = ", ".join(parts)
    if seconds >= 180 * 86400 and seconds % 86400 == 0:
        text += f" (about {round(seconds / (30.44 * 86400))} months)"
    return text


def humane_size(size: int) -> str:
    """``16384`` -> ``"16384 bytes (16 KiB)"``: the exact number, and the unit people know."""
    text = _plural(size, "byte")
    for unit, factor in (("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{text} ({size // factor} {unit})"
    return text


def _seconds(value: float) -> str:
    """A duration as the settings accept it back (``86400s``), for the settings line."""
    return _number(value) + "s"


# --- building lines -----------------------------------------------------------------------------


def _line(*parts: Inline) -> Line:
    return tuple(part for part in parts if part != "")


def _codes(names: Iterable[str], last: str = "and") -> Line:
    """``a``, ``b`` and ``c`` as code spans separated like English text."""
    items = list(names)
    out: list[Inline] = []
    for i, name in enumerate(items):
        if i:
            out.append(f" {last} " if i == len(items) - 1 else ", ")
        out.append(Code(name))
    return tuple(out)


def _para(*parts: Inline | Line) -> Paragraph:
    return Paragraph(_flatten(parts))


def _flatten(parts: Sequence[Inline | Line]) -> Line:
    out: list[Inline] = []
    for part in parts:
        if isinstance(part, tuple):
            out.extend(part)
        elif part != "":
            out.append(part)
    return tuple(out)


def _bullets(*items: Sequence[Inline | Line]) -> BulletList:
    return BulletList(tuple(_flatten(item) for item in items))


# --- the content --------------------------------------------------------------------------------


def build(settings: Settings) -> Notice:
    """The notice for ``settings`` in structured form (``render`` turns it into text)."""
    sealed = settings.records == "sealed"
    raw = humane_duration(settings.raw_retention)
    intro = (
        _para(
            "This API is served through meterwall, a gateway middleware that observes every API "
            "request. This notice describes what it keeps about each request, why, for how long "
            "and how it is protected. It was generated from the service's live configuration "
            "(listed at the end), so it describes what the software enforces, not an intention."
        ),
    )
    sections = (
        Section(SECTION_TITLES[0], _stored(settings, sealed)),
        Section(SECTION_TITLES[1], _purposes(settings, sealed)),
        Section(SECTION_TITLES[2], _retention(settings, sealed, raw)),
        Section(SECTION_TITLES[3], _pseudonyms(settings, sealed, raw)),
        Section(SECTION_TITLES[4], _encryption(sealed, raw)),
        Section(SECTION_TITLES[5], _redaction(settings, sealed)),
        Section(SECTION_TITLES[6], _rights(settings, sealed, raw)),
        Section(SECTION_TITLES[7], _about(settings)),
    )
    return Notice("Privacy notice: API request data", intro, sections)


def _consumer_source(settings: Settings) -> Line:
    sources: list[Inline] = []
    if settings.access == "keys":
        sources.append("the API key used")
    if settings.consumer_header:
        if sources:
            sources.append(", or else ")
        sources += ["the ", Code(settings.consumer_header), " header set by our upstream gateway"]
    return ("taken from ", *sources) if sources else ()


def _wrapped(before: str, line: Line, after: str) -> Line:
    """``line`` between ``before`` and ``after``, or nothing at all when ``line`` is empty."""
    return (before, *line, after) if line else ()


def _counts_line(settings: Settings) -> Line:
    return _line(
        "counts per customer (consumer id",
        *_wrapped("; ", _consumer_source(settings), ""),
        "), API key id, route template, method, status and time bucket: number of requests, "
        "billable units, request and response bytes, a histogram of response times and "
        "refusals by reason",
    )


def _stored(settings: Settings, sealed: bool) -> tuple[Block, ...]:
    if not sealed:
        return (
            _para(
                "No raw record of any request is kept (",
                Code("MW_RECORDS=off"),
                "): no body, no header, no path or query, no IP address and no pseudonym of one "
                "is stored. Only counts are kept:",
            ),
            _bullets(_counts_line(settings)),
            _para(
                "The route template is the pattern of the matched route (for example ",
                Code("/items/{item_id}"),
                "), never the path as requested.",
            ),
        )
    limit = settings.body_limit
    if limit:
        body = _line(
            f"the request body, up to its first {humane_size(limit)}: JSON and form "
            "(urlencoded) bodies with secret fields masked; every other body (binary, multipart, "
            "text, unparseable, or larger than that limit) only as its media type, size and "
            "SHA-256 digest (of the captured part when it was larger)"
        )
    else:
        body = _line(
            "the request body's media type and size only: its content is not captured (a body "
            "limit of 0 bytes)"
        )
    return (
        _para("For every HTTP request to the API, admitted or refused, one record is stored with:"),
        _bullets(
            _line(
                "the HTTP method and the route template that matched (for example ",
                Code("/items/{item_id}"),
                ")",
            ),
            _line(
                "the path as requested, and the query string with the values of secret-looking "
                "parameters replaced by ",
                Code(SECRET_MASK),
            ),
            _line(
                "the request headers, with credentials replaced by keyed fingerprints and the "
                "addresses in client-address headers replaced by pseudonyms (see Redaction rules)"
            ),
            _line(
                "the client IP address, inside the encrypted record only; everything outside the "
                "encrypted record refers to it by pseudonyms (see How IP addresses are "
                "pseudonymised)"
            ),
            _line(
                "the time of the request (UTC), the time until the response started and the full "
                "duration"
            ),
            _line(
                "the response status (and whether the request failed or the client "
                "disconnected), and the request and response sizes in bytes"
            ),
            _line(
                "the scheme, HTTP version and server address the request reached",
            ),
            _line(
                "the consumer (customer) id",
                *_wrapped(" (", _consumer_source(settings), ")"),
                " and the API key id, never the key itself",
            ),
            _line("the access decision: admitted, or the reason the request was refused"),
            body,
        ),
        _para(
            "Response headers and bodies are not stored. Websocket "
            "messages are not captured. In addition, every request is counted:"
        ),
        _bullets(_counts_line(settings)),
    )


def _purposes(settings: Settings, sealed: bool) -> tuple[Block, ...]:
    if settings.access == "keys":
        key_sources: list[Inline] = [
            Code("Authorization: Bearer"),
            " or the ",
            Code(settings.api_key_header),
            " header",
        ]
        if settings.api_key_query:
            key_sources += [", or the ", Code(settings.api_key_query), " query parameter"]
        access = _line(
            "Access rights control management: every request needs a valid API key (from ",
            *key_sources,
            ") unless its route is public; we check the key's scopes, the client networks it "
            "may be used from, and the rate limits and monthly quotas of its plan. API keys "
            "themselves are never stored, only a key id and a keyed hash (HMAC-SHA256).",
        )
    else:
        access = _line(
            "Access rights control management: off in this configuration (",
            Code("MW_ACCESS=off"),
            "); meterwall does not check API keys, networks, rate limits or quotas here.",
        )
    if sealed:
        tracing = _line(
            "Security incident tracing: during an investigation, the security team opens the "
            "encrypted records of a client address, API key or customer. Only they hold the key "
            "that opens records."
        )
    else:
        tracing = _line(
            "Security incident tracing: limited to the counts, since no raw records are kept."
        )
    return (
        _para("The data above is used for these purposes only:"),
        _bullets(
            access,
            _line(
                "Usage measurement for billing: the counts per customer, API key and route are "
                "the basis of invoices."
            ),
            _line(
                "Detecting problems and improving API performance: error rates, response times "
                "and sizes per route."
            ),
            tracing,
        ),
    )


def _retention(settings: Settings, sealed: bool, raw: str) -> tuple[Block, ...]:
    blocks: list[Block] = []
    if sealed:
        blocks.append(
            _para(
                f"Raw records are kept at most {raw} (the software refuses any setting above "
                f"{humane_duration(RETENTION_CEILING)}). They are stored in time slices of at "
                f"most {humane_duration(SLICE_SECONDS)} that expire as a whole, a regular trim "
                "removes anything older, the database's own clock decides, and readers refuse "
                f"to return anything older than {raw}. The keys that link pseudonyms to "
                f"addresses and that open records are deleted {raw} after the end of their hour."
            )
        )
    else:
        blocks.append(_para("No raw records are kept, so there is nothing to expire."))
    blocks.append(
        _para(
            "The counts are kept per time granularity, then deleted. They contain no IP address "
            "and no pseudonym of one:"
        )
    )
    counts = [
        _line(f"15-minute counts (UTC): {humane_duration(settings.retention_15m)}"),
        _line(f"hourly counts (UTC): {humane_duration(settings.retention_1h)}"),
        _line(
            "daily counts (in the customer's billing time zone): "
            f"{humane_duration(settings.retention_day)}"
        ),
        _line(
            "monthly counts (in the customer's billing time zone): "
            f"{humane_duration(settings.retention_month)}; the frozen snapshot of a closed "
            f"billing month: {humane_duration(SNAPSHOT_RETENTION)}"
        ),
    ]
    if sealed:
        counts.append(
            _line(
                "the number of distinct clients per customer and UTC day: "
                f"{humane_duration(settings.retention_day)} (see How IP addresses are "
                "pseudonymised)"
            )
        )
    blocks.append(BulletList(tuple(counts)))
    blocks.append(
        _para(
            "The audit log of privileged reads (see Your rights) is kept "
            f"{humane_duration(settings.audit_log_retention)}; it holds no IP address."
        )
    )
    if settings.access == "keys":
        blocks.append(
            _para(
                "API key metadata (customer, plan, scopes, allowed networks, state, and when the "
                "key was last used, to the minute) is kept as long as the key is listed, "
                "revoked keys included."
            )
        )
    return tuple(blocks)


def _client_address(settings: Settings) -> Paragraph:
    if settings.trusted_proxies:
        return _para(
            "The client address is the address of the connection, except when that connection "
            "comes from one of our trusted reverse proxies (",
            Code("MW_TRUSTED_PROXIES"),
            " is set): then it is the right-most address in the ",
            Code("Forwarded"),
            " or ",
            Code("X-Forwarded-For"),
            " header that is not one of those proxies. Forwarding headers from any other sender "
            "are never believed.",
        )
    return _para(
        "The client address is the address the web server reports for the connection (",
        Code("MW_TRUSTED_PROXIES"),
        " is not set, so meterwall itself believes no forwarding header).",
    )


def _pseudonyms(settings: Settings, sealed: bool, raw: str) -> tuple[Block, ...]:
    if not sealed:
        return (
            _para(
                "No IP address and no pseudonym of one is stored. The client address is used "
                "only in memory, while the request is handled"
                + (
                    ", to check the networks an API key may be used from."
                    if settings.access == "keys"
                    else "."
                )
            ),
            _client_address(settings),
        )
    return (
        _client_address(settings),
        _para(
            "Outside the encrypted record, an address is never written in plain text. Before a "
            "record is encrypted, the address exists only in the memory of the API server, "
            "until the next write to the database (every "
            f"{humane_duration(settings.flush_interval)}); the caches that hold addresses are "
            "emptied after every write."
        ),
        _bullets(
            _line(
                "The record is filed under a pseudonym of the address: HMAC-SHA256 of the address "
                "(IPv4 and IPv4-mapped IPv6 give the same one) under a random key of the hour, "
                "truncated to 128 bits."
            ),
            _line(
                "A second pseudonym of the address's network prefix (the /24 of an IPv4 address, "
                "the /48 of an IPv6 address), under another key of the same hour, lets the "
                "security team see a network's activity."
            ),
            _line(
                "The hourly keys are random (never derived from a date or another secret), are "
                "stored in the database only encrypted under a key derived from the operator's "
                f"secret, and are deleted {raw} after the end of their hour, when the records "
                "they index are gone: from then on nobody can link a pseudonym to an address, "
                "not even with the operator's secret."
            ),
            _line(
                "Addresses in client-address headers are replaced by the same hourly pseudonyms."
            ),
            _line(
                "Distinct clients per customer and UTC day are counted with a HyperLogLog of a "
                "daily keyed pseudonym (8 bytes of HMAC-SHA256 under a random key of that day). "
                "A HyperLogLog keeps only register maxima, never the pseudonyms themselves; like "
                "the hourly keys, the day's key is deleted when the retention window after the "
                "day has passed, so the counts can no longer be tested against an address."
            ),
            _line(
                "Never an unkeyed hash: the whole IPv4 address space can be hashed in minutes, so "
                "an unkeyed hash would hide nothing."
            ),
        ),
    )


def _encryption(sealed: bool, raw: str) -> tuple[Block, ...]:
    if not sealed:
        return (_para("No raw records are kept, so nothing needs to be encrypted."),)
    return (
        _bullets(
            _line(
                "Each record is encrypted with AES-256-GCM, before it leaves the API server, "
                "under a random data key that each server process makes every hour. The record's "
                "id, time and key id are authenticated, so a record cannot be altered or moved "
                "unnoticed."
            ),
            _line(
                "The data key is stored only wrapped with HPKE (RFC 9180: X25519, HKDF-SHA256, "
                "AES-256-GCM) to the public key of the security team; the process forgets the "
                f"data key when the hour ends, and the wrapped key is deleted {raw} after it."
            ),
            _line(
                "The API servers hold only the public key: they can write records but cannot "
                "read them, and neither can anyone with a copy of the database. Only the holder "
                "of the security team's private key can open a record."
            ),
        ),
    )


def _redaction(settings: Settings, sealed: bool) -> tuple[Block, ...]:
    credential = sorted(_CREDENTIAL_HEADERS | {settings.api_key_header.lower()})
    fragments = list(_SECRET_NAME_PARTS)
    if settings.api_key_query:
        fragments.append(settings.api_key_query)
    blocks: list[Block] = []
    if not sealed:
        blocks.append(
            _para(
                "No headers, query strings or bodies are stored in this configuration. Were "
                "records turned on, these rules would be applied before anything is stored:"
            )
        )
    else:
        blocks.append(_para("These rules are applied before a record is encrypted:"))
    blocks.append(
        _bullets(
            _line(
                "Credential headers are replaced by a keyed fingerprint (",
                Code("fp:"),
                f" and {_FINGERPRINT_HEX} hex digits of HMAC-SHA256): equal values can be "
                "correlated, none can be read back. These are the headers ",
                *_codes(credential),
                " (the configured API key header is ",
                Code(settings.api_key_header),
                "), and any header whose name contains ",
                *_codes(_CREDENTIAL_HEADER_PARTS, last="or"),
                ". Of ",
                Code("Authorization"),
                " and ",
                Code("Proxy-Authorization"),
                " only a well-known scheme name (such as ",
                Code("Bearer"),
                ") stays readable; of ",
                Code("Cookie"),
                " only the cookie names.",
            ),
            _line(
                "Client-address headers have every address replaced by a pseudonym: ",
                *_codes(sorted(_ADDRESS_HEADERS)),
                ", and every IP address standing in any other header but ",
                Code("Host"),
                ".",
            ),
            _line(
                "Fields with secret-looking names are masked (replaced by ",
                Code(SECRET_MASK),
                ") in query strings, in the ",
                *_codes(sorted(_URL_HEADERS)),
                " headers, in JSON bodies (at any depth; a document nested deeper than "
                f"{_MAX_JSON_DEPTH} levels is kept only as a digest) and in form bodies. A name "
                "is secret-looking when, ignoring case, ",
                Code("-"),
                " and ",
                Code("_"),
                ", it contains ",
                *_codes(fragments, last="or"),
                ", or when it or one of its words is ",
                *_codes(sorted(_SECRET_WHOLE_NAMES), last="or"),
                ".",
            ),
            _api_key_query_line(settings),
            _line(
                "Any other body is never stored: only its media type, size and SHA-256 digest, "
                "since free text may hold secrets that cannot be found reliably."
            ),
        )
    )
    return tuple(blocks)


def _api_key_query_line(settings: Settings) -> Line:
    if not settings.api_key_query:
        return _line(
            "API keys are not accepted from the query string (",
            Code("MW_API_KEY_QUERY"),
            " is not set).",
        )
    accepted = (
        "API keys are also accepted from the "
        if settings.access == "keys"
        else "The configured API key query parameter "
    )
    return _line(
        accepted,
        Code(settings.api_key_query),
        " query parameter" if settings.access == "keys" else "",
        "; its value is masked in every record, but a key in a URL may still be logged by "
        "proxies and browsers outside this service.",
    )


def _rights(settings: Settings, sealed: bool, raw: str) -> tuple[Block, ...]:
    if sealed:
        export = _line(
            "Access and portability: a machine-readable (JSON) copy of every raw record still "
            "held about your address or your customer account, opened, with a receipt; for an "
            "account, its usage counts too (",
            Code("meterwall subject export"),
            ").",
        )
        erase = _line(
            "Erasure: your raw records and their index entries are deleted at once, with a "
            "receipt; an account's usage counts when asked for (billing may have a legal reason "
            "to keep them), and the frozen snapshots of closed billing months only when asked "
            "for explicitly (",
            Code("meterwall subject erase"),
            ").",
        )
        restrict = _line(
            "Restriction and objection: from then on no raw record is kept about your address "
            "or account (every API server applies it within a second), while counting goes on (",
            Code("meterwall subject restrict"),
            ", lifted with ",
            Code("meterwall subject unrestrict"),
            "). The restriction list names an address only by a long-lived keyed pseudonym of "
            "its own, never in plain text, and keeps it until the restriction is lifted.",
        )
        searchable = (
            f"Records exist for at most {raw}, so only that window can be searched; afterwards "
            "only counts remain, which hold no address and no pseudonym of one."
        )
    else:
        export = _line(
            "Access and portability: a machine-readable (JSON) copy of the usage counts of your "
            "customer account (",
            Code("meterwall subject export"),
            ").",
        )
        erase = _line(
            "Erasure: an account's usage counts when asked for (billing may have a legal reason "
            "to keep them), and the frozen snapshots of closed billing months only when asked "
            "for explicitly (",
            Code("meterwall subject erase"),
            ").",
        )
        restrict = _line(
            "Restriction and objection: in this configuration no raw record is kept about "
            "anyone, so nothing beyond the counts described above is processed."
        )
        searchable = "No raw records are kept, so only the counts of an account can be found."
    return (
        _para(
            "You can exercise these rights by contacting the operator of this API, who serves "
            "them with meterwall's commands:"
        ),
        _bullets(export, erase, restrict),
        _para(
            "A request that identifies you by IP address is searched only after the operator "
            "has verified that you control that address, and the search uses the address's "
            "pseudonyms, never the address itself. " + searchable
        ),
        _para(
            "Every privileged read or change of this data (incident traces, exports, erasures, "
            "restrictions) is written to an audit log with who did it, when, and what was "
            f"asked, kept {humane_duration(settings.audit_log_retention)}. The log names an "
            "address only by a long-lived keyed pseudonym."
        ),
    )


def _about(settings: Settings) -> tuple[Block, ...]:
    return (
        _para("This notice was generated by meterwall ", Code(_version()), " from these settings:"),
        _para(Code(settings_fingerprint(settings))),
        _para(
            "Secrets and keys are never part of a notice. If a setting changes, the operator "
            "generates and publishes the notice again."
        ),
    )


def _version() -> str:
    try:
        return metadata.version("meterwall")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "(unknown version)"


def settings_fingerprint(settings: Settings) -> str:
    """The settings the notice depends on, as ``MW_NAME=value`` pairs a reader can compare.

    Values are written so that ``Settings.from_env`` reads them back; secrets, the public key and
    the trusted proxies' addresses are left out (only whether proxies are set is shown).
    """
    pairs = [
        ("MW_RECORDS", settings.records),
        ("MW_RAW_RETENTION", _seconds(settings.raw_retention)),
        ("MW_BODY_LIMIT", str(settings.body_limit)),
        ("MW_ACCESS", settings.access),
        ("MW_API_KEY_HEADER", settings.api_key_header),
        ("MW_API_KEY_QUERY", settings.api_key_query or "(unset)"),
        ("MW_TRUSTED_PROXIES", "(set)" if settings.trusted_proxies else "(unset)"),
        ("MW_CONSUMER_HEADER", settings.consumer_header or "(unset)"),
        ("MW_FLUSH_INTERVAL", _seconds(settings.flush_interval)),
        ("MW_RETENTION_15M", _seconds(settings.retention_15m)),
        ("MW_RETENTION_1H", _seconds(settings.retention_1h)),
        ("MW_RETENTION_DAY", _seconds(settings.retention_day)),
        ("MW_RETENTION_MONTH", _seconds(settings.retention_month)),
        ("MW_AUDIT_LOG_RETENTION", _seconds(settings.audit_log_retention)),
    ]
    return " ".join(f"{name}={value}" for name, value in pairs)


# --- rendering ----------------------------------------------------------------------------------


def render(settings: Settings, fmt: Literal["markdown", "html"] = "markdown") -> str:
    """The privacy notice for ``settings`` as Markdown or as a complete HTML document."""
    notice = build(settings)
    if fmt == "markdown":
        return to_markdown(notice)
    if fmt == "html":
        return to_html(notice)
    raise ValueError(f"unknown notice format {fmt!r}: use 'markdown' or 'html'")


# Markdown: every ASCII punctuation character that can start markup is backslash-escaped
# (CommonMark allows escaping any of them), so a value can never become a link, a tag, emphasis
# or a table cell. Newlines are folded so that a value cannot start a heading or a list.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#&!])")
_NEWLINES = re.compile(r"[\r\n]+")


def _md_text(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", _NEWLINES.sub(" ", text))


def _md_code(text: str) -> str:
    """A code span whose fence is longer than any run of backticks inside it."""
    text = _NEWLINES.sub(" ", text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_line(line: Line) -> str:
    return "".join(_md_code(p.text) if isinstance(p, Code) else _md_text(p) for p in line)


def _md_blocks(blocks: Iterable[Block]) -> list[str]:
    out = []
    for block in blocks:
        if isinstance(block, Paragraph):
            out.append(_md_line(block.content))
        else:
            out.append("\n".join("- " + _md_line(item) for item in block.items))
    return out


def to_markdown(notice: Notice) -> str:
    """CommonMark text: a level-1 title, one level-2 heading per section."""
    parts = ["# " + _md_text(notice.title), *_md_blocks(notice.intro)]
    for section in notice.sections:
        parts.append("## " + _md_text(section.title))
        parts.extend(_md_blocks(section.blocks))
    return "\n\n".join(parts) + "\n"


def _html_line(line: Line) -> str:
    return "".join(
        f"<code>{html.escape(p.text)}</code>" if isinstance(p, Code) else html.escape(p)
        for p in line
    )


def _html_blocks(blocks: Iterable[Block]) -> list[str]:
    out = []
    for block in blocks:
        if isinstance(block, Paragraph):
            out.append(f"<p>{_html_line(block.content)}</p>")
        else:
            items = "\n".join(f"<li>{_html_line(item)}</li>" for item in block.items)
            out.append(f"<ul>\n{items}\n</ul>")
    return out


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


# Inline and minimal: the document must stand alone (no external style sheet, script or font).
_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fff}"
    "main{max-width:46rem;margin:2rem auto;padding:0 1rem}"
    "code{font-family:ui-monospace,monospace;font-size:.9em;background:#f2f2f2;"
    "padding:0 .2em;border-radius:3px;overflow-wrap:anywhere}"
    "h2{margin-top:2rem}"
)


def to_html(notice: Notice) -> str:
    """A complete, self-contained HTML5 document; every value goes through ``html.escape``."""
    body = [f"<h1>{html.escape(notice.title)}</h1>", *_html_blocks(notice.intro)]
    for section in notice.sections:
        inner = "\n".join(_html_blocks(section.blocks))
        body.append(
            f'<section id="{html.escape(_slug(section.title))}">\n'
            f"<h2>{html.escape(section.title)}</h2>\n{inner}\n</section>"
        )
    main = "\n".join(body)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(notice.title)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n{main}\n</main>\n</body>\n</html>\n"
    )
