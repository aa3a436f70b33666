"""The ``meterwall`` command.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from .apikeys import KeyStore
from .consumers import Consumer, ConsumerRegistry, check_consumer_id
from .errors import ConfigurationError, MeterwallError
from .periods import adjustments, close_period
from .retention import Auditor, failed, purge
from .sealing import generate_keypair
from .settings import Settings, parse_duration
from .usage import UsageReader

T = TypeVar("T")
out = Console()


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"meterwall: error: {message}", err=True)
    sys.exit(code)


def reader_settings() -> Settings:
    """Settings for reader-side commands: the sealing key is not needed to audit or purge."""
    return Settings.from_env(records="off")


def run_async(func: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(func(*args, **kwargs))

    return wrapper


@click.group()
@click.version_option(package_name="meterwall")
def cli() -> None:
    """meterwall: privacy-first API gateway middleware on Redis."""


@cli.command()
@click.option("--keep-running", is_flag=True, help="Leave the API and Redis up afterwards.")
@click.option("--requests", "count", default=300, show_default=True,
              type=click.IntRange(1, 1_000_000), help="Requests to send.")  # fmt: skip
def demo(keep_running: bool, count: int) -> None:
    """Run a sample API with meterwall on an embedded Redis and show what is stored."""
    from .demo import run_demo

    asyncio.run(run_demo(out, keep_running=keep_running, count=count))


@cli.command()
@click.option(
    "--private-key",
    "private_key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("meterwall-private.pem"),
    show_default=True,
    help="Where to write the private key (reader side only).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing private key file.")
def keygen(private_key: Path, force: bool) -> None:
    """Make a record-sealing key pair and a pseudonymisation secret.

    Prints the MW_* lines app servers need (public key only) in a form a shell can `export`.
    """
    pem, public = generate_keypair()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(private_key, flags, 0o600)
    except FileExistsError:
        _fail(f"{private_key} exists; pass --force to replace it (records sealed to it are lost)")
    except OSError as exc:
        _fail(f"cannot write {private_key}: {exc.strerror}")
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(pem)
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
    click.echo(f"MW_RECORD_PUBLIC_KEY={public}")
    click.echo(f"MW_PSEUDONYM_SECRET={secret}")
    click.echo(
        f"# private key written to {private_key} (mode 0600): keep it with the security team, "
        "never on app servers",
        err=True,
    )


@cli.command()
@click.option("--private-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Also open a sample of records (else MW_RECORD_PRIVATE_KEY_FILE).")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)  # fmt: skip
@run_async
async def audit(private_key: Path | None, fmt: str) -> None:
    """Prove the retention promise on the Redis at MW_REDIS_URL; exit 1 on any failure."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .reader import RecordReader
    from .store import connect

    settings = reader_settings()
    key = None
    if private_key is not None or os.environ.get("MW_RECORD_PRIVATE_KEY_FILE"):
        key = private_key_from(private_key)
    redis = connect(settings)
    bar = Progress(TextColumn("scanning keys"), BarColumn(), MofNCompleteColumn(),
                   console=Console(stderr=True), transient=True,
                   disable=fmt != "table")  # fmt: skip
    try:
        settings = await _as_deployed(redis, settings)
        task = bar.add_task("keys", total=await redis.dbsize())
        reader = RecordReader(redis, settings, key) if key is not None else None
        auditor = Auditor(redis, settings.keyspace(), reader=reader, settings=settings,
                          progress=lambda done: bar.update(task, completed=done))  # fmt: skip
        with bar:
            checks = await auditor.run()
    finally:
        await redis.aclose()
    if fmt == "json":
        report = [{"name": c.name, "ok": c.ok, "detail": c.detail, "problems": c.problems}
                  for c in checks]  # fmt: skip
        click.echo(orjson.dumps({"ok": not failed(checks), "checks": report},
                                option=orjson.OPT_INDENT_2).decode())  # fmt: skip
    else:
        table = Table("check", "result", "detail")
        for check in checks:
            table.add_row(check.name, "[green]pass" if check.ok else "[red]FAIL", check.detail)
            for problem in check.problems[:20]:
                table.add_row("", "", f"[red]{problem}")
        out.print(table)
    if failed(checks):
        sys.exit(1)


