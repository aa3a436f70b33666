"""meterwall: privacy-first API gateway middleware (metering, sealed 24-hour records) on Redis."""

from .apikeys import KeyStore
from .clock import Clock, FixedClock, SystemClock
from .errors import (
    ConfigurationError,
    InvalidRecord,
    MeterwallError,
    RetentionExceeded,
    StoreUnavailable,
)
from .middleware import Meterwall, aclose, health
from .settings import RETENTION_CEILING, Secret, Settings

__all__ = [
    "RETENTION_CEILING",
    "Clock",
    "ConfigurationError",
    "FixedClock",
    "InvalidRecord",
    "KeyStore",
    "Meterwall",
    "MeterwallError",
    "RetentionExceeded",
    "Secret",
    "Settings",
    "StoreUnavailable",
    "SystemClock",
    "aclose",
    "health",
]
