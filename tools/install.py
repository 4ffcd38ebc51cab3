"""`pip install ARGS...` with its progress in one line: what `make` runs to install the lock.

pip's own output is ~3 lines a package (and `--quiet` is silence for a minute or two, which
looks like a hang on a first `make run`). In a terminal this shows one line, rewritten in
place: the package pip is at, out of how many. Elsewhere (CI, a log file) it prints only the
summary. pip's warnings and errors pass through as they come; when pip fails, everything it
said is printed. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

#: The lines that begin one package's turn, and the name in them.
_STARTS = re.compile(r"^(?:Collecting|Processing|Requirement already satisfied:) (\S+)")


def _count(args: list[str]) -> int:
    """How many packages the requirement files (-r FILE) pin; 0 when unknown."""
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-r", "--requirement")]
    return sum(
        1
        for name in files
        for line in Path(name).read_text().splitlines()
        if re.match(r"^[A-Za-z0-9]", line)
    )


def _name(spec: str) -> str:
    """`charset-normalizer==3.5.3`, or a file `/path/annotated_types-0.8.0-py3-none-any.whl`
    (whose name ends at the first dash), → the package's name."""
    if spec.endswith((".whl", ".tar.gz", ".zip")):
        return Path(spec).name.split("-")[0]
    return re.split(r"[=<>!~;\[ ]", spec)[0]


class Status:
    """One line of progress on a terminal, rewritten in place; nothing elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if self.live:
            self.out.write("\r\x1b[K  " + text)
            self.out.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False


def main(args: list[str]) -> int:
    total, done = _count(args), 0
    status, said = Status(sys.stdout), []
    began = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", "pip", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as pip:
        assert pip.stdout is not None
        for line in pip.stdout:
            said.append(line)
            if line.startswith(("WARNING:", "ERROR:")):
                status.clear()
                sys.stdout.write(line)
            elif started := _STARTS.match(line):
                done += 1
                of = f"/{total}" if total else ""
                status.show(f"{done}{of} {_name(started.group(1))}")
            elif line.startswith("Installing collected packages"):
                status.show(f"unpacking {done} packages into place (the longest step)...")
    code = pip.returncode
    status.clear()
    if code != 0:
        sys.stdout.writelines(said)
        return code
    print(f"  {done} package{'' if done == 1 else 's'} ready in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # pip had the same Ctrl-C and has stopped: no traceback
        sys.exit(130)