@cli.command("purge")
@run_async
async def purge_command() -> None:
    """Apply retention now and ask Redis to rewrite its persistence files."""
    from .store import connect

    settings = reader_settings()
    redis = connect(settings)
    try:
        settings = await _as_deployed(redis, settings)
        keyspace = settings.keyspace()
        result = await purge(redis, keyspace, int(settings.raw_retention))
    finally:
        await redis.aclose()
    click.echo(
        f"deleted {result['deleted_keys']} expired keys; "
        f"requested {result['rewrites_requested']} persistence rewrite(s)"
    )


def _emit(rows: list[dict[str, Any]], fmt: str, title: str) -> None:
    """Rows for people (an aligned table) or for scripts (JSON, CSV with a header line)."""
    if fmt == "json":
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if row[c] is None else row[c] for c in columns] for row in rows])
        return
    table = Table(*columns, title=title)
    for column in table.columns:
        if column.header not in ("consumer", "key_id", "route", "method", "day", "name", "tz"):
            column.justify = "right"
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    out.print(table if rows else f"{title}: nothing recorded")


FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
    show_default=True, help="table for people, json or csv for scripts.",
)  # fmt: skip


@cli.group()
def consumers() -> None:
    """The consumer registry: names and billing time zones."""


@consumers.command("set")
@click.argument("consumer")
@click.option("--name", help="Display name.")
@click.option("--tz", help="IANA billing time zone; a change takes effect next month.")
@click.option("--allow", help="Networks its keys may be used from, comma-separated ('' clears).")
@click.option("--deny", help="Networks its keys may never be used from ('' clears).")
@run_async
async def consumers_set(
    consumer: str, name: str | None, tz: str | None, allow: str | None, deny: str | None
) -> None:
    """Create or change a consumer (every worker sees a network change at once)."""
    async with _reader() as (redis, settings):
        updated = await ConsumerRegistry(redis, settings.keyspace()).set(
            consumer, name=name, tz=tz, allow=_list(allow), deny=_list(deny)
        )
    _emit([_consumer_row(updated)], "table", "consumer")


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


@consumers.command("show")
@click.argument("consumer")
@FORMAT
@run_async
async def consumers_show(consumer: str, fmt: str) -> None:
    """Show one consumer."""
    async with _reader() as (redis, settings):
        found = await ConsumerRegistry(redis, settings.keyspace()).get(consumer)
    if found is None:
        _fail(f"no consumer {consumer!r} (create it with `meterwall consumers set`)")
        return
    _emit([_consumer_row(found)], fmt, "consumer")


@consumers.command("list")
@FORMAT
@run_async
async def consumers_list(fmt: str) -> None:
    """List every registered consumer."""
    async with _reader() as (redis, settings):
        registry = await ConsumerRegistry(redis, settings.keyspace()).all()
    _emit([_consumer_row(c) for _, c in sorted(registry.items())], fmt, "consumers")


def _consumer_row(consumer: Consumer) -> dict[str, Any]:
    row: dict[str, Any] = {"consumer": consumer.id, "name": consumer.name, "tz": consumer.tz}
    row["next_tz"] = consumer.next_tz or None
    row["next_tz_from"] = (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(consumer.next_from))
        if consumer.next_tz
        else None
    )
    row["allow"], row["deny"] = ",".join(consumer.allow), ",".join(consumer.deny)
    return row


@cli.group(invoke_without_command=True)
@click.pass_context
@click.option("--consumer", help="One consumer; omit with --top to rank all consumers.")
@click.option("--period", help="A month (2026-11) or a day (2026-11-23), local.")
@click.option("--from", "first_day", help="First local day (YYYY-MM-DD), with --to.")
@click.option("--to", "last_day", help="Last local day (YYYY-MM-DD), inclusive.")
@click.option(
    "--by", default="route", show_default=True, help="Group by: key_id,route,method,status or ''."
)
@click.option("--granularity", type=click.Choice(["period", "day"]), default="period",
              show_default=True, help="day: one row per local day of the period.")  # fmt: skip
@click.option("--top", "top", type=click.IntRange(1, 10_000),
              help="Rank the N consumers with the most requests.")  # fmt: skip
