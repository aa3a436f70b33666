"""The exceptions meterwall raises.

One hierarchy so that callers can catch ``MeterwallError`` and know it came from us. Crypto has
exactly one failure type (``InvalidRecord``): a tampered record, a wrong key and a truncated blob
must be indistinguishable to whoever triggers them.
"""


class MeterwallError(Exception):
    """Base class of every error meterwall raises on purpose."""


class ConfigurationError(MeterwallError, ValueError):
    """A setting is missing or invalid; the message names the ``MW_*`` setting."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class StoreUnavailable(MeterwallError):
    """Redis could not be reached or did not answer in time."""


class InvalidRecord(MeterwallError):
    """A sealed record (or wrapped key) failed to open: tampered, truncated or wrong key."""


class RetentionExceeded(MeterwallError):
    """A read asked for data older than the raw-record retention ceiling."""
