"""IP pseudonyms: keyed, hourly, agreed between writers through Redis, and never plain."""

from __future__ import annotations

import os
import time

from meterwall.clientip import canonical_ip
from meterwall.keyspace import Keyspace
from meterwall.pseudonyms import HOUR, IpPseudonymiser

HOUR_NOW = int(time.time()) // HOUR


def pseudonymiser(prefix: str, secret: bytes | None = None) -> IpPseudonymiser:
    return IpPseudonymiser(secret or os.urandom(32), Keyspace(prefix, 16), 86400)


def test_ipv4_and_its_mapped_form_share_a_pseudonym_and_hours_differ(key_prefix) -> None:
    p = pseudonymiser(key_prefix)
    v4, mapped = canonical_ip("198.51.100.7"), canonical_ip("::ffff:198.51.100.7")
    assert v4 is not None
    assert mapped is not None
    epoch = p.epoch(HOUR_NOW)
    assert epoch.pseudonyms(v4) == epoch.pseudonyms(mapped)
    assert p.epoch(HOUR_NOW + 1).pseudonyms(v4)[0] != epoch.pseudonyms(v4)[0]
    neighbour = canonical_ip("198.51.100.200")
    assert neighbour is not None
    assert epoch.pseudonyms(neighbour)[1] == epoch.pseudonyms(v4)[1]  # same /24
    assert epoch.pseudonyms(neighbour)[0] != epoch.pseudonyms(v4)[0]
    assert p.text("not an ip", HOUR_NOW) == "ip:invalid"


async def test_writers_agree_on_an_epoch_key_stored_only_wrapped(redis, key_prefix) -> None:
    secret = os.urandom(32)
    first, second = pseudonymiser(key_prefix, secret), pseudonymiser(key_prefix, secret)
    await first.prepare(HOUR_NOW, redis)
    await second.prepare(HOUR_NOW, redis)
    ip = canonical_ip("203.0.113.5")
    assert ip is not None
    assert first.epoch(HOUR_NOW).pseudonyms(ip) == second.epoch(HOUR_NOW).pseudonyms(ip)
    key = Keyspace(key_prefix, 16).epoch_keys(HOUR_NOW)
    stored = await redis.hgetall(key)
    assert len(stored) == 1
    [wrapped] = stored.values()
    assert first.epoch(HOUR_NOW).secret not in wrapped
    expire_at = (HOUR_NOW + 1) * HOUR + 86400  # gone when the window has passed
    assert abs(time.time() + await redis.ttl(key) - expire_at) <= 2


async def test_a_key_made_while_redis_was_away_is_published_as_another_key(
    redis, key_prefix
) -> None:
    secret = os.urandom(32)
    online, offline = pseudonymiser(key_prefix, secret), pseudonymiser(key_prefix, secret)
    await online.prepare(HOUR_NOW, redis)
    local = offline.epoch(HOUR_NOW)  # Redis unreachable: a local key
    assert offline.unpublished_hours() == [HOUR_NOW]
    await offline.prepare(HOUR_NOW, redis)
    assert offline.unpublished_hours() == []
    stored = await redis.hgetall(Keyspace(key_prefix, 16).epoch_keys(HOUR_NOW))
    assert local.key_id.encode() in stored
    assert len(stored) == 2  # a search by IP tries both


async def test_a_writer_whose_clock_runs_ahead_cannot_keep_an_epoch_key_longer(
    redis, key_prefix
) -> None:
    """Its hour lies in the future, so it asks for a later end: Redis caps it at its own now +
    an hour + the ceiling (a day's unique-client key: + a day + the ceiling)."""
    secret = os.urandom(32)
    ahead = HOUR_NOW + 48  # two days ahead
    await pseudonymiser(key_prefix, secret).prepare(ahead, redis)
    ttl = await redis.ttl(Keyspace(key_prefix, 16).epoch_keys(ahead))
    assert 86400 < ttl <= 3600 + 86400
    await pseudonymiser(key_prefix, secret).prepare(HOUR_NOW, redis)  # a correct clock's
    ttl = await redis.ttl(Keyspace(key_prefix, 16).epoch_keys(HOUR_NOW))
    assert ttl <= 3600 + 86400
    assert abs(time.time() + ttl - ((HOUR_NOW + 1) * HOUR + 86400)) <= 2  # not cut short
