"""The `sitewire` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
import click

from app.errors import InvalidSiteId, MigrationError, SettingsError
from app.settings import Settings
from app.store import migrate as migrations
from app.store.sites import SiteExists, create_site, list_sites

T = TypeVar("T")

#: A TCP port to listen on.
PORT = click.IntRange(1, 65535)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def _client_settings() -> Settings:
    """Settings for a command typed beside a running `sitewire run`: the variables not set
    come from that stack (workers/local.py), and the command says so."""
    from workers import local

    stack = local.fill_environ()
    if stack is not None:
        click.echo(f"using the local stack in {stack.data_dir} (sitewire run)", err=True)
    return _settings()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(f"database error: {exc}") from None


async def _with_connection(dsn: str, use: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    conn = await asyncpg.connect(dsn)
    try:
        return await use(conn)
    finally:
        await conn.close()


@click.group()
def main() -> None:
    """Sitewire: a real-time event pipeline for web analytics."""


@main.command()
def migrate() -> None:
    """Apply pending database migrations."""
    dsn = _require(_client_settings().database_url, "DATABASE_URL")

    try:
        applied = _run(migrations.migrate(dsn))
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"applied {len(applied)} migration(s)" + "".join(f"\n  {n}" for n in applied))


@main.group()
def sites() -> None:
    """Register and list sites."""


@sites.command("create")
@click.argument("site")
@click.option("--domain", "domains", multiple=True, help="Another host allowed to post events.")
def sites_create(site: str, domains: tuple[str, ...]) -> None:
    """Register SITE (a lowercase domain such as example.com)."""
    dsn = _require(_client_settings().database_url, "DATABASE_URL")

    try:
        created = _run(_with_connection(dsn, lambda conn: create_site(conn, site, domains)))
    except InvalidSiteId as exc:
        raise click.BadParameter(str(exc), param_hint="SITE") from None
    except SiteExists:
        raise click.ClickException(f"site {site!r} already exists") from None
    click.echo(f"created site {created.id} (epoch {created.epoch})")


@sites.command("list")
def sites_list() -> None:
    """List registered sites."""
    dsn = _require(_client_settings().database_url, "DATABASE_URL")

    for s in _run(_with_connection(dsn, list_sites)):
        extra = f"  domains={','.join(s.domains)}" if s.domains else ""
        click.echo(f"{s.id}  events={s.next_offset - 1}  created={s.created_at:%Y-%m-%d}{extra}")


@sites.command("stats")
@click.argument("site")
@click.option("--days", default=7, show_default=True, type=click.IntRange(1, 366))
def sites_stats(site: str, days: int) -> None:
    """Events stored and dropped (bots, automation) per UTC day for SITE."""
    from workers import report

    dsn = _require(_client_settings().database_url, "DATABASE_URL")
    found = _run(_with_connection(dsn, lambda conn: report.site_days(conn, site, days)))
    if found is None:
        raise click.ClickException(f"unknown site {site!r} (sitewire sites list shows them)")
    click.echo(found)


@sites.command("token")
@click.argument("site")
@click.option(
    "--ttl",
    default=3600,
    show_default=True,
    type=click.IntRange(1, 366 * 86400),
    help="Seconds until the token expires.",
)
def sites_token(site: str, ttl: int) -> None:
    """Print a viewer token for SITE, a registered site (signed with SITEWIRE_SECRET)."""
    from app import tokens
    from app.errors import unknown_site
    from app.store.sites import get_site, is_valid_site_id

    settings = _client_settings()
    secret = _require(settings.secret, "SITEWIRE_SECRET")
    dsn = _require(settings.database_url, "DATABASE_URL")
    if not is_valid_site_id(site):
        raise click.BadParameter(f"invalid site id {site!r}", param_hint="SITE")
    # The gateway refuses a viewer of a site that is not registered (unknown_site): a token
    # for one would only move the failure to the dashboard, where it is harder to read.
    if _run(_with_connection(dsn, lambda conn: get_site(conn, site))) is None:
        raise click.ClickException(
            f"{unknown_site(site).message}: register it first (sitewire sites create {site})"
        )
    click.echo(tokens.issue(secret, site, ttl))


#: How a command typed on a laptop gets what it lacks (workers/local.py finds a running stack).
LOCAL_HINT = "start `make run` (sitewire run) in this folder: commands typed beside it find it"


def _require(value: str | None, variable: str, hint: bool = True) -> str:
    """`value`, or a one-line error naming `variable` (with `hint`, how to get it locally)."""
    if not value:
        how = f"; set it, or {LOCAL_HINT}" if hint else ""
        raise click.ClickException(f"configuration error: {variable} is not set{how}")
    return value


def _serve_command(role: str, default_port: int) -> click.Command:
    @click.command(role, help=f"Run an {role} process." if role == "ingest" else f"Run a {role}.")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=default_port, show_default=True, type=PORT)
    @click.option("--reuse-port", is_flag=True, help="Share the port with other replicas.")
    @click.option(
        "--internal-port",
        type=PORT,
        help="Serve /metrics (and /healthz, /readyz) on this private port; off when unset.",
    )
    @click.option("--internal-host", default="127.0.0.1", show_default=True)
    def command(
        host: str, port: int, reuse_port: bool, internal_port: int | None, internal_host: str
    ) -> None:
        from workers.serve import serve

        settings = _settings()
        _require(settings.database_url, "DATABASE_URL", hint=False)
        _require(settings.redis_url, "REDIS_URL", hint=False)
        if role == "gateway":
            _require(settings.secret, "SITEWIRE_SECRET", hint=False)
        if internal_port == port:
            raise click.BadParameter("must differ from --port", param_hint="--internal-port")
        internal = (internal_host, internal_port) if internal_port is not None else None
        serve(
            "ingest" if role == "ingest" else "gateway", settings, host, port, reuse_port, internal
        )

    return command


main.add_command(_serve_command("ingest", 8000))
main.add_command(_serve_command("gateway", 8001))


@main.command(short_help="Run background jobs (partitions, retention, salts).")
@click.option("--once", is_flag=True, help="Run one pass and exit.")
@click.option(
    "--internal-port", type=PORT, help="Serve /metrics on this private port; off when unset."
)
@click.option("--internal-host", default="127.0.0.1", show_default=True)
def worker(once: bool, internal_port: int | None, internal_host: str) -> None:
    """Run background jobs: partitions made ahead, event retention, salt expiry."""
    from prometheus_client import CollectorRegistry, start_http_server

    from app import logs
    from workers import retention
    from workers.metrics import WorkerMetrics

    settings = _client_settings()  # beside `make run`, its PostgreSQL (which runs no worker)
    _require(settings.database_url, "DATABASE_URL")
    logs.configure("worker", settings.log_level, settings.log_format)
    metrics = None
    if internal_port is not None:
        registry = CollectorRegistry()
        metrics = WorkerMetrics(registry, settings.worker_interval_s)
        try:
            start_http_server(internal_port, addr=internal_host, registry=registry)
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve metrics on {internal_host}:{internal_port}: {exc.strerror}"
            ) from None
    if once:
        _run(retention.run(settings, once=True, metrics=metrics))
        return
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(retention.run(settings, metrics=metrics))


def _viewer_options(command: Callable[..., None]) -> Callable[..., None]:
    """--gateway and --token, as `tail` and `top` take them."""
    command = click.option("--token", help="Viewer token (default SITEWIRE_TOKEN).")(command)
    return click.option(
        "--gateway",
        "gateways",
        multiple=True,
        help="Gateway URL (repeatable; default SITEWIRE_GATEWAY, else the local stack's "
        "(sitewire run in this folder), else ws://127.0.0.1:8001).",
    )(command)


@main.command()
@click.argument("site")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--since", help="Resume after a cursor, or start a duration ago (10m, 2h).")
@click.option("--last", type=click.IntRange(0, 10_000), help="Start with the last N events.")
@click.option("--filter", "text_filter", help="Only events whose name or path contains this.")
@_viewer_options
def tail(
    site: str,
    as_json: bool,
    since: str | None,
    last: int | None,
    text_filter: str | None,
    gateways: tuple[str, ...],
    token: str | None,
) -> None:
    """Print SITE's live events; reconnects and resumes by itself. Ctrl-C to stop."""
    from app.client import StreamClient
    from workers import tail as tailing

    urls, token = _viewer(site, gateways, token)
    client = StreamClient(urls, site, token, lambda e: None, start=tailing.start_from(since, last))
    sys.exit(tailing.run(client, tailing.default_printer(as_json, text_filter)))