@click.option("--tz", help="Another zone than the consumer's billing zone (from UTC buckets).")
@FORMAT
@run_async
async def usage(
    ctx: click.Context, consumer: str | None, period: str | None, first_day: str | None,
    last_day: str | None, by: str, granularity: str, top: int | None, tz: str | None, fmt: str,
) -> None:  # fmt: skip
    """Usage from the ledger, in each consumer's billing time zone."""
    if ctx.invoked_subcommand is not None:
        return
    if (first_day is None) != (last_day is None) or (first_day and period):
        _fail("give --period, or --from and --to")
        return
    if period is None and first_day is None:
        _fail("give --period YYYY-MM or YYYY-MM-DD, or --from and --to")
        return
    async with _reader() as (redis, settings):
        reader = UsageReader(
            redis, settings.keyspace(), retention_1h=settings.retention_1h,
            retention_15m=settings.retention_15m,
        )  # fmt: skip
        if top is not None:
            if period is None:
                _fail("--top needs --period")
                return
            with _late_progress("reading every consumer's usage", fmt == "table") as tick:
                rows = await reader.top(period, n=top, progress=tick)
        elif consumer is None:
            _fail("give --consumer C, or --top N to rank all consumers")
            return
        elif first_day is not None and last_day is not None:
            dims = [d.strip() for d in by.split(",") if d.strip()]
            rows = await reader.totals_between(consumer, first_day, last_day, dims)
            period = f"{first_day}..{last_day}"
        elif period is None:
            return  # unreachable: --period or --from/--to was checked above
        elif granularity == "day":
            rows = await reader.series(consumer, period)
        else:
            dims = [d.strip() for d in by.split(",") if d.strip()]
            if tz is not None:
                rows = await reader.totals_in_zone(consumer, period, tz, dims)
            else:
                rows = await reader.totals(consumer, period, dims)
    _emit(rows, fmt, f"usage {consumer or 'all consumers'} {period}")


@usage.command("close")
@click.option("--period", required=True, help="The month to close (YYYY-MM).")
@click.option("--grace", default="2h", show_default=True, help="Wait this long past the end.")
@run_async
async def usage_close(period: str, grace: str) -> None:
    """Freeze every consumer's month whose end (in its zone) is past the grace period."""
    grace_s = int(parse_duration("--grace", grace))
    async with _reader() as (redis, settings):
        report = await close_period(redis, settings.keyspace(), period, grace_s=grace_s)
    rows = [{"consumer": c, "state": "closed", "closable_from": None} for c in report.closed]
    rows += [{"consumer": c, "state": "already closed", "closable_from": None}
             for c in report.already_closed]  # fmt: skip
    rows += [{"consumer": c, "state": "not yet closable", "closable_from": at}
             for c, at in report.not_yet]  # fmt: skip
    _emit(rows, "table", f"close {period}")


@usage.command("adjustments")
@click.option("--period", required=True, help="A closed month (YYYY-MM).")
@FORMAT
@run_async
async def usage_adjustments(period: str, fmt: str) -> None:
    """Deltas that arrived for a month after it was closed (never merged silently)."""
    async with _reader() as (redis, settings):
        found = await adjustments(redis, settings.keyspace(), period)
    rows = []
    for consumer, fields in sorted(found.items()):
        for name, value in sorted(fields.items()):
            key_id, route, method, status, measure = name.split("\x1f")
            rows.append({"consumer": consumer, "key_id": key_id, "route": route, "method": method,
                         "status": int(status), "measure": measure, "delta": value})  # fmt: skip
    _emit(rows, fmt, f"adjustments {period}")


@cli.group(invoke_without_command=True)
@click.pass_context
@click.option("--sink", type=click.Choice(["webhook"]), default="webhook", show_default=True,
              help="Where the reports go.")  # fmt: skip
@click.option("--url", envvar="MW_WEBHOOK_URL", help="The endpoint (default: MW_WEBHOOK_URL).")
@click.option("--period", help="The month to export (YYYY-MM).")
@click.option("--secret-env", default="MW_WEBHOOK_SECRET", show_default=True,
              help="The variable holding the signing secret (never an argument).")  # fmt: skip
