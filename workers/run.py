"""`sitewire run`: the whole system on one machine, embedded servers by default.

Starts PostgreSQL and Redis (embedded unless DATABASE_URL / REDIS_URL are set), migrates,
registers a demo site, starts an ingest and a gateway process, optionally sends demo traffic,
and on Ctrl-C, SIGTERM or SIGHUP stops everything it started: those processes first, the
servers last.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import asyncpg

from app import logs, tokens
from app.servers.postgres import with_database
from app.settings import Settings
from app.store.migrate import migrate
from app.store.sites import SiteExists, create_site
from workers.demo import DemoPage
from workers.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    MissingLocalExtra,
    free_ports,
    stop_with_parent,
)
from workers.local import LOCK_FILE, STATE_FILE, LocalStack

try:
    import httpx  # the `local` extra, as are the embedded servers: not in the production image
except ModuleNotFoundError as exc:
    raise MissingLocalExtra(exc) from exc

DEMO_SITE = "demo.sitewire.dev"
#: Hosts the demo page is served from: the demo site accepts events from them.
DEMO_ORIGINS = ("127.0.0.1", "localhost")
DEMO_PATHS = ("/", "/pricing", "/blog/launch", "/docs", "/docs/api", "/signup")
DEMO_REFERRERS = (None, "https://news.ycombinator.com/", "https://www.google.com/", None)


class Stack:
    def __init__(
        self,
        settings: Settings,
        data_dir: str,
        ingest_port: int,
        gateway_port: int,
        demo: bool,
        ingests: int = 1,
        gateways: int = 1,
        demo_port: int = 8002,
    ) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir).resolve()
        self.ingest_port = ingest_port
        self.gateway_port = gateway_port
        self.demo = demo
        #: The demo page's port (with `demo`): a shop with the tracker installed (workers/demo.py).
        self.demo_port = demo_port
        self._demo_page: DemoPage | None = None
        self.replicas = {"ingest": ingests, "gateway": gateways}
        self._stoppers: list[EmbeddedPostgres | EmbeddedRedis] = []
        self._children: list[subprocess.Popen[bytes]] = []
        #: Held for the stack's life: one stack per data folder.
        self._lock: TextIO | None = None
        #: Each replica's private metrics port (app/web/health.py), by role.
        self.internal_ports: dict[str, list[int]] = {"ingest": [], "gateway": []}

    def run(self) -> None:
        # SIGTERM, and SIGHUP (the terminal closed), stop the stack the way Ctrl-C does. And
        # Ctrl-C itself, whatever was inherited: a shell script's `make run &` starts it with
        # SIGINT ignored, and Python then leaves it so (`kill -INT` did nothing).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        self._claim()  # before anything starts: one clear line if this stack is already up
        try:
            env = self._prepare()
            self._start_children(env)
            self._wait_ready()
            token = tokens.issue(env["SITEWIRE_SECRET"], DEMO_SITE, 7 * 86400)
            if self.demo:
                self._start_demo_page(token)
            self._banner(token)
            asyncio.run(self._idle())
        except KeyboardInterrupt:
            print("\nstopping...", flush=True)
        finally:
            self._stop()

    def _claim(self) -> None:
        """Refuse at once, with one line, when the data folder is another stack's (a lock held
        for this process's life) or a port is taken; nothing has been started yet."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = (self.data_dir / LOCK_FILE).open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"sitewire: another local stack is running on {self.data_dir}; stop it first "
                "(Ctrl-C where it runs), or use --data-dir for a second one"
            ) from None
        ports = [("--ingest-port", self.ingest_port), ("--gateway-port", self.gateway_port)]
        if self.demo:
            ports.append(("--demo-port", self.demo_port))
        for name, port in ports:
            if not _port_free(port):
                raise SystemExit(
                    f"sitewire: port {port} is in use; stop what holds it, or choose {name}"
                )

    def _prepare(self) -> dict[str, str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        database_url = self.settings.database_url
        if database_url is None:
            print(f"starting embedded PostgreSQL in {self.data_dir / 'postgres'}", flush=True)
            pg = EmbeddedPostgres(self.data_dir / "postgres")
            self._stoppers.append(pg)
            database_url = asyncio.run(_ensure_database(pg.dsn(), "sitewire"))
        redis_url = self.settings.redis_url
        if redis_url is None:
            print(f"starting embedded Redis in {self.data_dir / 'redis'}", flush=True)
            rd = EmbeddedRedis(self.data_dir / "redis")
            self._stoppers.append(rd)
            redis_url = rd.url
        secret = self.settings.secret or self._stored_secret()
        try:
            asyncio.run(_migrate_and_seed(database_url, self.demo))
        except (OSError, asyncpg.PostgresError) as exc:
            raise SystemExit(f"sitewire: cannot prepare the database: {exc}") from None
        env = dict(os.environ)
        env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, SITEWIRE_SECRET=secret)
        # The children write to this process's stderr, so what `auto` means is decided here,
        # once, for all of them: text for the person at this terminal, JSON into a pipe.
        env.update(SITEWIRE_LOG_FORMAT=logs.resolve(self.settings.log_format, sys.stderr))
        # Lets the commands typed beside this stack find it (workers/local.py).
        gateway = f"http://127.0.0.1:{self.gateway_port}"
        LocalStack(self.data_dir, database_url, redis_url, secret, gateway).write()
        return env

    def _stored_secret(self) -> str:
        path = self.data_dir / "secret"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def _start_children(self, env: dict[str, str]) -> None:
        # Metrics are per process: one private port each, all different.
        internals = iter(free_ports(sum(self.replicas.values())))
        for role, port in (("ingest", self.ingest_port), ("gateway", self.gateway_port)):
            cmd = [sys.executable, "-m", "workers.cli", role, "--port", str(port)]
            if self.replicas[role] > 1:
                cmd.append("--reuse-port")  # the kernel spreads connections over replicas
            for _ in range(self.replicas[role]):
                internal = next(internals)
                self.internal_ports[role].append(internal)
                replica = [*cmd, "--internal-port", str(internal)]
                # Its own session: a Ctrl-C at the terminal signals the whole foreground
                # process group at once, and only this process must get it, to stop the
                # children in order (_stop; docs/decisions.md).
                # And it stops when this process dies without stopping it (kill -9).
                child = subprocess.Popen(
                    replica, env=env, start_new_session=True, preexec_fn=stop_with_parent()
                )
                self._children.append(child)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        """Every replica ready, each asked on its own private port: replicas share a public
        port, where the first one up would answer for all (and the banner came before a slower
        replica's start-up lines)."""
        deadline = time.monotonic() + timeout
        for port in [*self.internal_ports["ingest"], *self.internal_ports["gateway"]]:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                exited = [c for c in self._children if c.poll() is not None]
                if exited:
                    # The children write to this process's stderr: their reason is just above.
                    raise SystemExit(
                        f"sitewire: a Sitewire process (pid {exited[0].pid}) exited during "
                        "start-up; its error is in the lines above"
                    )
                if time.monotonic() > deadline:
                    raise SystemExit(f"process on port {port} did not become ready")
                time.sleep(0.2)

    def _start_demo_page(self, token: str) -> None:
        g = self.gateway_port
        self._demo_page = DemoPage(
            self.demo_port,
            DEMO_SITE,
            ingest=f"http://127.0.0.1:{self.ingest_port}",
            dashboard=f"http://127.0.0.1:{g}/dashboard/{DEMO_SITE}?token={token}",
            tail=f"{_sitewire()} tail {DEMO_SITE}",
        )
        self._demo_page.start()

    def _banner(self, token: str) -> None:
        i, g = self.ingest_port, self.gateway_port
        print(
            "\nSitewire is running.\n"
            f"  ingest    http://127.0.0.1:{i}  (POST /api/event, /script.js)\n"
            f"  gateway   http://127.0.0.1:{g}  (/v1/sites/SITE/stream, /events, /history)\n"
            f"  replicas  {self.replicas['ingest']} ingest, {self.replicas['gateway']} gateway "
            "(each role shares one port: SO_REUSEPORT)\n"
            f"  metrics   {self._metrics_urls()}\n"
            + (self._demo_lines(token) if self.demo else "")
            + "\nPress Ctrl-C to stop.\n",
            flush=True,
        )

    def _demo_lines(self, token: str) -> str:
        """The demo site's page, dashboard, tail and top (with `--no-demo` there is none: the
        banner printed them all the same, for a site never registered)."""
        g = self.gateway_port
        demo_page = (
            f"  demo page {self._demo_page.url}  (a shop with the tracker: click around)\n"
            if self._demo_page
            else ""
        )
        return (
            f"  demo site {DEMO_SITE} receiving demo traffic\n"
            f"\n{demo_page}"
            f"  dashboard http://127.0.0.1:{g}/dashboard/{DEMO_SITE}?token={token}\n"
            f"  tail      {_sitewire()} tail {DEMO_SITE} --gateway http://127.0.0.1:{g} "
            f"--token {token}\n"
            f"  top       {_sitewire()} top {DEMO_SITE} --gateway http://127.0.0.1:{g} "
            f"--token {token}\n"
        )

    def _metrics_urls(self) -> str:
        """Each replica's /metrics, on its private port (not the role's public one)."""
        return ", ".join(
            f"{role} http://127.0.0.1:{port}/metrics"
            for role, ports in self.internal_ports.items()
            for port in ports
        )

    async def _idle(self) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.ingest_port}") as client:
            while all(c.poll() is None for c in self._children):
                if self.demo:
                    await _send_demo_event(client)
                await asyncio.sleep(random.uniform(0.2, 1.0))
        raise SystemExit("a Sitewire process exited; stopping the rest")

    def _stop(self) -> None:
        """Stop in order: ingests and gateways first (each drains on SIGTERM, in parallel),
        then the servers they use, so that none of them sees its Redis or PostgreSQL vanish
        while it still serves. A second Ctrl-C skips the drains, never the servers' stop."""
        if self._demo_page is not None:
            self._demo_page.stop()
        try:
            self._stop_children()
        except KeyboardInterrupt:
            self._kill_children()
        # What is left is short (a few seconds at most) and must not be cut in half: a
        # server killed midway is what the next `sitewire run` would trip over.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for server in reversed(self._stoppers):
            server.stop()
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)

    def _stop_children(self, timeout: float = 15.0) -> None:
        for child in self._children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + timeout
        for child in self._children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _kill_children(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
        for child in self._children:
            child.wait()


def _sitewire() -> str:
    """The `sitewire` command as this shell can run it: plain `sitewire` when it is on the
    PATH, else the virtualenv's script (relative to here when it is below this folder)."""
    script = Path(sys.executable).with_name("sitewire")
    found = shutil.which("sitewire")
    if found is not None and Path(found).resolve() == script.resolve():
        return "sitewire"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _port_free(port: int) -> bool:
    """Whether nothing listens on `port` (a connection still in TIME_WAIT does not count, as
    the servers themselves bind with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _ensure_database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def _migrate_and_seed(dsn: str, demo: bool) -> None:
    await migrate(dsn)
    if demo:
        conn = await asyncpg.connect(dsn)
        try:
            with contextlib.suppress(SiteExists):
                await create_site(conn, DEMO_SITE, DEMO_ORIGINS)
            # A demo site made by an older version lacks the demo page's origins.
            await conn.execute(
                "UPDATE sites SET domains = $2 WHERE id = $1 AND NOT domains @> $2",
                DEMO_SITE,
                list(DEMO_ORIGINS),
            )
        finally:
            await conn.close()


#: The demo traffic's browsers: each is a visitor of its own (the visitor id hashes the
#: User-Agent with the address, and every demo event comes from 127.0.0.1).
DEMO_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/129.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.6 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/129.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.6 Mobile/15E148 Safari/604.1",
)


async def _send_demo_event(client: httpx.AsyncClient) -> None:
    event: dict[str, object] = {
        "site": DEMO_SITE,
        "name": "pageview",
        "url": f"https://{DEMO_SITE}{random.choice(DEMO_PATHS)}",
        "referrer": random.choice(DEMO_REFERRERS),
    }
    if random.random() < 0.1:  # the demo page's own goal: the same name and props
        event.update(name="Signup", props={"plan": random.choice(("pro", "team"))})
    headers = {"User-Agent": random.choice(DEMO_AGENTS)}
    with contextlib.suppress(httpx.HTTPError):
        await client.post("/api/event", json=event, headers=headers)