@main.command(short_help="Show SITE's live aggregates, redrawn every second.")
@click.argument("site")
@click.option("--json", "as_json", is_flag=True, help="One stats object (JSON) per update.")
@click.option(
    "--where",
    multiple=True,
    metavar="NAME=VALUE",
    help="Count only events with this page, source, country, device, browser or os "
    "(repeatable), e.g. --where page=/pricing.",
)
@_viewer_options
def top(
    site: str, as_json: bool, where: tuple[str, ...], gateways: tuple[str, ...], token: str | None
) -> None:
    """Show SITE's live aggregates (last 30 minutes), redrawn every second. Ctrl-C to stop."""
    from app.client import StreamClient
    from app.gateway.aggregates import FILTERS
    from workers import tail as tailing
    from workers.top import Top

    filters: dict[str, str] = {}
    for condition in where:
        name, sep, value = condition.partition("=")
        if not sep or name not in FILTERS or not value:
            names = ", ".join(FILTERS)
            raise click.BadParameter(f"NAME=VALUE with NAME one of {names}", param_hint="--where")
        filters[name] = value
    urls, token = _viewer(site, gateways, token)
    start = {"stats": "only", **filters}
    client = StreamClient(urls, site, token, lambda e: None, start=start)
    screen = Top(sys.stdout, sys.stderr, as_json, in_place=sys.stdout.isatty() and not as_json)
    sys.exit(tailing.run(client, screen))