@click.option("--cloudevents", is_flag=True, help="Wrap each report in a CloudEvents envelope.")
@click.option("--running", is_flag=True,
              help="Running totals of months not yet closed (e.g. hourly) instead.")  # fmt: skip
@click.option("--allow-http", is_flag=True, help="Accept a plain http URL that is not loopback.")
@click.option("--attempts", type=click.IntRange(1, 20), default=5, show_default=True,
              help="Tries per report (backoff 0.5 s, doubling, with jitter).")  # fmt: skip
@FORMAT
@run_async
async def export(
    ctx: click.Context, sink: str, url: str | None, period: str | None, secret_env: str,
    cloudevents: bool, running: bool, allow_http: bool, attempts: int, fmt: str,
) -> None:  # fmt: skip
    """Push a month's closed usage to a billing endpoint; exit 1 if some delivery is pending."""
    if ctx.invoked_subcommand is not None:
        return
    from meterwall_webhook import WebhookExporter, WebhookSink, secret_from_env

    if not url:
        _fail("give --url (or set MW_WEBHOOK_URL)")
        return
    if not period:
        _fail("give --period YYYY-MM")
        return
    secret = secret_from_env(secret_env)
    target = WebhookSink(
        url, secret, cloudevents=cloudevents, attempts=attempts, allow_http=allow_http
    )
    async with _reader() as (redis, settings), target:
        rows = await WebhookExporter(redis, settings.keyspace(), target).export(
            period, running=running
        )
    _emit([row.public() for row in rows], fmt, f"export {period} to {sink}")
    pending = sum(row.state in ("pending", "invalid") for row in rows)
    if pending:
        click.echo(f"meterwall: {pending} delivery(ies) not done; `meterwall export` again "
                   "retries them (`meterwall export status` lists them)", err=True)  # fmt: skip
        sys.exit(1)


@export.command("status")
@click.option("--period", help="One month (YYYY-MM); default: every month with deliveries.")
@FORMAT
@run_async
async def export_status(period: str | None, fmt: str) -> None:
    """Webhook deliveries recorded in Redis: pending ones first, then delivered ones."""
    from meterwall_webhook import delivery_status

    async with _reader() as (redis, settings):
        rows = await delivery_status(redis, settings.keyspace(), period)
    _emit(rows, fmt, f"webhook deliveries {period or ''}".strip())


