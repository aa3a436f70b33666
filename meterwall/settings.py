"""Settings: one frozen dataclass, validated at construction, loadable from ``MW_*`` variables.

Every field can be set from the environment variable ``MW_<FIELD NAME IN CAPITALS>``. Invalid
values raise ``ConfigurationError`` naming that variable, so a bad deployment fails at start-up
instead of at the first request.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .clientip import PROXY_HEADERS, TrustedProxies
from .errors import ConfigurationError
from .keyspace import Keyspace

#: The privacy promise: raw records never live longer than this (seconds).
RETENTION_CEILING = 24 * 3600

RecordsMode = Literal["sealed", "off"]
AccessMode = Literal["off", "keys"]
FailurePolicy = Literal["open", "closed"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
}  # fmt: skip


class Secret:
    """Bytes that never show up in a ``repr``, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def env_name(field_name: str) -> str:
    return "MW_" + field_name.upper()


def parse_duration(setting: str, text: str) -> float:
    """``"24h"``, ``"90m"``, ``"30s"``, ``"100ms"`` or plain seconds, to seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigurationError(setting, f"expected a duration like 30s, 15m or 24h, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(setting: str, text: str) -> int:
    """``"16KiB"``, ``"16MiB"`` or plain bytes, to bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigurationError(
            setting, f"expected a size like 16384, 16KiB or 16MiB, got {text!r}"
        )
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_secret(setting: str, text: str) -> Secret:
    """A base64 (standard or URL-safe) secret of at least 32 bytes."""
    text = text.strip().replace("+", "-").replace("/", "_")
    try:
        raw = base64.b64decode(_pad(text), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(setting, "is not valid base64") from None
    if len(raw) < 32:
        raise ConfigurationError(setting, f"must decode to at least 32 bytes, got {len(raw)}")
    return Secret(raw)


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def parse_weights(setting: str, text: str) -> dict[str, int]:
    """``"/search=5, /health=0"``: billable units per request of a route template (default 1)."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        route, eq, weight = item.rpartition("=")
        if not eq or not route.strip() or not weight.strip().isdigit():
            raise ConfigurationError(setting, f"expected route=weight, got {item!r}")
        weights[route.strip()] = int(weight)
    return weights


def _parse_int(setting: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigurationError(setting, f"expected an integer, got {text!r}") from None


def _parse_bool(setting: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(setting, f"expected true or false, got {text!r}")


def _parse_optional_str(setting: str, text: str) -> str | None:
    return text.strip() or None


_FROM_TEXT: dict[str, Any] = {
    "raw_retention": parse_duration,
    "flush_interval": parse_duration,
    "counter_flush_interval": parse_duration,
    "redis_timeout": parse_duration,
    "lateness": parse_duration,
    "retention_15m": parse_duration,
    "retention_1h": parse_duration,
    "retention_day": parse_duration,
    "retention_month": parse_duration,
    "access_timeout": parse_duration,
    "audit_log_retention": parse_duration,
    "body_limit": parse_size,
    "buffer_bytes": parse_size,
    "batch_max_records": _parse_int,
    "shards": _parse_int,
    "redis_cluster": lambda setting, text: _parse_bool(setting, text),
    "pseudonym_secret": parse_secret,
    "trusted_proxies": lambda setting, text: TrustedProxies.parse(text, setting=setting),
    "consumer_header": _parse_optional_str,
    "proxy_header": lambda setting, text: text.strip().lower(),
    "record_public_key": _parse_optional_str,
    "route_weights": lambda setting, text: parse_weights(setting, text),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the middleware and the CLI need to know; see the README for each field.

    Durations are seconds, sizes are bytes. Construction validates every field and raises
    ``ConfigurationError`` naming the ``MW_*`` variable of the first invalid one.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "mw"
    records: RecordsMode = "sealed"
    record_public_key: str | None = None
    pseudonym_secret: Secret | None = field(default=None, repr=False)
    raw_retention: float = float(RETENTION_CEILING)
    body_limit: int = 16 * 1024
    flush_interval: float = 0.1
    counter_flush_interval: float = 5.0
    batch_max_records: int = 2000
    buffer_bytes: int = 16 * 1024 * 1024
    shards: int = 16
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    proxy_header: str = ""  # empty: the trusted proxies' own choice, else X-Forwarded-For
    consumer_header: str | None = None
    redis_timeout: float = 2.0
    route_weights: dict[str, int] = field(default_factory=dict)
    lateness: float = 86400.0
    retention_15m: float = 48 * 3600.0
    retention_1h: float = 90 * 86400.0
    retention_day: float = 396 * 86400.0
    retention_month: float = 762 * 86400.0
    access: AccessMode = "off"
    access_rules: str = ""
    api_key_header: str = "X-API-Key"
    access_allow: str = ""
    access_deny: str = ""
    access_on_redis_error: FailurePolicy = "open"
    access_timeout: float = 0.5
    plans: str = ""
    default_plan: str = ""
    api_key_query: str = ""
    audit_log_retention: float = 396 * 86400.0
    plugins: str = ""
    journal_dir: str = ""
    redis_cluster: bool = False

    def __post_init__(self) -> None:
        self._settle_proxy_header()
        self._check()

    def _settle_proxy_header(self) -> None:
        """One header for the trusted proxies: MW_PROXY_HEADER, or the one a ``TrustedProxies``
        given in code names, or X-Forwarded-For; two that disagree are refused."""
        proxies, wanted = self.trusted_proxies, self.proxy_header
        if wanted and wanted not in PROXY_HEADERS:
            raise ConfigurationError(
                env_name("proxy_header"), f"must be one of {', '.join(PROXY_HEADERS)}"
            )
        if not isinstance(proxies, TrustedProxies):
            return  # refused by _check, naming MW_TRUSTED_PROXIES
        if not wanted:
            wanted = proxies.header
        elif proxies.chosen and proxies.header != wanted:
            raise ConfigurationError(
                env_name("proxy_header"),
                f"is {wanted}, but the TrustedProxies given read {proxies.header}",
            )
        object.__setattr__(self, "trusted_proxies", proxies.reading(wanted))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every ``MW_*`` variable that names a field; ``overrides`` win over the env."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            if name in env:
                parse = _FROM_TEXT.get(f.name)
                values[f.name] = parse(name, env[name]) if parse else env[name]
        values.update(overrides)
        return cls(**values)

    def keyspace(self) -> Keyspace:
        """The key names of this deployment (prefix, shard count, slice length)."""
        return Keyspace(self.key_prefix, self.shards, int(self.raw_retention))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                env_name("redis_url"),
                "must be a redis://, rediss:// or unix:// URL (Valkey too: same protocol)",
            )
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,32}", self.key_prefix):
            raise ConfigurationError(
                env_name("key_prefix"), "use 1-32 letters, digits, '_', '.', ':' or '-' (no '{')"
            )
        if self.records not in ("sealed", "off"):
            raise ConfigurationError(env_name("records"), "must be 'sealed' or 'off'")
        if self.records == "sealed":
            if self.record_public_key is None:
                raise ConfigurationError(
                    env_name("record_public_key"),
                    "is required while MW_RECORDS=sealed (run `meterwall keygen`)",
                )
            from .sealing import load_public_key

            load_public_key(self.record_public_key, setting=env_name("record_public_key"))
            if self.pseudonym_secret is None:
                raise ConfigurationError(
                    env_name("pseudonym_secret"),
                    "is required while MW_RECORDS=sealed (run `meterwall keygen`)",
                )
        if self.pseudonym_secret is not None and not isinstance(self.pseudonym_secret, Secret):
            raise ConfigurationError(env_name("pseudonym_secret"), "must be a meterwall.Secret")
        if not 1 <= self.raw_retention <= RETENTION_CEILING:
            raise ConfigurationError(
                env_name("raw_retention"),
                f"must be between 1 s and the 24 h ceiling ({RETENTION_CEILING} s), "
                f"got {self.raw_retention:g} s",
            )
        _check_range("body_limit", self.body_limit, 0, 16 * 1024 * 1024)
        _check_range("flush_interval", self.flush_interval, 0.005, 60)
        _check_range("counter_flush_interval", self.counter_flush_interval, 0, 300)
        _check_range("batch_max_records", self.batch_max_records, 1, 65_535)
        _check_range("buffer_bytes", self.buffer_bytes, 64 * 1024, 4 * 1024**3)
        _check_range("shards", self.shards, 1, 1024)
        _check_range("redis_timeout", self.redis_timeout, 0.01, 60)
        _check_range("lateness", self.lateness, 60, 7 * 86400)
        for name, low in (
            ("retention_15m", 900),
            ("retention_1h", 3600),
            ("retention_day", 86400),
            ("retention_month", 31 * 86400),
        ):
            _check_range(name, getattr(self, name), low, 20 * 365 * 86400)  # fmt: skip
        _check_range("access_timeout", self.access_timeout, 0.01, 10)
        _check_range("audit_log_retention", self.audit_log_retention, 86400, 20 * 365 * 86400)
        if self.access not in ("off", "keys"):
            raise ConfigurationError(env_name("access"), "must be 'off' or 'keys'")
        if self.access_on_redis_error not in ("open", "closed"):
            raise ConfigurationError(
                env_name("access_on_redis_error"), "must be 'open' or 'closed'"
            )
        if self.access == "keys" and self.pseudonym_secret is None:
            raise ConfigurationError(
                env_name("pseudonym_secret"),
                "is required while MW_ACCESS=keys (it keys the key hashes)",
            )
        from .access import parse_networks, parse_rules

        parse_rules(self.access_rules, setting=env_name("access_rules"))
        parse_networks(self.access_allow, setting=env_name("access_allow"))
        parse_networks(self.access_deny, setting=env_name("access_deny"))
        from .limits import parse_plans
        from .plugins import parse_names

        parse_names(self.plugins, setting=env_name("plugins"))

        plans = parse_plans(self.plans, setting=env_name("plans"))
        if self.default_plan and self.default_plan not in plans:
            raise ConfigurationError(
                env_name("default_plan"), f"no plan {self.default_plan!r} in MW_PLANS"
            )
        if self.api_key_query and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.api_key_query):
            raise ConfigurationError(env_name("api_key_query"), "must be a query parameter name")
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", self.api_key_header):
            raise ConfigurationError(env_name("api_key_header"), "must be a header name")
        if not isinstance(self.trusted_proxies, TrustedProxies):
            raise ConfigurationError(env_name("trusted_proxies"), "must be a TrustedProxies")
        if not isinstance(self.route_weights, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0
            for k, v in self.route_weights.items()
        ):
            raise ConfigurationError(env_name("route_weights"), "must map routes to weights >= 0")
        if self.consumer_header is not None and not re.fullmatch(
            r"[A-Za-z0-9-]{1,64}", self.consumer_header
        ):
            raise ConfigurationError(env_name("consumer_header"), "must be a header name")

    def weakened(self) -> list[str]:
        """The settings that trade some protection for convenience; logged at start-up."""
        notes = []
        if self.access == "keys" and self.access_on_redis_error == "open":
            notes.append(
                "MW_ACCESS_ON_REDIS_ERROR=open (the default failure policy): while Redis is away, "
                "keys known valid from the cache are admitted without rate or quota checks "
                "(unknown keys get 503); set it to closed to refuse instead"
            )
        if self.access == "keys" and self.api_key_query:
            notes.append(
                f"MW_API_KEY_QUERY={self.api_key_query}: API keys are also read from the query "
                "string, where proxies and browsers may log them"
            )
        if self.consumer_header:
            notes.append(
                f"MW_CONSUMER_HEADER={self.consumer_header}: the consumer id is taken from a "
                "request "
                "header, trusting an upstream gateway to set it"
            )
        if self.redis_url.startswith("redis://") and not _is_loopback_url(self.redis_url):
            notes.append("MW_REDIS_URL uses plain redis:// to a non-loopback host (no TLS)")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.redis_url).query)
        unchecked = {v.lower() for v in query.get("ssl_cert_reqs", ())} & {"none", "optional"}
        unchecked |= {v.lower() for v in query.get("ssl_check_hostname", ())} & {"false", "0", "no"}
        if unchecked:
            notes.append("MW_REDIS_URL turns TLS certificate or host name checks off")
        if any(net.prefixlen == 0 for net in self.trusted_proxies.networks):
            notes.append(
                "MW_TRUSTED_PROXIES holds a /0 network: every client may set its own address "
                f"in {self.trusted_proxies.header} (records, restrictions and network rules "
                "believe it)"
            )
        return notes


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigurationError(
            env_name(name), f"must be between {low:g} and {high:g}, got {value!r}"
        )


def _is_loopback_url(url: str) -> bool:
    host = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return host.strip("[]") in ("localhost", "127.0.0.1", "::1")
