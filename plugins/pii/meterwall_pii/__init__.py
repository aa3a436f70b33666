"""meterwall_pii: masks personal data that field *names* cannot reveal, before a record is sealed.

The built-in redaction masks values whose field names look secret (``password``, ``card``...).
Free-text fields (``note``, ``message``, ``q``) can still carry an e-mail address, a card number,
an IBAN, a bearer token or a private key. Activated with ``MW_PLUGINS=pii``, this redactor masks
them inside every string value of a JSON or form body and every query value:

* e-mail addresses -> ``[email]``;
* payment card numbers (13-19 digits, optionally in groups separated by one space or hyphen)
  that pass the Luhn check -> ``[card]``; a digit string that fails it (an order id) is kept;
* IBANs (country code, two check digits, up to 30 letters or digits, optionally in groups of
  four) that pass the ISO 7064 mod-97 check -> ``[iban]``;
* JWTs (three base64url segments, the first starting ``eyJ``) -> ``[jwt]``;
* PEM blocks (``-----BEGIN ...-----`` to ``-----END ...-----``) -> ``[pem]``; a block whose END
  line is missing is masked to the end of the value (a truncated key is still a key).

When in doubt it masks: a lost id in a record is cheap, a leaked card number is not. Known false
positives are therefore kept on purpose: a 13-19 digit id that happens to pass the Luhn check
(one in ten, e.g. a millisecond timestamp) becomes ``[card]``, and ``logo@2x.png`` looks exactly
like an address.

It runs in the flusher for every value, so the work per value is bounded and it never raises:

* every pattern is linear: quantifiers are possessive (``++``, ``*+``) or bounded, and candidates
  can only start at a boundary (a lookbehind), so no text is backtracked over again and again;
  the check digits (Luhn, mod 97) are then verified in Python on each candidate only, a bounded
  number of times per candidate (``_cards``), and the IBAN searches inside a rejected candidate
  are limited per value (``_EXTRA_SEARCHES``);
* a value longer than ``max_chars`` (64 Ki characters by default) is not scanned at all: it is
  replaced whole by ``[unscanned: N chars]``. Scanning only a prefix would have to store or drop
  the rest; storing it would keep text nobody looked at, and a cut could split a token so that
  neither half is recognised. Such values are rare (the default body limit is 16 KiB);
* an unexpected error masks the whole value (``[pii-error]``): failing closed is the only safe
  choice for a privacy filter, and an exception would stop the flusher's batch.
"""

from __future__ import annotations

import re
import string
from typing import Any

__all__ = ["MAX_CHARS", "PiiRedactor", "plugin"]

MAX_CHARS = 64 * 1024
"""Default longest value that is scanned; a longer one is masked whole."""

EMAIL_MASK = "[email]"
CARD_MASK = "[card]"
IBAN_MASK = "[iban]"
JWT_MASK = "[jwt]"
PEM_MASK = "[pem]"
ERROR_MASK = "[pii-error]"

# Nothing shorter can hold any of the patterns ("a@b.cd" is the shortest), so short values, the
# vast majority, cost one length check.
_MIN_CHARS = 6

# --- PEM ---------------------------------------------------------------------------------------
# The label is bounded and cannot cross a line, so each BEGIN/END candidate costs at most ~90
# characters; the block between them is skipped with one forward search, never backtracked.
_PEM_BEGIN = re.compile(r"-----BEGIN [^\r\n]{0,80}?-----")
_PEM_END = re.compile(r"-----END [^\r\n]{0,80}?-----")

# --- JWT ---------------------------------------------------------------------------------------
# Possessive segments over one class, separated by a literal dot: no way to split a segment
# differently, hence no backtracking. The lookbehind keeps a match from starting inside a longer
# base64url word (so each character is examined by a bounded number of attempts).
_B64 = "A-Za-z0-9_-"
_JWT = re.compile(rf"(?<![{_B64}])eyJ[{_B64}]++\.[{_B64}]++\.[{_B64}]*+")

# --- e-mail ------------------------------------------------------------------------------------
# An attempt starts only where a run of local-part characters starts (lookbehind), consumes the
# run possessively and fails at once without an "@": every character is consumed by at most a
# couple of attempts. Unicode word characters are accepted (internationalised addresses); the
# top-level domain is checked in Python (``_email``).
_LOCAL = r"\w.%+-"
_EMAIL = re.compile(rf"(?<![{_LOCAL}])[{_LOCAL}]++@(?P<domain>[\w-]++(?:\.[\w-]++)++)")
_TLD = re.compile(r"[^\W\d_]{2,}+")  # two or more letters, possessive