@cli.group(invoke_without_command=True)
@click.pass_context
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8477, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")  # fmt: skip
def admin(ctx: click.Context, host: str, port: int) -> None:
    """Serve the admin HTTP API (JSON; OpenAPI at /openapi.json)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from .admin import admin_app

    key = private_key_from(None) if os.environ.get("MW_RECORD_PRIVATE_KEY_FILE") else None
    app = admin_app(reader_settings(), private_key=key)
    # Bound here, so a port in use is one line (OSError), not uvicorn's log and exit code 3.
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"meterwall admin API on http://{host}:{port} (OpenAPI: /openapi.json)", err=True)
    if key is None:
        click.echo("security routes off: MW_RECORD_PRIVATE_KEY_FILE is not set", err=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


@admin.group()
def token() -> None:
    """Admin API tokens."""


@token.command("create")
@click.option("--role", type=click.Choice(["billing", "security", "admin"]), required=True)
@click.option("--name", required=True, help="Who or what uses the token (shown in audit logs).")
@run_async
async def token_create(role: str, name: str) -> None:
    """Create a token; it is printed once and only its hash is kept."""
    from .admin import AdminTokens

    async with _reader() as (redis, settings):
        created = await AdminTokens(redis, settings.keyspace()).create(name, role)  # type: ignore[arg-type]
    click.echo(created)


@cli.group()
def keys() -> None:
    """API keys: shown once at creation, stored only as a keyed hash."""


def _key_store(redis: Any, settings: Settings) -> KeyStore:
    return KeyStore.for_settings(redis, settings)


@keys.command("create")
@click.option("--consumer", required=True)
@click.option("--plan", default="")
@click.option("--scopes", default="", help="Comma list, e.g. items:read,items:write.")
@click.option("--cidr", "cidrs", multiple=True, help="Networks the key may be used from.")
@click.option("--expires", help="A date (2027-01-31) or a duration from now (90d).")
@click.option("--env", type=click.Choice(["live", "test"]), default="live", show_default=True)
@run_async
async def keys_create(
    consumer: str, plan: str, scopes: str, cidrs: tuple[str, ...], expires: str | None, env: str
) -> None:
    """Create a key. The key is printed once, on stdout; nothing can show it again."""
    check_consumer_id(consumer, setting="--consumer")
    async with _reader() as (redis, settings):
        meta, full = await _key_store(redis, settings).create(
            consumer, plan=plan, scopes=tuple(s for s in scopes.split(",") if s),
            cidrs=cidrs, expires=_expiry(expires), env=env,
        )  # fmt: skip
    click.echo(full)
    click.echo(f"# key id {meta.id} for {consumer}: store the key now, it is not kept", err=True)


def _expiry(text: str | None) -> int:
    if not text:
        return 0
    if text[:1].isdigit() and "-" in text:
        try:
            return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())
        except ValueError:
            raise ConfigurationError("--expires", f"not a date: {text!r}") from None
    return int(time.time() + parse_duration("--expires", text))


@keys.command("list")
@click.option("--consumer")
@FORMAT
@run_async
async def keys_list(consumer: str | None, fmt: str) -> None:
    """List keys (ids and metadata; never a secret)."""
    async with _reader() as (redis, settings):
        found = await _key_store(redis, settings).all(consumer)
    rows = [k.public() for k in found]
    if fmt != "json":
        rows = [{**row, "scopes": ",".join(row["scopes"]), "cidrs": ",".join(row["cidrs"])}
                for row in rows]  # fmt: skip
    _emit(rows, fmt, "API keys")


@keys.command("revoke")
@click.argument("key_id")
@run_async
async def keys_revoke(key_id: str) -> None:
    """Revoke a key; every worker stops accepting it within a second."""
    async with _reader() as (redis, settings):
        await _key_store(redis, settings).revoke(key_id)
    click.echo(f"revoked {key_id}")


@keys.command("rotate")
@click.argument("key_id")
@click.option("--grace", default="24h", show_default=True, help="How long the old secret works.")
@run_async
async def keys_rotate(key_id: str, grace: str) -> None:
    """Give a key a new secret (printed once); the old one works for the grace period."""
    grace_s = int(parse_duration("--grace", grace))
    async with _reader() as (redis, settings):
        _, full = await _key_store(redis, settings).rotate(key_id, grace_s)
    click.echo(full)


@contextlib.contextmanager
def _late_progress(what: str, show: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr that appears only once the work has taken over a second."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    started = time.monotonic()
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(),
                   console=Console(stderr=True), transient=True)  # fmt: skip
    task = None

    def tick(done: int, total: int) -> None:
        nonlocal task
        if not show or (task is None and time.monotonic() - started < 1.0):
            return
        if task is None:
            bar.start()
            task = bar.add_task(what, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield tick
    finally:
        if task is not None:
            bar.stop()


def private_key_from(path: Path | None) -> Any:
    """The reader side's private key: ``--private-key`` or ``MW_RECORD_PRIVATE_KEY_FILE``.

    App servers never have it, so a writer-side configuration cannot open or trace records.
    """
    from .sealing import load_private_key

    setting = "--private-key" if path is not None else "MW_RECORD_PRIVATE_KEY_FILE"
    if path is None:
        named = os.environ.get("MW_RECORD_PRIVATE_KEY_FILE", "").strip()
        if not named:
            raise ConfigurationError(
                "MW_RECORD_PRIVATE_KEY_FILE",
                "is not set: opening records needs the private key from `meterwall keygen` "
                "(the reader side's; app servers never hold it), or pass --private-key",
            )
        path = Path(named)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(setting, f"cannot read {path}: {exc.strerror}") from None
    return load_private_key(pem, setting=setting)


def _time_range(
    since: str | None, start: str | None, end: str | None
) -> tuple[int | None, int | None]:
    """(since_ns, until_ns) from ``--since 6h`` or ``--from``/``--to`` (ISO 8601, UTC default)."""
    if since and (start or end):
        raise ConfigurationError("--since", "give --since or --from/--to, not both")
    if since:
        return int((time.time() - parse_duration("--since", since)) * 1e9), None
    from .tracing import parse_instant

    return parse_instant("--from", start), parse_instant("--to", end)


def _iso_ms(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, UTC).isoformat(timespec="milliseconds")


@cli.command()
@click.option("--ip", help="An IP address (searched by its pseudonyms).")
@click.option(
    "--subnet", help="A network in CIDR form (/16 to /32 for IPv4, /40 to /128 for IPv6)."
)
@click.option("--consumer")
@click.option("--key-id")
@click.option("--route", help="Only this route template (e.g. /items/{id}).")
@click.option("--status", help="Only this status (429) or class (5xx).")
@click.option("--since", help="How far back, e.g. 6h (default: the whole retention window).")
@click.option("--from", "start", help="Start (ISO 8601, UTC unless an offset is given).")
@click.option("--to", "end", help="End (ISO 8601).")
@click.option("--private-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Default: MW_RECORD_PRIVATE_KEY_FILE.")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "json"]), default="table",
              show_default=True, help="table: a timeline; jsonl: every opened record.")  # fmt: skip
@run_async
async def trace(
    ip: str | None, subnet: str | None, consumer: str | None, key_id: str | None,
    route: str | None, status: str | None, since: str | None, start: str | None,
    end: str | None, private_key: Path | None, fmt: str,
) -> None:  # fmt: skip
    """What an IP, subnet, consumer or key did within the retention window (audited)."""
    from .tracing import TraceQuery, Tracer

    since_ns, until_ns = _time_range(since, start, end)
    query = TraceQuery(ip, subnet, consumer, key_id, route, status, since_ns, until_ns)
    query.check()
    key = private_key_from(private_key)
    async with _reader() as (redis, settings):
        found = await Tracer(redis, settings, key).trace(query)
    if fmt == "jsonl":
        for record in found.records:
            click.echo(orjson.dumps(record).decode())
        return
    if fmt == "json":
        document = {"query": found.query, "summary": found.summary(), "records": found.records}
        click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    rows = [{"time": _iso_ms(r["time_ns"]),
             "method": r["method"], "route": r["route"], "status": r["status"],
             "ms": r["duration_ms"], "consumer": r["consumer"], "key_id": r["key_id"],
             "decision": r["decision"]} for r in found.records]  # fmt: skip
    _emit(rows, "table", f"trace: {len(rows)} requests")
    summary = found.summary()
    click.echo(f"statuses {summary['statuses']}; routes {len(summary['routes'])}; "
               f"denials {summary['denials'] or 'none'}; busiest minute "
               f"{max(summary['requests_per_minute'].values(), default=0)} requests")  # fmt: skip


@cli.group()
def subject() -> None:
    """Data-subject requests: export, erase, restrict, unrestrict (all audited)."""


SUBJECT = [
    click.option("--ip", help="A client IP address (verify the requester controls it first)."),
    click.option("--consumer", help="A consumer id."),
]


def _subject_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(SUBJECT):
        func = option(func)
    return func


@subject.command("export")
@_subject_options
@click.option("--private-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Default: MW_RECORD_PRIVATE_KEY_FILE.")  # fmt: skip
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the bundle here (default: stdout).")  # fmt: skip
@run_async
async def subject_export(
    ip: str | None, consumer: str | None, private_key: Path | None, output: Path | None
) -> None:
    """A JSON bundle of every raw record about the subject (opened) and its receipt."""
    from .subjects import SubjectRights

    key = private_key_from(private_key)
    async with _reader() as (redis, settings):
        bundle = await SubjectRights(redis, settings, key).export(ip=ip, consumer=consumer)
    text = orjson.dumps(bundle, option=orjson.OPT_INDENT_2).decode()
    if output is None:
        click.echo(text)
        return
    await asyncio.to_thread(_write_private, output, text + "\n")
    click.echo(f"wrote {output}: {bundle['receipt']['records']} records", err=True)


def _write_private(path: Path, text: str) -> None:
    """Personal data goes to a file only its owner can read (mode 0600), also when the file
    existed already with a wider mode (``os.open`` applies the mode only when it creates)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


