"""Tests for meterwall.notice: the published privacy notice must follow the live settings.

A notice that says "24 hours" while the deployment keeps records 6 hours, or that lists redaction
rules the code does not apply, is worse than none; so every fact that depends on a setting is
checked against two values of that setting. No Redis is needed: the notice reads settings only.
"""

from __future__ import annotations

import base64
import os
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from meterwall import ConfigurationError, Secret, Settings
from meterwall.clientip import TrustedProxies
from meterwall.notice import (
    SECTION_TITLES,
    BulletList,
    Code,
    Notice,
    Paragraph,
    Section,
    build,
    humane_duration,
    render,
    settings_fingerprint,
    to_html,
    to_markdown,
)
from meterwall.redaction import (
    _ADDRESS_HEADERS,
    _CREDENTIAL_HEADER_PARTS,
    _CREDENTIAL_HEADERS,
    _SECRET_NAME_PARTS,
    _SECRET_WHOLE_NAMES,
)
from meterwall.sealing import generate_keypair
from meterwall.settings import parse_duration

PUBLIC_KEY = generate_keypair()[1]
SECRET_BYTES = os.urandom(32)


def sealed(**changes: Any) -> Settings:
    """Secure-default (sealed) settings, as the conftest ``settings`` fixture makes them."""
    return Settings(record_public_key=PUBLIC_KEY, pseudonym_secret=Secret(SECRET_BYTES), **changes)


def section(markdown: str, title: str) -> str:
    """The Markdown text of one section, up to the next level-2 heading."""
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


# --- the notice follows the settings -------------------------------------------------------------


def test_body_limit_changes_the_notice() -> None:
    default, small = render(sealed()), render(sealed(body_limit=1024))
    assert "up to its first 16384 bytes (16 KiB)" in default
    assert "1024 bytes" not in default
    assert "up to its first 1024 bytes (1 KiB)" in small
    assert "16384 bytes" not in small
    assert "MW_BODY_LIMIT=1024" in small


def test_body_limit_zero_says_no_body_content_is_kept() -> None:
    text = section(render(sealed(body_limit=0)), SECTION_TITLES[0])
    assert "its content is not captured" in text
    assert "up to its first" not in text


def test_raw_retention_changes_the_notice() -> None:
    day, short = render(sealed()), render(sealed(raw_retention=6 * 3600))
    assert "Raw records are kept at most 24 hours" in day
    assert "Raw records are kept at most 6 hours" in short
    assert "at most 24 hours" not in short
    # The hourly keys go with the window: the notice must say so with the configured value.
    assert "deleted 6 hours after the end of their hour" in short
    assert "MW_RAW_RETENTION=21600s" in short
    assert "MW_RAW_RETENTION=86400s" in day


def test_aggregate_retentions_change_the_notice() -> None:
    default = section(render(sealed()), SECTION_TITLES[2])
    assert "15-minute counts (UTC): 48 hours" in default
    assert "hourly counts (UTC): 90 days" in default
    assert "396 days (about 13 months)" in default
    assert "762 days (about 25 months)" in default
    changed = section(
        render(sealed(retention_15m=6 * 3600, retention_1h=30 * 86400, retention_day=100 * 86400)),
        SECTION_TITLES[2],
    )
    assert "15-minute counts (UTC): 6 hours" in changed
    assert "hourly counts (UTC): 30 days" in changed
    assert "(in the customer's billing time zone): 100 days" in changed
    assert "no IP address" in changed


def test_audit_log_retention_changes_the_notice() -> None:
    text = render(sealed(audit_log_retention=30 * 86400))
    assert "audit log of privileged reads (see Your rights) is kept 30 days" in text
    assert "396 days" not in section(text, SECTION_TITLES[6])
    assert "MW_AUDIT_LOG_RETENTION=2592000s" in text


def test_records_off_says_only_counts_are_kept() -> None:
    text = render(Settings(records="off"))
    stored = section(text, SECTION_TITLES[0])
    assert "No raw record of any request is kept" in stored
    assert "one record is stored" not in stored
    assert "Raw records are kept at most" not in text
    assert "nothing needs to be encrypted" in section(text, SECTION_TITLES[4])
    assert "No IP address and no pseudonym of one is stored" in section(text, SECTION_TITLES[3])
    assert "HyperLogLog" not in text  # unique clients are only counted from sealed records
    assert "MW_RECORDS=off" in text
    sealed_text = render(sealed())
    assert "one record is stored" in sealed_text
    assert "AES-256-GCM" in section(sealed_text, SECTION_TITLES[4])
    assert "HyperLogLog" in sealed_text


def test_access_mode_changes_the_purposes() -> None:
    off = section(render(sealed()), SECTION_TITLES[1])
    assert "off in this configuration" in off
    assert "every request needs a valid API key" not in off
    keys = section(render(sealed(access="keys")), SECTION_TITLES[1])
    assert "every request needs a valid API key" in keys
    for fact in ("scopes", "networks", "rate limits", "monthly quotas"):
        assert fact in keys
    assert "off in this configuration" not in keys
    assert "MW_ACCESS=keys" in render(sealed(access="keys"))