# --- IBAN --------------------------------------------------------------------------------------
# Country code and check digits at a word start, then at most 8 groups of four (one optional space
# before each) and a shorter last group: bounded to 45 characters per attempt. The candidate may
# run into a following word; ``_iban_length`` then settles on the longest valid prefix that ends
# at a group boundary.
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]{4}){0,8}+(?: ?[A-Za-z0-9]{1,3})?+"
)
# Norway's IBAN is the shortest (4 + 11 characters), 34 the ISO 13616 maximum (4 + 30).
_BBAN_MIN, _BBAN_MAX = 11, 30
_LETTER_DIGITS = {ord(c): str(int(c, 36)) for c in string.ascii_letters}
# A rejected IBAN candidate is searched again one character on, in case a real IBAN starts at one
# of its later words. Each search is bounded, but text made of nothing but candidates
# ("AB12 AB12 ...") would then cost ~9 searches per group, ~0.2 s per 64 KiB in Python. After this
# many per value, candidates no longer overlap: the worst case stays near the common one (~20 ms
# per 64 KiB), and ordinary text never gets near the limit.
_EXTRA_SEARCHES = 1024

# --- payment cards -----------------------------------------------------------------------------
# A maximal run of digit groups joined by single spaces or hyphens, at least 13 characters long
# (the bounded lookahead skips short runs such as years and house numbers without a Python call).
# Possessive throughout, starting only after a non-digit: each digit is consumed once.
_DIGIT_RUN = re.compile(r"(?<![0-9])(?=[0-9 -]{13})[0-9]++(?:[ -][0-9]++)*+")
_SEPARATOR = re.compile(r"([ -])")
_CARD_MIN, _CARD_MAX = 13, 19
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: a doubled digit, minus 9 when above 9


def _mask_pem(text: str) -> str:
    out: list[str] = []
    pos = 0
    while (begin := _PEM_BEGIN.search(text, pos)) is not None:
        out.append(text[pos : begin.start()])
        out.append(PEM_MASK)
        end = _PEM_END.search(text, begin.end())
        if end is None:  # truncated or cut: mask to the end rather than keep key material
            return "".join(out)
        pos = end.end()
    out.append(text[pos:])
    return "".join(out)


def _email(match: re.Match[str]) -> str:
    """Mask up to the last label that can be a top-level domain; keep the match otherwise.

    A top-level domain is letters only (or punycode, ``xn--``), so what the pattern took after
    its letters ("x@y.com-based", "x@y.com_2") is kept: it was not part of the address.
    """
    labels = match["domain"].split(".")
    for last in range(len(labels) - 1, 0, -1):
        label = labels[last]
        if label[:4].lower() == "xn--":
            return EMAIL_MASK + "".join("." + rest for rest in labels[last + 1 :])
        tld = _TLD.match(label)
        if tld is not None:
            after = label[tld.end() :]
            return EMAIL_MASK + after + "".join("." + rest for rest in labels[last + 1 :])
    return match[0]  # "user@host", "v1@2.0": not an address we can be sure of


def _mask_ibans(text: str) -> str:
    out: list[str] = []
    kept = 0  # text[:kept] is already in ``out``
    pos = 0
    extra = _EXTRA_SEARCHES
    while (match := _IBAN.search(text, pos)) is not None:
        length = _iban_length(match[0])
        if length:
            out.append(text[kept : match.start()])
            out.append(IBAN_MASK)
            kept = pos = match.start() + length
        elif extra > 0:
            # A rejected candidate may hide a real IBAN that starts at one of its later words
            # ("ref AB12 DE89 3704 ..."): search again one character on.
            extra -= 1
            pos = match.start() + 1
        else:
            pos = match.end()
    out.append(text[kept:])
    return "".join(out)


def _iban_length(candidate: str) -> int:
    """Length of the longest prefix of ``candidate`` that is a valid IBAN, or 0.

    Prefixes end at a group boundary (a space, every fourth character of an unspaced group, or
    the end), so a word that the pattern swallowed after the IBAN is dropped again. The check is
    ISO 7064 mod 97 on the rearranged number: the BBAN, then country code and check digits, each
    letter written as its two-digit value (A=10 ... Z=35); ``int`` does the arithmetic in C.
    """
    rest = candidate[4:]
    compact = rest.replace(" ", "")
    if len(compact) < _BBAN_MIN:
        return 0
    head = int(candidate[:4].translate(_LETTER_DIGITS))  # always 6 digits
    ends: list[tuple[int, int]] = []  # (BBAN characters, end in ``candidate``)
    size, end = 0, 4
    for piece in rest.split(" "):
        for offset in range(4, len(piece), 4):
            ends.append((size + offset, end + offset))
        size += len(piece)
        end += len(piece)
        ends.append((size, end))
        end += 1  # the space after the piece
    for size, end in reversed(ends):
        if _BBAN_MIN <= size <= _BBAN_MAX:
            bban = int(compact[:size].translate(_LETTER_DIGITS))
            if (bban * 1_000_000 + head) % 97 == 1:
                return end
    return 0


