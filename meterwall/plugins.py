"""Plugins: how a caller is identified, what more is redacted, where usage goes.

A plugin is explicit. Installing a package never adds code to the request path: a plugin runs
only when it is named in ``MW_PLUGINS`` (loaded through the ``meterwall.plugins`` entry-point
group) or passed as an instance (``Meterwall(app, plugins=[...])``). An entry point names a
*factory*: an object with ``name``, ``kind`` and ``summary`` attributes and a
``create(settings)`` method that returns the plugin instance, so ``meterwall plugins list`` can
describe a plugin without creating it.

Kinds and what an instance provides:

* ``resolver`` (``CallerResolver``): ``async resolve(scope) -> Caller | None`` identifies the
  caller before the API-key check; it returns None when the request carries nothing it knows,
  and raises ``InvalidCaller`` when it carries something it rejects (answered 401).
* ``redactor`` (``ValueRedactor``): ``redact(text) -> text`` masks what the built-in rules do not
  know in string values of JSON and form bodies and in query values, before sealing.
* ``sink`` (``UsageSink``): ``async deliver(report) -> None`` pushes closed periods somewhere.
* ``adapter``: a framework adapter (``meterwall_aiohttp``); nothing to create, listed for people.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigurationError, MeterwallError
from .types import Scope

GROUP = "meterwall.plugins"
KINDS = ("resolver", "redactor", "sink", "adapter")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a request, as a resolver established it."""

    consumer: str
    key_id: str = ""  # a stable id of the credential (never the credential), for the ledger
    scopes: frozenset[str] = frozenset()


class InvalidCaller(MeterwallError):
    """A credential was presented and rejected; ``reason`` is the stable problem type."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class CallerResolver(Protocol):
    name: str

    async def resolve(self, scope: Scope) -> Caller | None: ...


@runtime_checkable
class ValueRedactor(Protocol):
    name: str

    def redact(self, text: str) -> str: ...


@runtime_checkable
class UsageSink(Protocol):
    name: str

    async def deliver(self, report: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class Loaded:
    """The active plugin instances of one middleware, by kind."""

    resolvers: tuple[CallerResolver, ...] = ()
    redactors: tuple[ValueRedactor, ...] = ()
    sinks: tuple[UsageSink, ...] = ()

    @property
    def names(self) -> list[str]:
        plugins: list[Any] = [*self.resolvers, *self.redactors, *self.sinks]
        return [str(p.name) for p in plugins]


def discover() -> dict[str, EntryPoint]:
    """Installed plugins by name (nothing is imported)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def describe() -> list[dict[str, str]]:
    """Name, kind and summary of every installed plugin (their factories are imported)."""
    rows = []
    for name, entry in sorted(discover().items()):
        try:
            factory = entry.load()
            rows.append({"name": name, "kind": str(factory.kind), "summary": str(factory.summary),
                         "module": entry.value})  # fmt: skip
        except Exception as exc:  # a broken plugin must not hide the others
            rows.append({"name": name, "kind": "?", "summary": f"cannot load: {exc}",
                         "module": entry.value})  # fmt: skip
    return rows


def parse_names(text: str, *, setting: str = "MW_PLUGINS") -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigurationError(setting, f"{name!r} is not a plugin name")
    return names


def load(names: Iterable[str], settings: Any, instances: Iterable[Any] = ()) -> Loaded:
    """Create the named plugins (``MW_PLUGINS``) and sort them, with given instances, by kind.

    Raises ``ConfigurationError`` naming MW_PLUGINS for an unknown or broken plugin: a
    deployment that asked for a plugin must not start without it.
    """
    installed = discover()
    created: list[Any] = list(instances)
    for name in names:
        entry = installed.get(name)
        if entry is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigurationError("MW_PLUGINS", f"no plugin {name!r} (installed: {known})")
        try:
            factory = entry.load()
            if getattr(factory, "kind", "") == "adapter":
                continue  # adapters are set up by the app, not by settings
            created.append(factory.create(settings))
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError("MW_PLUGINS", f"plugin {name!r} failed: {exc}") from None
    resolvers, redactors, sinks = [], [], []
    for plugin in created:
        if isinstance(plugin, CallerResolver):
            resolvers.append(plugin)
        elif isinstance(plugin, ValueRedactor):
            redactors.append(plugin)
        elif isinstance(plugin, UsageSink):
            sinks.append(plugin)
        else:
            raise ConfigurationError(
                "plugins", f"{plugin!r} is not a resolver, redactor or sink (see meterwall.plugins)"
            )
    return Loaded(tuple(resolvers), tuple(redactors), tuple(sinks))
