"""Settings: secure defaults, and invalid values fail at start-up naming the variable."""

from __future__ import annotations

import logging
import os

import pytest

from meterwall import RETENTION_CEILING, ConfigurationError, Meterwall, Settings
from meterwall.sealing import generate_keypair

PUBLIC = generate_keypair()[1]
SECRET = "A" * 43


def env(**values: str) -> dict[str, str]:
    base = {"MW_RECORD_PUBLIC_KEY": PUBLIC, "MW_PSEUDONYM_SECRET": SECRET}
    return {**base, **{f"MW_{k.upper()}": v for k, v in values.items()}}


def test_defaults_are_the_secure_configuration() -> None:
    settings = Settings.from_env(env())
    assert settings.records == "sealed"
    assert settings.raw_retention == RETENTION_CEILING
    assert not settings.trusted_proxies
    assert settings.consumer_header is None
    assert settings.weakened() == []
    assert "AAAA" not in repr(settings)


@pytest.mark.parametrize(
    ("values", "note"),
    [
        ({"redis_url": "rediss://10.0.0.5:6379/0?ssl_cert_reqs=none"}, "TLS certificate"),
        ({"redis_url": "rediss://10.0.0.5/0?ssl_check_hostname=false"}, "host name"),
        ({"trusted_proxies": "0.0.0.0/0, ::/0"}, "/0 network"),
    ],
)
def test_weaker_connection_and_proxy_settings_are_noted(values: dict[str, str], note: str) -> None:
    notes = Settings.from_env(env(**values)).weakened()
    assert len(notes) == 1, notes
    assert note in notes[0]
    assert Settings.from_env(env(redis_url="rediss://10.0.0.5:6379/0")).weakened() == []


def test_values_are_parsed_with_units() -> None:
    settings = Settings.from_env(
        env(raw_retention="90m", body_limit="4KiB", flush_interval="250ms",
            trusted_proxies="10.0.0.0/8, ::1", shards="32")
    )  # fmt: skip
    assert settings.raw_retention == 5400
    assert settings.body_limit == 4096
    assert settings.flush_interval == 0.25
    assert settings.shards == 32


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"raw_retention": "25h"}, "MW_RAW_RETENTION"),
        ({"raw_retention": "soon"}, "MW_RAW_RETENTION"),
        ({"key_prefix": "mw{x}"}, "MW_KEY_PREFIX"),
        ({"record_public_key": "abc"}, "MW_RECORD_PUBLIC_KEY"),
        ({"pseudonym_secret": "c2hvcnQ="}, "MW_PSEUDONYM_SECRET"),
        ({"records": "plain"}, "MW_RECORDS"),
        ({"redis_url": "http://x"}, "MW_REDIS_URL"),
        ({"redis_url": "valkey://127.0.0.1:6379/0"}, "MW_REDIS_URL"),
        ({"trusted_proxies": "10.0.0.0/33"}, "MW_TRUSTED_PROXIES"),
        ({"shards": "many"}, "MW_SHARDS"),
        ({"buffer_bytes": "1KiB"}, "MW_BUFFER_BYTES"),
        ({"consumer_header": "X Consumer"}, "MW_CONSUMER_HEADER"),
    ],
)
def test_invalid_values_fail_naming_the_variable(values: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(env(**values))
    assert caught.value.setting == variable
    assert str(caught.value).startswith(variable + ": ")


def test_sealed_records_need_their_keys() -> None:
    with pytest.raises(ConfigurationError, match="MW_RECORD_PUBLIC_KEY: is required"):
        Settings.from_env({})
    assert Settings.from_env({"MW_RECORDS": "off"}).records == "off"


def test_weaker_settings_are_logged_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env(
        env(consumer_header="X-Consumer", redis_url="redis://redis.internal:6379/0")
    )
    with caplog.at_level(logging.WARNING, logger="meterwall"):
        Meterwall(lambda *a: None, settings=settings)  # type: ignore[arg-type,return-value]
    text = caplog.text
    assert "MW_CONSUMER_HEADER=X-Consumer" in text
    assert "no TLS" in text
    assert os.environ.get("MW_RECORDS") != "off"
