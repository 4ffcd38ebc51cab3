"""Reading an event's offset without decoding it (the gateway's per-event hot path)."""

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.schema import NewEvent
from app.wire import (
    _EVENT_HEAD,
    event_offset,
    parse_cursor,
    parse_decimal,
    parse_whole,
    with_position,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=8,
)


def encoded(offset: int, props: dict[str, Any]) -> bytes:
    body = NewEvent(
        event_id=uuid.uuid4(),
        site="example.com",
        name="pageview",
        url="https://example.com/",
        path="/",
        referrer=None,
        referrer_host=None,
        props=props,
        visitor_id=42,
        device="desktop",
        browser="Firefox",
        os="Linux",
        country="NL",
        ts=datetime.now(UTC),
    ).body
    return with_position("9f8ba6a8", offset, body)


@given(st.integers(min_value=1, max_value=2**62), st.dictionaries(st.text(), JSON))
def test_offset_of_an_encoded_event(offset: int, props: dict[str, Any]) -> None:
    """Whatever the props hold (even an "offset" key of their own), the event's offset, read
    by the fast path (no JSON decoding)."""
    payload = encoded(offset, {**props, "offset": -1})
    if offset < 10**18:  # longer offsets (never reached) take the decoding path
        assert _EVENT_HEAD(payload) is not None
    assert event_offset(payload) == offset


def test_other_layouts_are_decoded_and_non_events_refused() -> None:
    assert event_offset(b'{"offset":7,"cursor":"9f8ba6a8-7"}') == 7
    assert event_offset(b'{"cursor":"9f8ba6a8-7","offset":7}') == 7  # offset last: no comma
    assert event_offset(b'{"cursor":"9f8ba6a8-7","offset":"7","x":1}') is None
    assert event_offset(orjson.dumps({"cursor": "a", "id": 1})) is None
    assert event_offset(b"not json") is None
    assert event_offset(b"[1, 2]") is None


def test_position_prepended_to_a_body_gives_the_documented_layout() -> None:
    """Ingest encodes the body while handling the request and prepends cursor and offset at
    commit: the result is the event object of docs/protocol.md, keys in order."""
    event = orjson.loads(encoded(42, {"plan": "pro", "n": 3}))
    assert list(event) == [
        "cursor", "offset", "id", "site", "name", "url", "path", "referrer", "referrer_host",
        "props", "visitor", "device", "browser", "os", "country", "ts",
    ]  # fmt: skip
    assert event["cursor"] == "9f8ba6a8-42"
    assert event["offset"] == 42
    assert event["props"] == {"plan": "pro", "n": 3}
    assert event["visitor"] == f"{42:016x}"
    assert event["ts"].endswith("Z") and event["country"] == "NL"


@pytest.mark.parametrize(
    "text", ["+5", "-5", "1_0", "\uff15", "\u0663", " 5", "5\n", "", "1e3", "0x10", "5.0"]
)
def test_whole_numbers_are_ascii_digits_only(text: str) -> None:
    """int() takes all of these; protocol.md's parameters are plain digits (an outside test
    had `last=+5`, a full-width 5 and `minutes=1_0` accepted)."""
    with pytest.raises(ValueError):
        parse_whole(text)


@pytest.mark.parametrize("text", ["1e3", "inf", "nan", "+1", "1_0", ".5", "5.", "\uff15"])
def test_decimals_are_plain_too(text: str) -> None:
    with pytest.raises(ValueError):
        parse_decimal(text)


def test_plain_numbers_and_cursors_parse() -> None:
    assert (parse_whole("0"), parse_whole("1000"), parse_decimal("0.5")) == (0, 1000, 0.5)
    assert parse_cursor("1a2b3c4d-42") == ("1a2b3c4d", 42)
    with pytest.raises(ValueError):
        parse_cursor("1a2b3c4d-42\n")  # `$` would have let a trailing newline through
