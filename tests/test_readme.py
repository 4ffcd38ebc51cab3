"""The README, followed literally by a newcomer (#19): from a fresh copy of the tree, with no
variable set and nothing installed, `make run` in the background; then, in a second shell,
every command of the README's "First ten minutes" block exactly as printed, the banner's
`tail` and `top` lines, the one-shot lines of its "Commands" block that apply beside a running
stack; the demo page in Chromium producing events that `tail` and the dashboard show; a second
stack refused at once; and Ctrl-C leaving no process and no error-level log line.

Slow (it installs the locked dependencies into the copy's own .venv: seconds from pip's cache,
a minute or two without) and it needs the README's own ports, 8000-8002, free.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.processes import ROOT
from tests.support import unavailable

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
DEMO_SITE = "demo.sitewire.dev"
PORTS = (8000, 8001, 8002)
DESKTOP_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
#: The lines of the "Commands" block that are run here; the others start servers of their own
#: on the stack's ports (`ingest`, `gateway`), run until stopped (`worker`, `tail`, `top`: the
#: same as the first block's), or register example.com a second time (`sites create`).
ONE_SHOT = ("sitewire migrate", "sitewire sites list", "sitewire sites token example.com")
#: Of the "Commands" block, the lines that must refuse beside a running stack, at once.
REFUSED = ("sitewire up --ingests 2 --gateways 3", "sitewire run")

if shutil.which(CHROMIUM) is None:
    unavailable("Chromium is not installed (apt-get install -y chromium)", module=True)
if shutil.which("make") is None:
    unavailable("make is not installed", module=True)

from playwright.sync_api import sync_playwright  # noqa: E402


@dataclass
class Shell:
    """A second terminal in the copy's folder: a newcomer's environment, nothing set."""

    folder: Path
    env: dict[str, str]

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command], cwd=self.folder, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self, command: str) -> subprocess.Popen[str]:
        """A command that runs until Ctrl-C, in its own process group (a foreground job)."""
        return subprocess.Popen(
            ["bash", "-c", command], cwd=self.folder, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The tree as a fresh clone has it: tracked and new files, nothing ignored (no .venv)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    folder = tmp_path / "sitewire"
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


@pytest.fixture
def newcomer(copy: Path) -> Shell:
    for port in PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                unavailable(f"port {port} is in use: the README's stack needs 8000-8002")
    keep = ("PATH", "HOME", "LANG", "TERM", "USER", "TMPDIR", "PIP_INDEX_URL", "PIP_FIND_LINKS")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PIP_")}
    path = [p for p in env.get("PATH", "").split(":") if ".venv" not in p]
    env["PATH"] = ":".join(path)
    return Shell(copy, env)


@pytest.fixture
def stack(newcomer: Shell) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`make run` as typed in a terminal (its own process group, so a Ctrl-C reaches what
    the terminal would reach), its output in a file."""
    log = newcomer.folder / "make-run.log"
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "run"], cwd=newcomer.folder, env=newcomer.env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield make, log
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        for pid in _processes_of(newcomer.folder):
            os.kill(pid, signal.SIGKILL)