@subject.command("erase")
@_subject_options
@click.option("--aggregates", is_flag=True, help="A consumer's live usage aggregates too.")
@click.option("--closed-periods", is_flag=True, help="With --aggregates: closed months too.")
@run_async
async def subject_erase(
    ip: str | None, consumer: str | None, aggregates: bool, closed_periods: bool
) -> None:
    """Delete the subject's raw records and index entries now, and print a receipt."""
    from .subjects import SubjectRights

    async with _reader() as (redis, settings):
        receipt = await SubjectRights(redis, settings).erase(
            ip=ip, consumer=consumer, aggregates=aggregates, closed_periods=closed_periods
        )
    click.echo(orjson.dumps(receipt, option=orjson.OPT_INDENT_2).decode())


@subject.command("restrict")
@_subject_options
@run_async
async def subject_restrict(ip: str | None, consumer: str | None) -> None:
    """Keep no raw record of the subject from now on (counting goes on)."""
    from .subjects import SubjectRights

    async with _reader() as (redis, settings):
        name = await SubjectRights(redis, settings).restrict(ip=ip, consumer=consumer)
    click.echo(f"restricted {name} (every worker keeps no raw record of it within a second)")


@subject.command("unrestrict")
@_subject_options
@run_async
async def subject_unrestrict(ip: str | None, consumer: str | None) -> None:
    """Lift a restriction."""
    from .subjects import SubjectRights

    async with _reader() as (redis, settings):
        lifted = await SubjectRights(redis, settings).unrestrict(ip=ip, consumer=consumer)
    click.echo("restriction lifted" if lifted else "there was no such restriction")


