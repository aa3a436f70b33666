"""Data-subject rights: export, erase, restrict; one audit entry each, never a plaintext IP."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from meterwall import Meterwall, Settings
from meterwall.auditlog import AuditLog
from meterwall.clock import FixedClock
from meterwall.errors import ConfigurationError
from meterwall.keyspace import TAG_CONSUMER
from meterwall.reader import RecordReader
from meterwall.subjects import SubjectRights
from meterwall.tracing import TraceQuery, Tracer
from meterwall.usage import UsageReader
from tests.test_access import api_app, make_key
from tests.test_cli import meterwall
from tests.test_flusher import ok_app
from tests.test_middleware import _discard, body_receive, http_scope
from tests.test_tracing import BOUNDARY, NS, send, traffic

__all__ = ["traffic"]  # the fixture, shared with the tracing tests


def rights(redis: Any, traffic: dict[str, Any], private_key: Any = None) -> SubjectRights:
    return SubjectRights(redis, traffic["settings"], private_key, clock=traffic["clock"],
                         actor="os:dpo")  # fmt: skip


async def everything(redis: Any, traffic: dict[str, Any], private_key: Any) -> list[dict]:
    reader = RecordReader(redis, traffic["settings"], private_key, clock=traffic["clock"])
    return await reader.records((BOUNDARY - 60) * NS, (BOUNDARY + 3600) * NS)


async def test_export_holds_exactly_the_subjects_records_and_a_receipt(
    redis, traffic, private_key
) -> None:
    by_ip = await rights(redis, traffic, private_key).export(ip="::ffff:203.0.113.7")
    assert len(by_ip["records"]) == 7
    assert {r["client"]["ip"] for r in by_ip["records"]} == {"203.0.113.7", "::ffff:203.0.113.7"}
    assert by_ip["receipt"]["records"] == 7
    assert "usage" not in by_ip
    by_consumer = await rights(redis, traffic, private_key).export(consumer="globex")
    assert [r["consumer"] for r in by_consumer["records"]] == ["globex", "globex"]
    [month] = by_consumer["usage"]
    assert sum(row["requests"] for row in by_consumer["usage"][month]) == 2
    entries = await AuditLog(redis, traffic["settings"]).entries()
    assert [(e["action"], e["opened"], e["actor"]) for e in entries] == [
        ("export", 7, "os:dpo"), ("export", 2, "os:dpo"),
    ]  # fmt: skip
    assert "203.0.113" not in json.dumps(entries)
    with pytest.raises(ConfigurationError):
        await rights(redis, traffic).export(ip="203.0.113.7")  # no private key: cannot open


async def test_erase_leaves_nothing_of_the_subject_and_everything_else(
    redis, traffic, private_key
) -> None:
    before = await everything(redis, traffic, private_key)
    receipt = await rights(redis, traffic).erase(ip="203.0.113.7")  # no private key needed
    assert receipt["records_erased"] == 7
    assert receipt["index_entries_removed"] >= 7 * 2  # its address and network entries, at least
    after = await everything(redis, traffic, private_key)
    assert {r["client"]["ip"] for r in after} == {"203.0.113.9", "198.51.100.4"}
    assert sorted(r["id"] for r in after) == sorted(
        r["id"] for r in before if r["client"]["ip"] not in ("203.0.113.7", "::ffff:203.0.113.7")
    )
    tracer = Tracer(redis, traffic["settings"], private_key, clock=traffic["clock"], actor="t")
    assert (await tracer.locate(TraceQuery(ip="203.0.113.7"))).hits == []  # no index entry left
    assert len((await tracer.trace(TraceQuery(consumer="globex"))).records) == 2  # renumbered
    assert len((await tracer.trace(TraceQuery(subnet="203.0.113.0/24"))).records) == 2
    assert len((await tracer.trace(TraceQuery(key_id=traffic["acme_key"]))).records) == 1
    entries = await AuditLog(redis, traffic["settings"]).entries()
    assert [(e["action"], e["records_erased"]) for e in entries[:1]] == [("erase", 7)]


async def test_erasing_a_consumer_takes_its_aggregates_only_when_asked(redis, traffic) -> None:
    own: Settings = traffic["settings"]
    keyspace = own.keyspace()
    month = f"{BOUNDARY // 86400 * 86400}"  # any text: only its existence is checked
    closed = keyspace.closed("acme", month)
    await redis.set(closed, b"{}")
    usage = UsageReader(redis, keyspace)
    month_text = time.strftime("%Y-%m", time.gmtime(BOUNDARY))
    assert await usage.totals("acme", month_text, ["route"])
    deliveries = keyspace.export_state("webhook", month_text)  # what a sink keeps, by consumer
    await redis.hset(deliveries, mapping=dict.fromkeys(
        ["closed:acme", "running:acme", "closed:globex", "running:x:acme"], b"{}"))  # fmt: skip
    await redis.set(keyspace.export_state("other", "notes"), b"a string a sink left")  # skipped
    first = await rights(redis, traffic).erase(consumer="acme")
    assert first["aggregate_keys_deleted"] == 0
    assert await usage.totals("acme", month_text, ["route"])  # billing data kept by default
    second = await rights(redis, traffic).erase(consumer="acme", aggregates=True)
    assert second["aggregate_keys_deleted"] > 0
    assert await usage.totals("acme", month_text, ["route"]) == []
    assert await usage.totals("globex", month_text, ["route"])  # another consumer untouched
    assert await redis.exists(closed)  # closed snapshots need their own flag
    assert sorted(await redis.hkeys(deliveries)) == [b"closed:acme", b"closed:globex",
                                                     b"running:x:acme"]  # fmt: skip
    await rights(redis, traffic).erase(consumer="acme", aggregates=True, closed_periods=True)
    assert not await redis.exists(closed)
    assert sorted(await redis.hkeys(deliveries)) == [b"closed:globex", b"running:x:acme"]
    with pytest.raises(ConfigurationError):
        await rights(redis, traffic).erase(ip="203.0.113.7", aggregates=True)


async def test_restricted_subjects_are_counted_but_never_recorded(
    redis, traffic, private_key
) -> None:
    own: Settings = traffic["settings"]
    subjects = rights(redis, traffic)
    await subjects.restrict(ip="203.0.113.7")
    await subjects.restrict(consumer="globex")
    listed = await subjects.restricted()
    assert sorted(r["subject"][:3] for r in listed) == ["con", "ip~"]
    assert "203.0.113" not in json.dumps(listed)
    _, acme = await make_key(redis, own, consumer="acme")
    _, globex = await make_key(redis, own, consumer="globex")
    clock = FixedClock((BOUNDARY + 60) * NS)
    app = Meterwall(api_app, settings=own, clock=clock)
    await send(app, clock, BOUNDARY + 60, "::ffff:203.0.113.7", acme, count=3)  # restricted IP
    await send(app, clock, BOUNDARY + 61, "198.51.100.4", globex, count=2)  # restricted consumer
    await send(app, clock, BOUNDARY + 62, "198.51.100.4", acme, count=1)  # neither
    assert await app.aclose()
    new = [r for r in await everything(redis, traffic, private_key)
           if r["time_ns"] >= (BOUNDARY + 60) * NS]  # fmt: skip
    assert [(r["client"]["ip"], r["consumer"]) for r in new] == [("198.51.100.4", "acme")]
    month = time.strftime("%Y-%m", time.gmtime(BOUNDARY))
    rows = await UsageReader(redis, own.keyspace()).totals("globex", month, ["route"])
    assert sum(r["requests"] for r in rows) == 2 + 2  # counting went on
    assert await subjects.unrestrict(consumer="globex")
    assert not await subjects.unrestrict(consumer="globex")
    actions = [e["action"] for e in await AuditLog(redis, own).entries()]
    assert actions == ["restrict", "restrict", "unrestrict", "unrestrict"]


async def test_the_subject_commands(redis, traffic, keypair, tmp_path: Path) -> None:
    own: Settings = traffic["settings"]
    assert own.pseudonym_secret is not None
    env = {"MW_REDIS_URL": own.redis_url, "MW_KEY_PREFIX": own.key_prefix,
           "MW_PSEUDONYM_SECRET": base64.b64encode(own.pseudonym_secret.reveal()).decode(),
           "MW_RECORD_PRIVATE_KEY_FILE": str(tmp_path / "reader.pem")}  # fmt: skip
    (tmp_path / "reader.pem").write_bytes(keypair[0])
    both = meterwall("subject", "erase", "--ip", "203.0.113.7", "--consumer", "acme", env=env)
    assert (both.returncode, both.stderr.count("\n")) == (2, 1)
    out = tmp_path / "bundle.json"
    # the records are two hours ahead of the CLI's real clock, so an export finds none yet
    done = meterwall("subject", "export", "--consumer", "globex", "--output", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    bundle = json.loads(out.read_text())
    assert bundle["receipt"]["action"] == "export"
    assert sum(r["requests"] for rows in bundle["usage"].values() for r in rows) == 2
    restricted = meterwall("subject", "restrict", "--ip", "203.0.113.7", env=env)
    assert restricted.returncode == 0, restricted.stderr
    assert "203.0.113.7" not in restricted.stdout
    listed = meterwall("subject", "list", "--format", "json", env=env)
    assert [r["subject"][:3] for r in json.loads(listed.stdout)] == ["ip~"]
    erased = meterwall("subject", "erase", "--consumer", "globex", env=env)
    assert json.loads(erased.stdout)["action"] == "erase"
    report = meterwall("audit", "--format", "json", env=env)
    document = json.loads(report.stdout)
    assert report.returncode == (0 if document["ok"] else 1)
    checks = {c["name"]: c for c in document["checks"]}
    assert checks["records"]["ok"], checks["records"]
    assert checks["restrictions"]["detail"].startswith("1 restricted subjects")


async def test_a_keyed_audit_opens_records_and_checks_indexes_and_restrictions(
    redis, traffic, private_key
) -> None:
    from meterwall.retention import Auditor

    own: Settings = traffic["settings"]
    keyspace = own.keyspace()
    reader = RecordReader(redis, own, private_key, clock=traffic["clock"])

    async def audit() -> dict[str, Any]:
        auditor = Auditor(redis, keyspace, reader=reader, settings=own, clock=traffic["clock"])
        return {c.name: c for c in await auditor.run()}

    checks = await audit()
    assert checks["records"].ok, checks["records"].problems
    assert checks["records"].detail.startswith("10 of 10 sampled records")
    assert checks["index"].ok, checks["index"].problems
    await rights(redis, traffic).restrict(consumer="globex")  # its records are from "later"
    assert not (await audit())["restrictions"].ok
    await rights(redis, traffic).erase(consumer="globex")
    assert (await audit())["restrictions"].ok
    streams = [k async for k in redis.scan_iter(match=f"{own.key_prefix}:*:rec:*")]
    lengths = [await redis.xlen(k) for k in streams]
    stream = streams[lengths.index(max(lengths))]
    [(entry, fields)] = (await redis.xrange(stream))[:1]
    await redis.xdel(stream, entry)  # the index still points at it
    fields[b"r"] = fields[b"r"][:-1] + bytes([fields[b"r"][-1] ^ 1])  # and one record is forged
    await redis.xadd(stream, fields)
    broken = await audit()
    assert not broken["index"].ok
    assert not broken["records"].ok
    assert "does not open" in broken["records"].problems[0]
    await redis.zadd(stream.replace(b":rec:", b":ix:"), {b"k" + bytes(16): 0})
    problems = (await audit())["index"].problems
    assert any(p.endswith("an index member of an unknown format") for p in problems)


async def test_an_erasure_that_renumbers_an_index_keeps_its_expiry(redis, settings) -> None:
    """Two consumers in one stored group, no address to index: erasing the consumer whose index
    member comes first leaves the other's member, renumbered, in an index that still expires
    (removing the last member before adding the renumbered one would delete the key, and the
    add would make a new one with no expiry)."""
    own = settings.replace(consumer_header="X-Consumer")
    keyspace = own.keyspace()
    names = [f"tenant-{n}" for n in range(64)]
    first = names[0]
    second = next(n for n in names[1:] if keyspace.shard_of(n) == keyspace.shard_of(first))
    mw = Meterwall(ok_app, settings=own)
    for name in (first, second):  # one flush: one group in one stream entry
        await mw(http_scope(client=None, headers=[(b"x-consumer", name.encode())]),
                 body_receive(), _discard)  # fmt: skip
    await mw.aclose()
    idents = {name: mw.flusher._index_ident(TAG_CONSUMER, name) for name in (first, second)}
    shard = keyspace.shard_of(first)
    [slice_name] = await redis.zrange(keyspace.slices(shard), 0, -1)
    index = keyspace.index(shard, int(slice_name))
    assert await redis.zcard(index) == 2
    doomed = min(idents, key=idents.__getitem__)  # its member sorts first: it goes first
    clock = FixedClock(time.time_ns())
    receipt = await SubjectRights(redis, own, None, clock=clock, actor="os:dpo").erase(
        consumer=doomed
    )
    assert receipt["records_erased"] == 1
    [member] = await redis.zrange(index, 0, -1)
    assert member.startswith(idents[second if doomed == first else first])
    assert 0 < await redis.ttl(index) <= 86400


async def test_erasing_a_consumer_keeps_a_consumer_whose_id_extends_it(
    redis, settings, private_key
) -> None:
    """Consumer ids may hold ':': erasing (or exporting) acme must not touch acme:eu8's billing
    data when both fall in the same shard."""
    keyspace = settings.keyspace()
    other = next(f"acme:eu{n}" for n in range(1000)
                 if keyspace.shard_of(f"acme:eu{n}") == keyspace.shard_of("acme"))  # fmt: skip
    field = "k\x1f/x\x1fGET\x1f200\x1frequests"
    for consumer, count in (("acme", 1), (other, 5)):
        await redis.hset(keyspace.counters_day(consumer, "2026-11-23"), field, count)
        await redis.hset(keyspace.counters_month(consumer, "2026-11"), field, count)
    await redis.hset(keyspace.counters_month(other, "2026-10"), field, 5)
    rights = SubjectRights(redis, settings, private_key, actor="os:dpo")
    exported = await rights.export(consumer="acme")
    assert sorted(exported["usage"]) == ["2026-11"]
    await rights.erase(consumer="acme", aggregates=True)
    assert not await redis.exists(keyspace.counters_day("acme", "2026-11-23"))
    assert not await redis.exists(keyspace.counters_month("acme", "2026-11"))
    assert await redis.exists(keyspace.counters_day(other, "2026-11-23"))
    assert await redis.exists(keyspace.counters_month(other, "2026-11"))


async def test_an_export_into_an_existing_file_leaves_it_readable_by_its_owner_only(
    redis, traffic, keypair, tmp_path: Path
) -> None:
    import os

    settings = traffic["settings"]
    assert settings.pseudonym_secret is not None
    (tmp_path / "reader.pem").write_bytes(keypair[0])
    env = {"MW_REDIS_URL": settings.redis_url, "MW_KEY_PREFIX": settings.key_prefix,
           "MW_PSEUDONYM_SECRET": base64.b64encode(settings.pseudonym_secret.reveal()).decode(),
           "MW_RECORD_PRIVATE_KEY_FILE": str(tmp_path / "reader.pem")}  # fmt: skip
    out = tmp_path / "bundle.json"
    out.write_text("")
    os.chmod(out, 0o644)  # pre-created, or a second run into the same name
    done = meterwall("subject", "export", "--consumer", "acme", "--output", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert json.loads(out.read_text())["receipt"]["action"] == "export"


async def test_a_subject_request_covers_records_a_writer_ahead_of_this_host_stamped(
    redis, settings, private_key
) -> None:
    """An app server whose clock runs three hours ahead of the host serving the request:
    its records lie in this host's future, and are still the subject's."""
    ahead = FixedClock(time.time_ns() + 3 * 3600 * 10**9)
    app = Meterwall(ok_app, settings=settings, clock=ahead)
    await app(http_scope("/x", client=("203.0.113.7", 5000)), body_receive(), _discard)
    assert await app.aclose()
    rights = SubjectRights(redis, settings, private_key, actor="os:dpo")
    exported = await rights.export(ip="203.0.113.7")
    assert [r["client"]["ip"] for r in exported["records"]] == ["203.0.113.7"]
    assert (await rights.erase(ip="203.0.113.7"))["records_erased"] == 1
    assert (await rights.export(ip="203.0.113.7"))["records"] == []