def test_api_key_query_changes_the_notice() -> None:
    unset = render(sealed(access="keys"))
    assert "API keys are not accepted from the query string" in unset
    assert "MW_API_KEY_QUERY=(unset)" in unset
    with_query = render(sealed(access="keys", api_key_query="apikey_param"))
    assert "API keys are also accepted from the `apikey_param` query parameter" in with_query
    assert "not accepted from the query string" not in with_query
    # The parameter is masked like every secret-looking field, so it is listed among them.
    redaction = section(with_query, SECTION_TITLES[5])
    assert "`apikey_param`" in redaction
    assert "MW_API_KEY_QUERY=apikey_param" in with_query


def test_api_key_header_is_listed_as_a_credential() -> None:
    text = section(render(sealed(api_key_header="X-Tenant-Key")), SECTION_TITLES[5])
    assert "`x-tenant-key`" in text
    assert "the configured API key header is `X-Tenant-Key`" in text


def test_trusted_proxies_change_the_notice() -> None:
    unset = section(render(sealed()), SECTION_TITLES[3])
    assert "`MW_TRUSTED_PROXIES` is not set" in unset
    proxied = render(sealed(trusted_proxies=TrustedProxies.parse("10.1.2.0/24")))
    text = section(proxied, SECTION_TITLES[3])
    assert "`MW_TRUSTED_PROXIES` is set" in text
    assert "right-most address" in text
    # Describes the configuration without disclosing the operator's network.
    assert "10.1.2.0" not in proxied
    assert "MW_TRUSTED_PROXIES=(set)" in proxied


def test_consumer_header_is_named() -> None:
    text = render(sealed(consumer_header="X-Customer"))
    assert "the `X-Customer` header set by our upstream gateway" in text
    assert "X-Customer" not in render(sealed())


def test_ip_pseudonym_facts_are_stated() -> None:
    text = section(render(sealed()), SECTION_TITLES[3])
    for fact in ("HMAC-SHA256", "random key of the hour", "/24", "/48", "HyperLogLog",
                 "daily keyed pseudonym", "Never an unkeyed hash"):  # fmt: skip
        assert fact in text


def test_encryption_facts_are_stated() -> None:
    text = section(render(sealed()), SECTION_TITLES[4])
    for fact in ("AES-256-GCM", "HPKE", "RFC 9180", "X25519", "cannot read them"):
        assert fact in text


def test_rights_name_the_commands_and_the_verification() -> None:
    text = section(render(sealed()), SECTION_TITLES[6])
    for command in ("meterwall subject export", "meterwall subject erase",
                    "meterwall subject restrict"):  # fmt: skip
        assert f"`{command}`" in text
    assert "verified that you control that address" in text
    assert "audit log" in text
    assert "kept 396 days (about 13 months)" in text  # the audit log's own retention
    assert "counting goes on" in text
    off = section(render(Settings(records="off")), SECTION_TITLES[6])
    assert "`meterwall subject export`" in off
    assert "no raw record is kept about anyone" in off
    assert "`meterwall subject restrict`" not in off


# --- redaction rules come from the redaction module itself --------------------------------------


def test_every_redaction_constant_is_listed() -> None:
    markdown, page = render(sealed()), render(sealed(), "html")
    names = (
        *_CREDENTIAL_HEADERS,
        *_CREDENTIAL_HEADER_PARTS,
        *_ADDRESS_HEADERS,
        *_SECRET_NAME_PARTS,
        *_SECRET_WHOLE_NAMES,
    )
    for name in names:
        assert f"`{name}`" in markdown, name
        assert f"<code>{name}</code>" in page, name


# --- both formats, every section ----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [sealed(), Settings(records="off"), sealed(access="keys", api_key_query="k")],
    ids=["sealed", "off", "keys"],
)
def test_both_formats_contain_every_section(settings: Settings) -> None:
    markdown, page = render(settings), render(settings, "html")
    positions = [markdown.index(f"\n## {title}\n") for title in SECTION_TITLES]
    assert positions == sorted(positions)
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    assert markdown.startswith("# ")
    assert markdown.count("\n## ") == len(SECTION_TITLES)
    assert page.count("<h2>") == len(SECTION_TITLES)


def test_settings_fingerprint_lists_the_values_used() -> None:
    settings = sealed(raw_retention=5400, body_limit=2048, access="keys")
    line = settings_fingerprint(settings)
    for pair in ("MW_RECORDS=sealed", "MW_RAW_RETENTION=5400s", "MW_BODY_LIMIT=2048",
                 "MW_ACCESS=keys"):  # fmt: skip
        assert pair in line
    # Written the way the settings read it back.
    value = re.search(r"MW_RAW_RETENTION=(\S+)", line)
    assert value is not None
    assert parse_duration("MW_RAW_RETENTION", value.group(1)) == 5400
    assert line in render(settings)
    assert line in render(settings, "html")


