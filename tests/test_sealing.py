"""Sealing: only the private key opens a record, and any change makes it fail the same way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meterwall import ConfigurationError, InvalidRecord
from meterwall.sealing import (
    HOUR_NS,
    RecordOpener,
    RecordSealer,
    generate_keypair,
    load_private_key,
    load_public_key,
    read_envelope,
)

NOW = 1_795_000_000 * 1_000_000_000


def sealer_and_opener() -> tuple[RecordSealer, RecordOpener]:
    pem, public = generate_keypair()
    return RecordSealer(load_public_key(public)), RecordOpener(load_private_key(pem))


def test_a_record_opens_with_the_private_key_and_binds_its_header() -> None:
    sealer, opener = sealer_and_opener()
    record_id = os.urandom(16)
    blob, key = sealer.seal(b'{"a": 1}', NOW, record_id)
    assert opener.open(blob, key.wrapped) == b'{"a": 1}'
    envelope = read_envelope(blob)
    assert (envelope.time_ns, envelope.record_id, envelope.key_id) == (NOW, record_id, key.key_id)
    assert b'"a"' not in blob


@pytest.mark.parametrize("position", [0, 5, 12, 20, 40, 60, -1])
def test_any_flipped_bit_fails_with_invalid_record(position: int) -> None:
    sealer, opener = sealer_and_opener()
    blob, key = sealer.seal(b"secret payload " * 3, NOW, os.urandom(16))
    tampered = bytearray(blob)
    tampered[position] ^= 0x01
    with pytest.raises(InvalidRecord):
        opener.open(bytes(tampered), key.wrapped)


def test_a_wrong_private_key_or_a_tampered_wrapped_key_fails() -> None:
    sealer, _ = sealer_and_opener()
    _, stranger = sealer_and_opener()
    blob, key = sealer.seal(b"x", NOW, os.urandom(16))
    with pytest.raises(InvalidRecord):
        stranger.open(blob, key.wrapped)
    _, opener = sealer_and_opener()
    wrapped = bytearray(key.wrapped)
    wrapped[-1] ^= 1
    with pytest.raises(InvalidRecord):
        opener.open(blob, bytes(wrapped))
    with pytest.raises(InvalidRecord):
        opener.open(b"\x01short", key.wrapped)


def test_one_data_key_per_hour_and_the_old_one_is_forgotten() -> None:
    sealer, _ = sealer_and_opener()
    _, first = sealer.seal(b"x", NOW, os.urandom(16))
    _, same = sealer.seal(b"y", NOW + 1, os.urandom(16))
    _, next_hour = sealer.seal(b"z", NOW + HOUR_NS, os.urandom(16))
    assert first is same
    assert next_hour.key_id != first.key_id
    assert sealer.data_key(NOW // HOUR_NS) is not first  # a new key, never the old one again


def test_key_loading_errors_name_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="MW_RECORD_PUBLIC_KEY: must be a 32-byte"):
        load_public_key("c2hvcnQ")
    with pytest.raises(ConfigurationError, match="MW_RECORD_PUBLIC_KEY: is not valid base64"):
        load_public_key("***")
    with pytest.raises(ConfigurationError, match="MW_RECORD_PRIVATE_KEY_FILE"):
        load_private_key(b"-----BEGIN NOTHING-----")


def test_records_are_compressed_before_sealing_and_raw_ones_still_open() -> None:
    from meterwall.codec import CODEC_RAW, decode, encode

    sealer, opener = sealer_and_opener()
    headers = [["host", "api.example"], ["user-agent", "Mozilla/5.0 (X11)"],
               ["accept", "application/json"], ["authorization", "Bearer fp:0a1b2c"]]  # fmt: skip
    record = (
        b'{"v":1,"id":"' + os.urandom(16).hex().encode() + b'","method":"POST","route":"/items",'
        b'"status":201,"decision":"admitted","headers":' + repr(headers).encode() + b"}"
    )
    blob, key = sealer.seal(record, NOW, os.urandom(16))
    assert opener.open(blob, key.wrapped) == record
    assert len(blob) < len(record)  # envelope overhead included
    assert decode(bytes((CODEC_RAW,)) + record) == record  # the first codec stays readable
    with pytest.raises(InvalidRecord):
        decode(encode(record)[:-3])  # a truncated frame
    with pytest.raises(InvalidRecord):
        decode(b"\x07" + record)  # a codec this version does not know


def test_codec_2_is_written_and_codec_1_records_stay_readable() -> None:
    """Records sealed before the trained dictionary (codec 1) are readable for their 24 hours;
    on a typical record the trained one (codec 2) takes fewer bytes."""
    import zstandard

    from meterwall.codec import CODEC_ZSTD_V1, CODEC_ZSTD_V2, DICTIONARY_V1, decode, encode

    record = (
        b'{"v":2,"method":"GET","route":"/v1/orders/{order_id}","path":"/v1/orders/o_81f3",'
        b'"query":"expand=customer","scheme":"https","http_version":"1.1","host":"10.0.0.5:8000",'
        b'"status":200,"error":false,"disconnected":false,"duration_ms":12.84,"ttfb_ms":12.1,'
        b'"bytes_in":0,"bytes_out":734,"decision":"admitted","consumer":"acme","key_id":null,'
        b'"client":{"ip":"198.51.100.23","pseudonym":"' + os.urandom(16).hex().encode() + b'",'
        b'"prefix_pseudonym":"' + os.urandom(16).hex().encode() + b'"},"headers":[["host",'
        b'"api.example.com"],["user-agent","python-requests/2.32.3"],["accept","*/*"],'
        b'["accept-encoding","gzip, deflate"],["authorization","Bearer fp:3f9a0c1d2e4b"]],'
        b'"body":{"kind":"empty"}}'
    )
    written = encode(record)
    assert written[0] == CODEC_ZSTD_V2
    assert decode(written) == record
    v1 = zstandard.ZstdCompressor(
        level=1, dict_data=zstandard.ZstdCompressionDict(DICTIONARY_V1), write_dict_id=False,
        write_checksum=False,
    )  # fmt: skip
    earlier = bytes((CODEC_ZSTD_V1,)) + v1.compress(record)
    assert decode(earlier) == record
    assert len(written) < len(earlier)
    with pytest.raises(InvalidRecord):
        decode(bytes((CODEC_ZSTD_V1,)) + written[1:])  # read with the other dictionary


def test_records_are_compressed_and_read_from_many_threads_at_once() -> None:
    """zstd contexts shared between threads crash the process: each thread gets its own. In a
    child process, so that a crash fails this test rather than ending the suite."""
    code = (
        "import threading\n"
        "from meterwall.codec import decode, encode\n"
        "def work(n):\n"
        "    for i in range(3000):\n"
        '        record = b\'{"v":2,"n":%d,"path":"/v1/orders/%d"}\' % (n, i)\n'
        "        assert decode(encode(record)) == record\n"
        "threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, b"ok"), done.stderr[-2000:]