def _viewer(site: str, gateways: tuple[str, ...], token: str | None) -> tuple[list[str], str]:
    """The gateway URLs and the viewer token of `sitewire tail` and `sitewire top`: from the
    options, else the client's own variables (SITEWIRE_GATEWAY, SITEWIRE_TOKEN), else a token
    made with SITEWIRE_SECRET (operators)."""
    from app import tokens
    from app.client import DEFAULT_GATEWAY, gateway_url, gateway_urls

    token = token or os.environ.get("SITEWIRE_TOKEN") or None
    # The local stack is looked for only when something is missing (and then it says so).
    settings = _settings() if token and gateways else _client_settings()
    if not token and settings.secret:
        token = tokens.issue(settings.secret, site, 12 * 3600)
    if not token:
        raise click.UsageError(
            f"a viewer token is needed: --token, SITEWIRE_TOKEN or SITEWIRE_SECRET; or {LOCAL_HINT}"
        )
    try:
        urls = [gateway_url(g) for g in gateways]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway") from None
    if not urls:
        try:
            urls = gateway_urls(os.environ.get("SITEWIRE_GATEWAY", DEFAULT_GATEWAY))
        except ValueError as exc:
            raise click.UsageError(f"SITEWIRE_GATEWAY {exc}") from None
    return urls, token


def _stack_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--data-dir", default=".sitewire", show_default=True,
                     help="Folder for embedded servers' data."),
        click.option("--ingest-port", default=8000, show_default=True, type=PORT),
        click.option("--gateway-port", default=8001, show_default=True, type=PORT),
        click.option("--ingests", default=1, show_default=True, type=click.IntRange(1, 16),
                     help="Ingest replicas sharing the ingest port."),
        click.option("--gateways", default=2, show_default=True, type=click.IntRange(1, 16),
                     help="Gateway replicas sharing the gateway port."),
        click.option("--demo/--no-demo", default=True, show_default=True,
                     help="A demo site with demo traffic, and a demo page with the tracker."),
        click.option("--demo-port", default=8002, show_default=True, type=PORT,
                     help="Port of the demo page (with --demo)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@main.command(short_help="Run everything locally: servers, replicas and a demo.")
@_stack_options
def up(
    data_dir: str,
    ingest_port: int,
    gateway_port: int,
    ingests: int,
    gateways: int,
    demo: bool,
    demo_port: int,
) -> None:
    """Run everything locally: servers (embedded unless configured), replicas, demo traffic
    and a demo page."""
    from workers.run import Stack

    ports = {"--ingest-port": ingest_port, "--gateway-port": gateway_port}
    if demo:
        ports["--demo-port"] = demo_port
    for name, port in ports.items():
        others = [n for n, p in ports.items() if p == port and n != name]
        if others:
            raise click.BadParameter(f"must differ from {others[0]} ({port})", param_hint=name)
    stack = Stack(
        _settings(), data_dir, ingest_port, gateway_port, demo, ingests, gateways, demo_port
    )
    stack.run()


@main.command()
@_stack_options
@click.pass_context
def run(ctx: click.Context, /, **options: Any) -> None:
    """Same as `up` (what `make run` calls)."""
    ctx.invoke(up, **options)


if __name__ == "__main__":
    sys.exit(main())
