"""meterwall_pii: what is masked, what is kept, bounded work, and the plugin through meterwall."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis.asyncio as aioredis
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from meterwall_pii import ERROR_MASK, MAX_CHARS, PiiRedactor, plugin
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meterwall import Meterwall, Settings
from meterwall.plugins import ValueRedactor, discover
from meterwall.reader import RecordReader

REDACTOR = PiiRedactor()

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwi"
    "aWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----"  # noqa: E501


# --- table: what is masked and what is kept ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # e-mail addresses
        ("write to jane.doe+news@example.co.uk today", "write to [email] today"),
        ("Ünïcode: jürgen@münchen.de.", "Ünïcode: [email]."),
        ("<a@b.io>, c_d@e-f.org", "<[email]>, [email]"),
        ("mailto:ops@example.com?subject=x", "mailto:[email]?subject=x"),
        ("user@localhost and v1@2.0 stay", "user@localhost and v1@2.0 stay"),
        ("x@y.com-based, z@w.xn--p1ai", "[email]-based, [email]"),
        ("https://user:pass@host.example.org/path", "https://user:[email]/path"),
        ("@handle is not an address", "@handle is not an address"),
        # cards: several formats, with the text around them kept
        ("card 4111111111111111 ok", "card [card] ok"),
        ("card 4111 1111 1111 1111 ok", "card [card] ok"),
        ("card 4111-1111-1111-1111, exp 12/25", "card [card], exp 12/25"),
        ("amex 3782 822463 10005", "amex [card]"),
        ("13 digits 4222222222222", "13 digits [card]"),
        ("19 digits 6304000000000000000.", "19 digits [card]."),
        ("4111 1111 1111 1111 123", "[card] 123"),  # the CVC after it is kept
        ("2 4111 1111 1111 1111", "2 [card]"),  # so is a number before it
        ("5555555555554444 6011111111111117", "[card] [card]"),
        # digit strings that fail the Luhn check are kept
        ("card 4111 1111 1111 1112", "card 4111 1111 1111 1112"),
        ("order 1234567812345678 shipped", "order 1234567812345678 shipped"),
        ("order 1234-5678-1234-5678", "order 1234-5678-1234-5678"),
        ("20-digit id 12345678901234567890", "20-digit id 12345678901234567890"),
        ("call +44 20 7946 0958, 2024-01-15", "call +44 20 7946 0958, 2024-01-15"),
        ("4111  1111  1111  1111", "4111  1111  1111  1111"),  # double spaces: not one number
        # IBANs
        ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN [iban]."),
        ("iban: DE89370400440532013000", "iban: [iban]"),
        ("GB82 WEST 1234 5698 7654 32 and more", "[iban] and more"),
        ("NO93 8601 1117 947", "[iban]"),  # the shortest
        ("pay MT84MALT011000012345MTLCAST001S now", "pay [iban] now"),
        ("lower case gb82west12345698765432", "lower case [iban]"),
        ("ref AB12 DE89 3704 0044 0532 0130 00", "ref AB12 [iban]"),
        ("IBAN GB82 WEST 1234 5698 7654 33", "IBAN GB82 WEST 1234 5698 7654 33"),  # check fails
        ("IBAN DE00 3704 0044 0532 0130 00", "IBAN DE00 3704 0044 0532 0130 00"),
        ("model AB12 CDEF GHIJ KLMN", "model AB12 CDEF GHIJ KLMN"),
        # JWTs and PEM blocks
        (f"Bearer {JWT}", "Bearer [jwt]"),
        (f"token={JWT}&next=1", "token=[jwt]&next=1"),
        ("eyJhbGciOi.eyJzdWIi only two segments", "eyJhbGciOi.eyJzdWIi only two segments"),
        (f"key:\n{PEM}\nthanks", "key:\n[pem]\nthanks"),
        (f"{PEM} and {PEM}", "[pem] and [pem]"),
        ("-----BEGIN CERTIFICATE-----\nMIIB cut off", "[pem]"),  # no END: masked to the end
        # nothing to find
        ("", ""),
        ("short", "short"),
        ("plain words, 42 and 2024", "plain words, 42 and 2024"),
    ],
)
def test_masks_what_it_recognises_and_keeps_the_rest(text: str, expected: str) -> None:
    assert REDACTOR.redact(text) == expected


def test_everything_at_once() -> None:
    text = (
        f"From jane@example.com: card 4111-1111-1111-1111, IBAN DE89 3704 0044 0532 0130 00, "
        f"order 1234567812345678, token {JWT}\n{PEM}\nbye"
    )
    assert REDACTOR.redact(text) == (
        "From [email]: card [card], IBAN [iban], order 1234567812345678, token [jwt]\n[pem]\nbye"
    )


def test_a_value_past_the_cap_is_masked_whole_not_scanned() -> None:
    small = PiiRedactor(max_chars=32)
    assert small.redact("x" * 32) == "x" * 32
    assert small.redact("a@b.co " + "x" * 40) == "[unscanned: 47 chars]"
    assert REDACTOR.redact("y" * (MAX_CHARS + 1)) == f"[unscanned: {MAX_CHARS + 1} chars]"
    with pytest.raises(ValueError):
        PiiRedactor(max_chars=0)


def test_an_unexpected_input_fails_closed() -> None:
    # The protocol promises str; anything else must still not raise nor pass through.
    assert REDACTOR.redact(b"4111111111111111 bytes") == ERROR_MASK  # type: ignore[arg-type]
    assert REDACTOR.redact(None) == ERROR_MASK  # type: ignore[arg-type]


def test_the_factory_and_the_entry_point() -> None:
    assert (plugin.name, plugin.kind) == ("pii", "redactor")
    assert plugin.summary
    assert discover()["pii"].value == "meterwall_pii:plugin"
    created = discover()["pii"].load().create(None)
    assert isinstance(created, PiiRedactor)
    assert isinstance(created, ValueRedactor)
    assert created.name == "pii"


# --- bounded work ------------------------------------------------------------------------------

# Inputs built to make a naive pattern backtrack, or to make every position a candidate.
PATHOLOGICAL = [
    "1" * MAX_CHARS,
    "1 " * (MAX_CHARS // 2),
    "4111-" * (MAX_CHARS // 5),
    "a" * (MAX_CHARS - 1) + "@",
    "a@" * (MAX_CHARS // 2),
    "a.b@c." * (MAX_CHARS // 6),
    "AB12 " * (MAX_CHARS // 5),
    "eyJa." * (MAX_CHARS // 5),
    "eyJa.eyJb " * (MAX_CHARS // 10),
    "-----BEGIN X-----" * (MAX_CHARS // 17),
    "-----BEGIN " + "-----END " * (MAX_CHARS // 10),
    "-" * MAX_CHARS,
    "4111111111111111 " * (MAX_CHARS // 17),
    "ä\x00\ud800€\U0001d518 " * (MAX_CHARS // 6),
]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=lambda t: repr(t[:12]))
def test_work_per_value_stays_bounded(text: str) -> None:
    started = time.perf_counter()
    out = REDACTOR.redact(text)
    elapsed = time.perf_counter() - started
    assert out != ERROR_MASK
    assert len(out) <= len(text)
    assert elapsed < 1.0  # ~25 ms at worst on a laptop; a backtracking pattern takes minutes


def test_many_cards_in_one_run_are_all_masked() -> None:
    text = " ".join(["4111111111111111"] * 2000)
    assert REDACTOR.redact(text) == " ".join(["[card]"] * 2000)


# --- properties --------------------------------------------------------------------------------

TRICKY = st.text(alphabet="0123456789 -@._+eyJAZaz\n-----BEGINEND", max_size=400)


@hypothesis_settings(max_examples=300)
@given(st.one_of(st.text(max_size=2000), TRICKY))
def test_never_raises_and_never_grows_without_bound(text: str) -> None:
    out = REDACTOR.redact(text)
    assert isinstance(out, str)
    assert out != ERROR_MASK or text == ERROR_MASK  # the fail-closed path is never needed
    # Only "[email]" is longer than what it replaces, by one character for at least six.
    assert len(out) <= len(text) + len(text) // 6


def _luhn_complete(body: list[int]) -> str:
    """``body`` followed by the check digit that makes it pass the Luhn check."""
    total = 0
    for i, digit in enumerate(reversed(body)):
        total += (digit * 2 - 9 if digit * 2 > 9 else digit * 2) if i % 2 == 0 else digit
    return "".join(map(str, body)) + str(-total % 10)


@given(
    body=st.lists(st.integers(0, 9), min_size=12, max_size=18),
    separator=st.sampled_from(["", " ", "-"]),
    before=st.sampled_from(["", "card ", "n°", "(", "card: "]),
    after=st.sampled_from(["", " thanks", ".", ", exp 12/25", ")"]),
)
def test_any_valid_card_number_is_masked(
    body: list[int], separator: str, before: str, after: str
) -> None:
    number = _luhn_complete(body)
    grouped = separator.join(number[i : i + 4] for i in range(0, len(number), 4))
    assert REDACTOR.redact(f"{before}{grouped}{after}") == f"{before}[card]{after}"


@given(
    country=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2),
    bban=st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=11, max_size=30),
    spaced=st.booleans(),
)
def test_any_valid_iban_is_masked(country: str, bban: str, spaced: bool) -> None:
    digits = {ord(c): str(int(c, 36)) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    check = 98 - int((bban + country + "00").translate(digits)) % 97
    iban = f"{country}{check:02d}{bban}"
    if spaced:
        iban = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    assert REDACTOR.redact(f"to {iban}, thanks") == "to [iban], thanks"


# --- end to end through meterwall --------------------------------------------------------------


def orders_app() -> Starlette:
    async def create(request: Request) -> JSONResponse:
        order = await request.json()
        return JSONResponse({"items": len(order.get("items", []))}, status_code=201)

    return Starlette(routes=[Route("/orders", create, methods=["POST"])])


async def test_values_are_masked_in_the_sealed_record(
    redis: aioredis.Redis, settings: Settings, private_key: X25519PrivateKey
) -> None:
    own = settings.replace(plugins="pii")
    app = Meterwall(orders_app(), settings=own)  # activated by name, through the entry point
    assert app.plugins.names == ["pii"]
    body = {
        "note": "Call me at jane.doe@example.com, card 4111 1111 1111 1111",
        "items": [{"sku": "A-1", "memo": "refund to DE89 3704 0044 0532 0130 00"}],
        "order": "1234567812345678",
    }
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            response = await client.post(
                "/orders", params={"contact": "jane.doe@example.com"}, json=body
            )
    assert response.status_code == 201
    records = await RecordReader(redis, own, private_key).records()
    assert len(records) == 1
    record = records[0]
    assert record["body"]["json"] == {
        "note": "Call me at [email], card [card]",
        "items": [{"sku": "A-1", "memo": "refund to [iban]"}],
        "order": "1234567812345678",
    }
    assert record["query"] == "contact=%5Bemail%5D"
    stored = json.dumps(record)
    for plaintext in ("jane.doe", "example.com", "4111", "DE89", "3704 0044"):
        assert plaintext not in stored