def _luhn(digits: str) -> bool:
    total = sum(int(d) for d in digits[-1::-2]) + sum(_DOUBLED[int(d)] for d in digits[-2::-2])
    return total % 10 == 0


def _cards(match: re.Match[str]) -> str:
    """Mask the card numbers of a run of digit groups; keep every other digit as it is.

    A run may hold more than a card: "4111 1111 1111 1111 123" (a card and its CVC), "2 4111-..."
    (a quantity before it), several cards in a list. So the longest window of whole groups with
    13-19 digits that passes the Luhn check is masked at the start of the run, again after it,
    and likewise from the end. Windows are not tried in the middle of a run: Luhn passes one
    random digit string in ten, and every window tried adds that chance of masking an id.
    An unbroken digit string is one group, so it is a card only as a whole.
    """
    run = match[0]
    parts = _SEPARATOR.split(run)
    groups, separators = parts[0::2], parts[1::2]
    first, end = 0, len(groups)
    masked: dict[int, int] = {}  # first group -> end group of each masked window
    while (stop := _card_from(groups, first, end)) > first:
        masked[first] = stop
        first = stop
    while (start := _card_to(groups, first, end)) < end:
        masked[start] = end
        end = start
    if not masked:
        return run
    out: list[str] = []
    index = 0
    while index < len(groups):
        stop = masked.get(index, 0)
        if stop:
            out.append(CARD_MASK)
        else:
            out.append(groups[index])
            stop = index + 1
        if stop < len(groups):
            out.append(separators[stop - 1])
        index = stop
    return "".join(out)


def _card_from(groups: list[str], first: int, end: int) -> int:
    """End of the longest card window ``groups[first:stop]``, or ``first`` when none is valid."""
    best, digits = first, 0
    for stop in range(first + 1, end + 1):
        digits += len(groups[stop - 1])
        if digits > _CARD_MAX:
            break
        if digits >= _CARD_MIN and _luhn("".join(groups[first:stop])):
            best = stop
    return best


def _card_to(groups: list[str], first: int, end: int) -> int:
    """Start of the longest card window ``groups[start:end]``, or ``end`` when none is valid."""
    best, digits = end, 0
    for start in range(end - 1, first - 1, -1):
        digits += len(groups[start])
        if digits > _CARD_MAX:
            break
        if digits >= _CARD_MIN and _luhn("".join(groups[start:end])):
            best = start
    return best


def _scan(text: str) -> str:
    # Order matters: a PEM body or a JWT holds runs a later pattern could half-match, an e-mail
    # may hold digits, and an IBAN holds a digit run that could pass the Luhn check.
    if "-----BEGIN " in text:
        text = _mask_pem(text)
    if "eyJ" in text:
        text = _JWT.sub(JWT_MASK, text)
    if "@" in text:
        text = _EMAIL.sub(_email, text)
    if len(text) >= 4 + _BBAN_MIN:
        text = _mask_ibans(text)
    if len(text) >= _CARD_MIN:
        text = _DIGIT_RUN.sub(_cards, text)
    return text


class PiiRedactor:
    """A ``ValueRedactor`` (``meterwall.plugins``) for personal data found by its shape.

    ``max_chars`` is the longest value that is scanned; a longer one becomes
    ``[unscanned: N chars]`` so that the work per value stays bounded and nothing unscanned is
    stored.
    """

    name = "pii"

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be positive")
        self.max_chars = max_chars

    def redact(self, text: str) -> str:
        """``text`` with e-mails, cards, IBANs, JWTs and PEM blocks masked. Never raises."""
        try:
            size = len(text)
            if size > self.max_chars:
                return f"[unscanned: {size} chars]"
            if size < _MIN_CHARS:
                return text
            return _scan(text)
        except Exception:  # fail closed: an unmasked value must never reach the record
            return ERROR_MASK

    def __repr__(self) -> str:
        return f"PiiRedactor(max_chars={self.max_chars})"


class _Factory:
    """What the ``pii`` entry point names: described by ``plugins list``, created by MW_PLUGINS."""

    name = "pii"
    kind = "redactor"
    summary = "masks e-mails, card numbers (Luhn), IBANs (mod 97), JWTs and PEM blocks in values"

    def create(self, settings: Any) -> PiiRedactor:
        """A redactor with the default cap; it needs nothing from ``settings``."""
        return PiiRedactor()


plugin = _Factory()