@subject.command("list")
@FORMAT
@run_async
async def subject_list(fmt: str) -> None:
    """The restricted subjects (addresses as pseudonyms)."""
    from .subjects import SubjectRights

    async with _reader() as (redis, settings):
        rows = await SubjectRights(redis, settings).restricted()
    _emit(rows, fmt, "restricted subjects")


@cli.command("privacy-notice")
@click.option("--format", "fmt", type=click.Choice(["markdown", "html"]), default="markdown",
              show_default=True)  # fmt: skip
def privacy_notice(fmt: str) -> None:
    """The privacy notice that the app servers' MW_* settings enforce (run it with theirs)."""
    from .notice import render

    click.echo(render(Settings.from_env(), "html" if fmt == "html" else "markdown"))


@cli.group()
def plugins() -> None:
    """Installed plugins (entry point group meterwall.plugins); MW_PLUGINS activates them."""


@plugins.command("list")
@FORMAT
def plugins_list(fmt: str) -> None:
    """Every installed plugin, its kind and what it does. Installing one activates nothing."""
    from .plugins import describe

    _emit(describe(), fmt, "plugins")


@cli.command("audit-log")
@click.option("--since", help="How far back, e.g. 30d (default: everything kept).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)  # fmt: skip
@run_async
async def audit_log(since: str | None, fmt: str) -> None:
    """Every trace, export, erase and restrict: who, when, what, how many records opened."""
    from .auditlog import AuditLog

    since_s = time.time() - parse_duration("--since", since) if since else None
    async with _reader() as (redis, settings):
        entries = await AuditLog(redis, settings).entries(since_s)
    if fmt == "json":
        click.echo(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
        return
    rows = [{"at": datetime.fromtimestamp(e["at"], UTC).isoformat(timespec="seconds"),
             "actor": e["actor"], "action": e["action"],
             "query": orjson.dumps(e["query"]).decode(), "opened": e["opened"]}
            for e in entries]  # fmt: skip
    _emit(rows, "table", "audit log")


@contextlib.asynccontextmanager
async def _reader() -> AsyncIterator[tuple[Any, Settings]]:
    from .store import connect

    settings = reader_settings()
    redis = connect(settings)
    try:
        yield redis, await _as_deployed(redis, settings)
    finally:
        await redis.aclose()


async def _as_deployed(redis: Any, settings: Settings) -> Settings:
    """Readers use the shard count the deployment recorded, whatever this shell says."""
    from .store import stored_shards

    shards = await stored_shards(redis, settings.keyspace())
    return settings if shards is None else settings.replace(shards=shards)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except MeterwallError as exc:
        _fail(str(exc))
    except (RedisError, OSError) as exc:
        _fail(f"Redis: {exc}" if isinstance(exc, RedisError) else str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
