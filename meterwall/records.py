"""Records: the redacted, pseudonymised content of one exchange, before sealing.

The record is a JSON object (orjson), versioned by its ``v`` field. The plaintext client address
is inside it on purpose: only the holder of the private key, investigating an incident, can ever
read it; everything outside the sealed blob (the indexes) holds keyed pseudonyms only.

Version 2 leaves out the record id and time: the envelope carries both in its header, which the
seal authenticates, so repeating them inside cost about 28 of a record's ~290 compressed bytes.
The reader puts them back (``RecordReader.open``); version 1 records still carry their own.
"""

from __future__ import annotations

from typing import Any

import orjson

from .capture import Captured
from .redaction import Redactor

RECORD_VERSION = 2


def build_record(
    ex: Captured,
    redactor: Redactor,
    client_ip: str | None,
    pseudonyms: tuple[bytes, bytes] | None,
    *,
    address_epoch: int | None = None,
) -> bytes:
    """Serialise one exchange, with every redaction applied, ready to be sealed.

    ``address_epoch``: see ``Redactor.header_pairs`` (the flusher passes its pseudonym hour).
    """
    headers = ex.headers
    content_type = None
    for name, value in headers:
        if name == b"content-type":
            content_type = value.decode("latin-1")
            break
    client: dict[str, Any]
    if pseudonyms is not None:
        client = {"ip": client_ip, "pseudonym": pseudonyms[0].hex(),
                  "prefix_pseudonym": pseudonyms[1].hex()}  # fmt: skip
    else:
        client = {"ip": client_ip, "pseudonym": "invalid" if client_ip else None}
    server = ex.server
    record = {
        "v": RECORD_VERSION,
        "method": ex.method,
        "route": ex.route,
        "path": ex.path,
        "query": redactor.query(ex.query_string),
        "scheme": ex.scheme,
        "http_version": ex.http_version,
        "host": f"{server[0]}:{server[1]}" if server and server[1] is not None else None,
        "status": ex.status,
        "error": ex.error,
        "disconnected": ex.disconnected,
        "duration_ms": round(ex.duration_ns / 1e6, 3),
        "ttfb_ms": round(ex.ttfb_ns / 1e6, 3) if ex.ttfb_ns >= 0 else None,
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "decision": ex.denied or "admitted",
        "consumer": ex.consumer or None,
        "key_id": ex.key_id or None,
        "client": client,
        "headers": redactor.header_pairs(headers, address_epoch=address_epoch),
        "body": redactor.body(content_type, ex.body, size=ex.bytes_in, truncated=ex.truncated),
    }
    return orjson.dumps(record)
