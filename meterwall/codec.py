"""Record compression before sealing: zstd with a dictionary of what every record repeats.

A record is mostly the same keys, header names and media types; a dictionary built from them
lets zstd shrink a typical 1.8 KB record to a few hundred bytes in a few microseconds, so 24
hours of raw records fit in a small Redis. Compressing before encrypting is safe here: records
are sealed at rest, one per envelope, and no attacker can inject chosen text next to a secret
and watch the sealed size change (no CRIME/BREACH setting).

The codec byte inside the sealed plaintext says how to read it. Codec 1 uses ``DICTIONARY_V1``,
a dictionary of raw text; codec 2 (what ``encode`` writes) a trained one, which also carries
zstd's entropy tables, so a frame need not build its own: about half the CPU of codec 1 per
record and 5-37% fewer bytes (17% over five realistic records; ``scripts/
train_record_dictionary.py`` says how it was made and what it was trained on: synthetic
records, never real traffic). Both dictionaries are frozen:
records compressed with them must stay readable for their 24 hours, so the shipped file is
checked against its SHA-256 here. A better dictionary is codec 3.
"""

from __future__ import annotations

import hashlib
import threading
from importlib.resources import files

import zstandard

from .errors import InvalidRecord

CODEC_RAW = 0
CODEC_ZSTD_V1 = 1
CODEC_ZSTD_V2 = 2
MAX_RECORD = 64 * 1024 * 1024  # a record never decompresses to more than this

#: Frozen: the shape of a record, its common headers and values (codec 1).
DICTIONARY_V1 = (
    b'{"v":1,"id":"","time_ns":0,"method":"GET","route":"/","path":"/","query":"",'
    b'"scheme":"https","http_version":"1.1","host":"","status":200,"error":false,'
    b'"disconnected":false,"duration_ms":0.0,"ttfb_ms":0.0,"bytes_in":0,"bytes_out":0,'
    b'"decision":"admitted","consumer":null,"key_id":null,"client":{"ip":"","pseudonym":"",'
    b'"prefix_pseudonym":""},"headers":[["host",""],["user-agent","Mozilla/5.0 "],'
    b'["accept","application/json"],["accept-encoding","gzip, deflate, br"],'
    b'["accept-language","en-US,en;q=0.9"],["connection","keep-alive"],'
    b'["content-type","application/json"],["content-length",""],'
    b'["authorization","Bearer fp:"],["x-api-key","fp:"],["cookie","fp:"],'
    b'["x-forwarded-for","ip:"],["x-request-id",""],["x-consumer",""]],'
    b'"body":{"size":0,"truncated":false,"type":"application/json","kind":"json","json":'
    b'{"password":"***","token":"***"}},"body":{"kind":"empty","kind":"digest","sha256":"",'
    b'"kind":"form","form":""}}'
)

#: Frozen: the trained dictionary of codec 2, shipped beside this module.
DICTIONARY_V2_SHA256 = "3e8f1aeb55dd6af0ec59cd27f610666af2b7f6763ffbac88db4053fd53e2092b"


def _dictionary_v2() -> zstandard.ZstdCompressionDict:
    try:
        data = files(__package__).joinpath("record_dictionary_v2.zdict").read_bytes()
    except OSError as exc:
        raise RuntimeError(f"meterwall: record_dictionary_v2.zdict: {exc}; reinstall") from None
    if hashlib.sha256(data).hexdigest() != DICTIONARY_V2_SHA256:
        # Records written with another file could not be read by the other workers.
        raise RuntimeError("meterwall: record_dictionary_v2.zdict is damaged; reinstall")
    dictionary = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)
    dictionary.precompute_compress(level=1)
    return dictionary


_DICT_V1 = zstandard.ZstdCompressionDict(DICTIONARY_V1)
_DICT_V2 = _dictionary_v2()
_CODEC_V2 = bytes((CODEC_ZSTD_V2,))


class _Codecs(threading.local):
    """zstd's contexts may not be shared between threads (two at once crash the process): an
    app that runs an event loop per thread gets a set per thread. The dictionaries are shared:
    they are read-only once built."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(
            level=1, dict_data=_DICT_V2, write_checksum=False, write_dict_id=False
        )
        self.decompressors = {
            CODEC_ZSTD_V1: zstandard.ZstdDecompressor(dict_data=_DICT_V1),
            CODEC_ZSTD_V2: zstandard.ZstdDecompressor(dict_data=_DICT_V2),
        }


_CODECS = _Codecs()


def encode(plain: bytes) -> bytes:
    """Codec byte + compressed record."""
    return _CODEC_V2 + _CODECS.compressor.compress(plain)


def decode(data: bytes) -> bytes:
    """The record of an opened envelope's plaintext; ``InvalidRecord`` if it cannot be read."""
    if not data:
        raise InvalidRecord("empty record")
    codec = data[0]
    if codec == CODEC_RAW:
        return data[1:]
    decompressor = _CODECS.decompressors.get(codec)
    if decompressor is None:
        raise InvalidRecord("unknown record codec")
    try:
        return decompressor.decompress(data[1:], max_output_size=MAX_RECORD)
    except zstandard.ZstdError:
        raise InvalidRecord("record failed to decompress") from None
