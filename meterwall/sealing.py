"""Sealing: raw records are encrypted before they leave the process; app servers cannot open them.

Each writer makes a random AES-256-GCM data key per hour and stores it only wrapped with HPKE
(RFC 9180: X25519, HKDF-SHA256, AES-256-GCM) to the security team's public key; the key id and
the hour are bound through HPKE's ``info``. One asymmetric operation per writer per hour, one
AES-GCM call per record. Only the private key's holder can open records.

Record envelope (version 1), all integers big-endian::

    version(1) | key_id(8) | time_ns(8) | record_id(16) | nonce(12) | AES-GCM(ciphertext + tag)

The first 33 bytes are the associated data, so a record cannot be moved to another id, time or
key. The plaintext starts with a codec byte (0 = raw) so compression can be added later without
a new envelope version. Every failure to open raises ``InvalidRecord`` and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from .codec import decode, encode
from .errors import ConfigurationError, InvalidRecord

VERSION = 1
HOUR_NS = 3600 * 1_000_000_000
_HEADER = struct.Struct(">B8sQ16s")  # version, key id, time ns, record id
_HEADER_LEN = _HEADER.size + 12  # plus the nonce
_TIME, _TIME_AT = struct.Struct(">Q"), struct.calcsize(">B8s")  # after the version and key id
_WRAP = struct.Struct(">BQ")  # wrap format version, hour
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


def _wrap_info(key_id: bytes, hour: int) -> bytes:
    return b"meterwall record data key v1|" + key_id + hour.to_bytes(8, "big")


def generate_keypair() -> tuple[bytes, str]:
    """A new record-sealing key pair: (private key as PKCS#8 PEM, public key as base64 text)."""
    private = X25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, public_key_text(private.public_key())


def public_key_text(public: X25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def load_public_key(text: str, *, setting: str = "MW_RECORD_PUBLIC_KEY") -> X25519PublicKey:
    """Parse the base64 X25519 public key that ``meterwall keygen`` prints."""
    text = text.strip().replace("+", "-").replace("/", "_")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(setting, "is not valid base64") from None
    if len(raw) != 32:
        raise ConfigurationError(
            setting, f"must be a 32-byte X25519 public key, got {len(raw)} bytes"
        )
    return X25519PublicKey.from_public_bytes(raw)


def load_private_key(
    pem: bytes, *, setting: str = "MW_RECORD_PRIVATE_KEY_FILE"
) -> X25519PrivateKey:
    """Parse the PEM private key file that ``meterwall keygen`` wrote."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(setting, "is not a PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigurationError(setting, "is not an X25519 private key")
    return key


@dataclass(frozen=True, slots=True)
class DataKey:
    """One hour's data key of one writer, with its HPKE-wrapped form for Redis."""

    key_id: bytes
    hour: int
    aead: AESGCM
    wrapped: bytes
    nonce_prefix: bytes  # 4 random bytes; a per-key counter makes the other 8 (NIST SP 800-38D)


class RecordSealer:
    """Encrypts records for the holder of the private key; holds only the public key.

    Not on the request path: the flusher calls ``seal`` once per record.
    """

    __slots__ = ("_current", "_nonces", "_public")

    def __init__(self, public_key: X25519PublicKey) -> None:
        self._public = public_key
        self._current: DataKey | None = None
        self._nonces = itertools.count()

    @property
    def public_key(self) -> X25519PublicKey:
        return self._public

    def data_key(self, hour: int) -> DataKey:
        """The data key for ``hour``, made on first use; the previous hour's key is forgotten."""
        current = self._current
        if current is not None and current.hour == hour:
            return current
        secret = AESGCM.generate_key(bit_length=256)
        key_id = os.urandom(8)
        wrapped = _WRAP.pack(1, hour) + _SUITE.encrypt(
            secret, self._public, info=_wrap_info(key_id, hour)
        )
        self._current = DataKey(key_id, hour, AESGCM(secret), wrapped, os.urandom(4))
        self._nonces = itertools.count()  # a fresh key: its nonces start again, never repeat
        return self._current

    def seal(self, plaintext: bytes, time_ns: int, record_id: bytes) -> tuple[bytes, DataKey]:
        """Seal one record made at ``time_ns``; returns the envelope and the key it used."""
        key = self.data_key(time_ns // HOUR_NS)
        nonce = key.nonce_prefix + next(self._nonces).to_bytes(8, "big")
        header = _HEADER.pack(VERSION, key.key_id, time_ns, record_id)
        body = key.aead.encrypt(nonce, encode(plaintext), header)
        return header + nonce + body, key


@dataclass(frozen=True, slots=True)
class Envelope:
    """The clear header of a sealed record (readable without the private key)."""

    key_id: bytes
    time_ns: int
    record_id: bytes


def read_envelope(blob: bytes) -> Envelope:
    """Parse the clear header; raises ``InvalidRecord`` if the blob is not a record."""
    _check_envelope(blob)
    _, key_id, time_ns, record_id = _HEADER.unpack_from(blob)
    return Envelope(key_id, time_ns, record_id)


def envelope_time_ns(blob: bytes) -> int:
    """A sealed record's time alone (what an audit reads of each of millions of records)."""
    _check_envelope(blob)
    time_ns: int = _TIME.unpack_from(blob, _TIME_AT)[0]
    return time_ns


def _check_envelope(blob: bytes) -> None:
    if len(blob) < _HEADER_LEN + 16 or blob[0] != VERSION:
        raise InvalidRecord("not a meterwall record")


class RecordOpener:
    """Opens sealed records with the private key; the reader side only (trace, demo, audit)."""

    __slots__ = ("_keys", "_private")

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key
        self._keys: dict[bytes, AESGCM] = {}

    def unwrap(self, key_id: bytes, wrapped: bytes) -> AESGCM:
        """Unwrap a data key read from Redis; cached by key id."""
        cached = self._keys.get(key_id)
        if cached is not None:
            return cached
        if len(wrapped) <= _WRAP.size or wrapped[0] != 1:
            raise InvalidRecord("not a wrapped data key")
        _, hour = _WRAP.unpack_from(wrapped)
        try:
            secret = _SUITE.decrypt(
                wrapped[_WRAP.size :], self._private, info=_wrap_info(key_id, hour)
            )
        except Exception:  # the HPKE module raises several types; callers get exactly one
            raise InvalidRecord("data key failed to unwrap") from None
        self._keys[key_id] = AESGCM(secret)
        return self._keys[key_id]

    def open(self, blob: bytes, wrapped_key: bytes) -> bytes:
        """The plaintext of a record; raises ``InvalidRecord`` if anything does not check out."""
        envelope = read_envelope(blob)
        aead = self.unwrap(envelope.key_id, wrapped_key)
        try:
            plain = aead.decrypt(
                blob[_HEADER.size : _HEADER_LEN], blob[_HEADER_LEN:], blob[: _HEADER.size]
            )
        except InvalidTag:
            raise InvalidRecord("record failed authentication") from None
        return decode(plain)