def test_the_notice_is_deterministic() -> None:
    settings = sealed()
    assert render(settings) == render(settings)
    assert render(settings, "html") == render(settings, "html")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="pdf"):
        render(sealed(), "pdf")  # type: ignore[arg-type]


# --- no secrets ---------------------------------------------------------------------------------


def test_no_secret_or_key_in_either_format() -> None:
    secret = os.urandom(32)
    public = generate_keypair()[1]
    settings = Settings(record_public_key=public, pseudonym_secret=Secret(secret), access="keys")
    forms = {
        base64.b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        secret.hex(),
        public,
    }
    for fmt in ("markdown", "html"):
        text = render(settings, fmt)
        for form in forms:
            assert form not in text
        assert "Secret(" not in text
        assert "/tmp" not in text
        assert "/home" not in text


# --- escaping -----------------------------------------------------------------------------------


def test_settings_refuse_markup_in_header_names() -> None:
    """Why the escaping tests below use the structured form: settings cannot carry ``<``."""
    with pytest.raises(ConfigurationError):
        sealed(api_key_header="X-<b>")


def test_html_escapes_real_notice_text() -> None:
    page = render(sealed(), "html")
    assert "service&#x27;s live configuration" in page
    assert "service's" not in page


HOSTILE = Notice(
    title='<script>alert("t")</script>',
    intro=(Paragraph(("a & b < c > d ", Code("X-<b>&\"'"))),),
    sections=(
        Section(
            "<img src=x onerror=1>",
            (BulletList((("*bold* [link](http://x) _u_ # |", Code("a`b")),)),),
        ),
    ),
)


def test_html_renderer_escapes_every_value() -> None:
    page = to_html(HOSTILE)
    assert "<script>" not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(&quot;t&quot;)&lt;/script&gt;" in page
    assert "a &amp; b &lt; c &gt; d " in page
    assert "<code>X-&lt;b&gt;&amp;&quot;&#x27;</code>" in page
    assert "<h2>&lt;img src=x onerror=1&gt;</h2>" in page


def test_markdown_renderer_escapes_markup() -> None:
    text = to_markdown(HOSTILE)
    assert "# \\<script\\>" in text
    assert "a \\& b \\< c \\> d `X-<b>&\"'`" in text  # inside a code span nothing is markup
    assert "\\*bold\\* \\[link\\](http://x) \\_u\\_ \\# \\|" in text
    assert "``a`b``" in text  # the fence is longer than the backtick run inside


def test_markdown_stays_inert_under_a_commonmark_parser() -> None:
    """What an operator's site generator makes of the Markdown: text, never tags or emphasis."""
    markdown_it = pytest.importorskip("markdown_it")  # comes with rich, a dependency
    parser = markdown_it.MarkdownIt("commonmark")
    hostile = parser.render(to_markdown(HOSTILE))
    assert "<script" not in hostile
    assert "<img" not in hostile
    assert "<a " not in hostile
    assert "<em>" not in hostile
    assert "<code>a`b</code>" in hostile
    page = parser.render(render(sealed(api_key_query="api_key")))
    assert "<em>" not in page
    assert "<strong>" not in page
    assert "<code>api_key</code>" in page  # not "api<em>key"
    assert page.count("<h2>") == len(SECTION_TITLES)


class _Structure(HTMLParser):
    """Checks that every element is closed in order and collects what the page refers to."""

    VOID = frozenset({"meta", "br", "hr", "img", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.append(tag)
        self.references += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")


@pytest.mark.parametrize("settings", [sealed(), Settings(records="off")], ids=["sealed", "off"])
def test_html_is_a_complete_self_contained_document(settings: Settings) -> None:
    page = render(settings, "html")
    assert page.startswith('<!DOCTYPE html>\n<html lang="en">')
    parser = _Structure()
    parser.feed(page)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    for tag in ("html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "ul"):
        assert tag in parser.seen
    assert "script" not in parser.seen
    assert parser.references == []  # no external style sheet, script, font or image


# --- formatting of values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (86400, "24 hours"),
        (6 * 3600, "6 hours"),
        (48 * 3600, "48 hours"),
        (90 * 86400, "90 days"),
        (396 * 86400, "396 days (about 13 months)"),
        (5400, "1 hour, 30 minutes"),
        (3600, "1 hour"),
        (0.1, "100 milliseconds"),
        (1.5, "1.5 seconds"),
        (300, "5 minutes"),
    ],
)
def test_humane_duration(seconds: float, text: str) -> None:
    assert humane_duration(seconds) == text


def test_build_gives_every_section_in_order() -> None:
    notice = build(sealed())
    assert tuple(s.title for s in notice.sections) == SECTION_TITLES
    assert all(s.blocks for s in notice.sections)
