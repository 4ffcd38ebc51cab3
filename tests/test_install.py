"""tools/install.py: `make`'s pip install, with its progress on one line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tools import install


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("charset-normalizer==3.5.3", "charset-normalizer"),
        ("uvicorn[standard]==0.35.0", "uvicorn"),
        ("/opt/files/annotated_types-0.8.0-py3-none-any.whl", "annotated_types"),
    ],
)
def test_the_package_is_named_as_pip_names_it(spec: str, name: str) -> None:
    assert install._name(spec) == name


def test_the_total_is_what_the_requirement_files_pin(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# header\nclick==8.1.0 \\\n    --hash=sha256:00\n    # via sitewire\nanyio==4\n"
    )
    assert install._count(["install", "--require-hashes", "-r", str(lock)]) == 2
    assert install._count(["install", "click"]) == 0


def test_without_a_terminal_only_the_summary_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("click\n")  # installed already: pip only checks it
    assert install.main(["install", "--no-index", "-r", str(requirements)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("  1 package ready in ") and out.count("\n") == 1, out


def test_a_failure_shows_all_pip_said(capsys: pytest.CaptureFixture[str]) -> None:
    assert install.main(["install", "--no-index", "sitewire-no-such-package"]) != 0
    assert "sitewire-no-such-package" in capsys.readouterr().out


def test_a_terminal_sees_one_line_rewritten() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    status = install.Status(screen)
    status.show("1/2 click")
    status.show("2/2 anyio")
    status.clear()
    assert screen.getvalue() == "\r\x1b[K  1/2 click\r\x1b[K  2/2 anyio\r\x1b[K"
