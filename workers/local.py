"""Finding the local stack `sitewire run` / `sitewire up` started, so that the commands a
newcomer types next to it (`sitewire sites create`, `sites token`, `tail`, `top`, `migrate`,
`worker`) reach it without any variable set.

The stack writes `stack.json` (its servers' URLs and its gateway) in its data folder and holds
`stack.lock` there for its life. A command finds it only when that lock is held (the stack is
running), fills in only the variables that are not set, and says on stderr which stack it uses.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: Where `sitewire run` keeps its data unless told otherwise (--data-dir).
DATA_DIR = Path(".sitewire")
STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"


@dataclass(frozen=True)
class LocalStack:
    data_dir: Path
    database_url: str
    redis_url: str
    secret: str
    gateway: str

    def write(self) -> None:
        state = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "gateway": self.gateway,
        }
        path = self.data_dir / STATE_FILE
        path.write_text(json.dumps(state))
        path.chmod(0o600)

    def environ(self) -> dict[str, str]:
        """The variables a command needs to reach this stack."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "SITEWIRE_SECRET": self.secret,
            "SITEWIRE_GATEWAY": self.gateway,
        }


def find(data_dir: Path = DATA_DIR) -> LocalStack | None:
    """The running stack whose data folder is `data_dir`, or None."""
    state, lock = data_dir / STATE_FILE, data_dir / LOCK_FILE
    if not state.exists() or not lock.exists() or not _held(lock):
        return None
    try:
        saved = json.loads(state.read_text())
        secret = (data_dir / "secret").read_text().strip()
        return LocalStack(
            data_dir, saved["database_url"], saved["redis_url"], secret, saved["gateway"]
        )
    except (OSError, ValueError, KeyError):
        return None


def _held(lock: Path) -> bool:
    """Whether another process holds the stack's lock (the stack is running)."""
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def fill_environ(data_dir: Path = DATA_DIR) -> LocalStack | None:
    """Set the variables that are not set from the running local stack, if there is one, and
    only when neither server URL is set: a command pointed at some other PostgreSQL or Redis
    must never be given this stack's secret or the other server."""
    if os.environ.get("DATABASE_URL") or os.environ.get("REDIS_URL"):
        return None
    stack = find(data_dir)
    if stack is None:
        return None
    missing = {k: v for k, v in stack.environ().items() if not os.environ.get(k)}
    if not missing:
        return None
    os.environ.update(missing)
    return stack