def test_a_newcomer_follows_the_readme(
    newcomer: Shell, stack: tuple[subprocess.Popen[bytes], Path]
) -> None:
    make, log = stack
    banner = _wait_for_banner(make, log)
    readme = (newcomer.folder / "README.md").read_text()
    first = _block(readme, "## First ten minutes")
    assert first[0].startswith(". .venv/bin/activate")
    activate, commands = first[0].split("#")[0].strip(), first[1:]

    # A second stack beside this one: refused at once, in one clear line.
    for line in REFUSED:
        assert line in [_command(x) for x in _block(readme, "## Commands")]
        began = time.monotonic()
        refused = newcomer.run(f"{activate} && {line}")
        took = time.monotonic() - began
        assert refused.returncode == 1 and took < 2, (took, refused.stderr)
        assert "another local stack is running" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    # The first ten minutes, exactly as printed; `tail` runs while the demo page is used.
    tail: subprocess.Popen[str] | None = None
    for line in commands:
        command = _command(line)
        if "(Ctrl-C to stop)" in line:
            running = newcomer.start(f"{activate} && {command}")
            if " tail " in command:
                tail = running
                continue
            _stop_quietly(running, expect=DEMO_SITE if DEMO_SITE in command else "pageviews")
            continue
        done = _run_until(newcomer, f"{activate} && {command}", line)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    assert tail is not None

    # The banner's lines: the demo page, clicked in a real browser, reaches `tail` and the
    # dashboard; its own `tail` and `top` lines run as printed.
    demo = re.search(r"demo page (http://\S+)", banner)
    dashboard = re.search(r"dashboard (http://\S+)", banner)
    assert demo and dashboard, banner
    _click_around(demo[1], dashboard[1])
    tail_out = _stop_quietly(tail, expect="Signup")
    assert "/pricing" in tail_out and "Signup" in tail_out
    for name in ("tail", "top"):
        found = re.search(rf"^  {name} +(\S+ {name} .+)$", banner, re.M)
        assert found, banner
        shows = "pageview" if name == "tail" else DEMO_SITE  # events; the aggregates' title
        _stop_quietly(newcomer.start(found[1]), expect=shows)

    for line in _block(readme, "## Commands"):
        command = _command(line)
        if command in ONE_SHOT:
            done = newcomer.run(f"{activate} && {command}")
            assert done.returncode == 0, (command, done.stderr)

    # Ctrl-C, as at the terminal: everything stops, quietly.
    os.killpg(make.pid, signal.SIGINT)
    # make itself ends by the terminal's SIGINT, as it always does; `sitewire run` under it
    # stops cleanly (make would say "make: *** [run] Error" otherwise).
    assert make.wait(60) in (0, -signal.SIGINT), log.read_text()[-3000:]
    assert _processes_of(newcomer.folder) == []
    text = log.read_text()
    assert "Traceback" not in text and "make: ***" not in text, text[-3000:]
    levels = [orjson.loads(x)["level"] for x in text.splitlines() if x.startswith("{")]
    assert levels and not {"error", "critical"} & set(levels), text[-3000:]


def _wait_for_banner(make: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Press Ctrl-C to stop." in text:
            return text
        assert make.poll() is None, text[-3000:]
        time.sleep(0.5)
    raise AssertionError(log.read_text()[-3000:])


def _block(readme: str, heading: str) -> list[str]:
    """The lines of the first ```sh block after `heading`."""
    section = readme.split(heading, 1)[1]
    body = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def _command(line: str) -> str:
    """A README line without its comment (two spaces, then #)."""
    return line.split("  #")[0].strip()


def _run_until(shell: Shell, command: str, line: str) -> subprocess.CompletedProcess[str]:
    """Run a one-shot command; the README's comment says what its output shows, and a
    person reading it a moment later would see it (the drop counts are written each second)."""
    deadline = time.monotonic() + 10
    while True:
        done = shell.run(command)
        shown = done.stdout + done.stderr
        if "sites stats" not in command or re.search(r"bot 1\b", shown):
            break
        assert time.monotonic() < deadline, (line, shown)
        time.sleep(0.5)
    if "sites stats" in command:
        today = done.stdout.splitlines()[2].split()
        assert today[1] == "1", done.stdout  # stored 1: the first curl; the second dropped
    if command.startswith("curl") and "-A" in command:
        assert '"ok":true' in done.stdout and '"cursor"' in done.stdout, done.stdout
    elif command.startswith("curl"):
        assert '"dropped":"bot"' in done.stdout, done.stdout
    return done


def _stop_quietly(proc: subprocess.Popen[str], expect: str, timeout: float = 20) -> str:
    """Ctrl-C a streaming command once it has shown `expect`; it exits 0 and complains of
    nothing. Returns what it printed."""
    out: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and expect not in "".join(out) and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(10)
    reader.join(5)
    printed, errors = "".join(out), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert expect in printed, (expect, printed, errors)
    assert code == 0, (code, errors)
    assert "Traceback" not in errors and "Error" not in errors, errors
    return printed


def _click_around(demo: str, dashboard: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-blink-features=AutomationControlled"],  # a person's browser
        )  # fmt: skip
        try:
            watcher = browser.new_page()
            watcher.goto(dashboard)
            watcher.wait_for_selector("[data-testid=status][data-state=live]")
            visitor = browser.new_context(user_agent=DESKTOP_UA).new_page()
            visitor.goto(demo)
            visitor.click("nav a[href='/pricing']")
            visitor.click("[data-testid=signup]")
            visitor.wait_for_selector("[data-testid=sent]:has-text('Signup')")
            # The dashboard's log shows them (the demo traffic's own events come and go too).
            watcher.wait_for_function(
                "[...document.querySelectorAll('[data-testid=rows] tr')].some(r =>"
                " r.textContent.includes('Signup') && r.textContent.includes('/pricing'))",
                timeout=20_000,
            )
        finally:
            browser.close()


def _processes_of(folder: Path) -> list[int]:
    """Processes whose command line names the copy's folder (its .venv, its .sitewire)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(int(entry.name))
    return found
