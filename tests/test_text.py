"""The characters that do not show as themselves are one class (app.text), wherever a role
meets them: the dashboard's JavaScript copy is held to it here."""

import re

import pytest

from app.errors import ApiError
from app.ingest.events import validate
from app.text import UNSHOWN, UNSHOWN_CLASS
from tests.processes import ROOT


def test_the_dashboard_shows_the_same_characters_as_the_gateway() -> None:
    page = (ROOT / "app" / "static" / "dashboard.html").read_text()
    found = re.search(r"var UNSHOWN = /\[(.*)\]/g;", page)
    assert found is not None, "the dashboard's UNSHOWN class is gone or renamed"
    assert found.group(1) == UNSHOWN_CLASS


def test_the_class_covers_the_spoofing_characters() -> None:
    for char in ("\x00", "\x1b", "\x7f", "\x9b", "\xad", "\u200b", "\u202e", "\u2066", "\ufeff"):
        assert UNSHOWN.fullmatch(char), repr(char)
    for char in (" ", "a", "é", "\u00a0", "\u4e2d", "\U0001f600"):
        assert not UNSHOWN.fullmatch(char), repr(char)


@pytest.mark.parametrize("char", ["\x00", "\x9b", "\xad", "\u200b", "\u202e", "\ufeff", " "])
def test_ingest_refuses_them_raw_in_a_url(char: str) -> None:
    doc = {"site": "example.com", "name": "pageview", "url": f"https://example.com/a{char}b"}
    with pytest.raises(ApiError):
        validate(doc)
    assert validate({**doc, "url": "https://example.com/ab"}).path == "/ab"
