"""The validator, without I/O: every rule, plus a property-based fuzz."""

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.codes import ErrorCode
from app.errors import ApiError
from app.ingest.events import EventIn, check_media_type, decode_json, parse_batch, validate

GOOD = {"site": "example.com", "name": "pageview", "url": "https://example.com/a?b=1"}


def test_minimal_event() -> None:
    e = validate(GOOD)
    assert e.site == "example.com" and e.path == "/a" and e.props == {} and e.id is None


def test_full_event() -> None:
    e = validate(
        {
            **GOOD,
            "url": "https://example.com/#/settings",
            "referrer": "https://www.google.com/search?q=x",
            "props": {"plan": "pro", "seats": 3, "trial": False},
            "id": "0190a5b2-6e1f-7c3a-9b8e-3f2d1c0b9a87",
        }
    )
    assert e.path == "/#/settings"  # hash routing is its own page
    assert e.referrer_host == "google.com"
    assert e.props["seats"] == 3
    assert str(e.id) == "0190a5b2-6e1f-7c3a-9b8e-3f2d1c0b9a87"


@pytest.mark.parametrize(
    ("url", "referrer", "host"),
    [
        ("https://example.com/b", "https://example.com/a", None),  # the site's own page
        ("https://www.example.com/b", "https://EXAMPLE.com:443/a", None),  # www. and case aside
        ("https://example.com/b", "https://shop.example.com/a", "shop.example.com"),
        ("https://example.com/b", "https://example.com.evil.test/", "example.com.evil.test"),
    ],
)
def test_a_referrer_on_the_pages_own_host_has_no_host(
    url: str, referrer: str, host: str | None
) -> None:
    """A link between the site's own pages is not where the visitor came from: the referrer is
    kept as sent, its host left out, so no list ranks the site's own domain as a source."""
    e = validate({**GOOD, "url": url, "referrer": referrer})
    assert (e.referrer, e.referrer_host) == (referrer, host)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"site": None}, "site"),
        ({"site": 5}, "site"),
        ({"site": "Bad*Site"}, "site"),
        ({"name": ""}, "name"),
        ({"name": 7}, "name"),
        ({"name": "x" * 121}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"url": "/relative"}, "url"),
        ({"url": "ftp://example.com/"}, "url"),
        ({"url": "https://example.com/" + "a" * 2000}, "url"),
        ({"url": ["https://example.com/"]}, "url"),
        ({"url": "https://exa mple.com/"}, "url"),
        ({"url": "https://example.com/invoice\u202efdp.exe"}, "url"),
        ({"url": "https://example.com/a\u200bb"}, "url"),
        ({"referrer": "https://\u202emoc.elgoog/"}, "referrer"),
        ({"referrer": "https://example.com/\ufeff"}, "referrer"),
        ({"name": "Sign\u2067up"}, "name"),
        ({"referrer": 3}, "referrer"),
        ({"referrer": "javascript:alert(1)"}, "referrer"),
        ({"props": []}, "props"),
        ({"props": {f"k{i}": 1 for i in range(31)}}, "props"),
        ({"props": {"k" * 301: 1}}, "props"),
        ({"props": {"k": "v" * 2001}}, "props.k"),
        ({"props": {"k": {"nested": 1}}}, "props.k"),
        ({"props": {"k": None}}, "props.k"),
        ({"props": {"k": "a\x00"}}, "props.k"),
        ({"id": "not-a-uuid"}, "id"),
        ({"id": 12}, "id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_each_rule_names_its_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as info:
        validate({**GOOD, **change})
    assert info.value.code is ErrorCode.INVALID_EVENT
    assert info.value.field == field


def test_not_an_object() -> None:
    with pytest.raises(ApiError):
        validate(["pageview"])


@pytest.mark.parametrize("ct", ["application/json", "text/plain;charset=UTF-8", "TEXT/PLAIN"])
def test_accepted_media_types(ct: str) -> None:
    check_media_type(ct)


@pytest.mark.parametrize("ct", [None, "", "application/x-www-form-urlencoded", "text/html"])
def test_refused_media_types(ct: str | None) -> None:
    with pytest.raises(ApiError) as info:
        check_media_type(ct)
    assert info.value.code is ErrorCode.UNSUPPORTED_MEDIA_TYPE


def test_malformed_json() -> None:
    with pytest.raises(ApiError) as info:
        decode_json(b'{"site": ')
    assert info.value.code is ErrorCode.INVALID_JSON


def test_batch_shape() -> None:
    assert parse_batch([GOOD], 100) == [GOOD]
    for doc, code in (({}, ErrorCode.INVALID_REQUEST), ([], ErrorCode.INVALID_REQUEST)):
        with pytest.raises(ApiError) as info:
            parse_batch(doc, 100)
        assert info.value.code is code
    with pytest.raises(ApiError) as info:
        parse_batch([GOOD] * 101, 100)
    assert info.value.code is ErrorCode.TOO_LARGE


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    json_values,
    st.sampled_from(["example.com", "pageview", "https://example.com/x", "http://a.b/"]),
)
events = st.dictionaries(
    st.sampled_from(["site", "name", "url", "referrer", "props", "id", "other"]),
    field_values,
    max_size=7,
)


@settings(max_examples=400, deadline=None)
@given(events)
def test_fuzz_validator_accepts_or_names_a_reason(doc: dict[str, Any]) -> None:
    """Any JSON document either validates into something storable or raises ApiError with a
    400 code; never another exception (which would be a 500)."""
    try:
        event = validate(doc)
    except ApiError as exc:
        assert exc.code is ErrorCode.INVALID_EVENT and exc.message
        return
    assert isinstance(event, EventIn)
    for text in (event.site, event.name, event.url, event.path, event.referrer or ""):
        text.encode()  # storable as PostgreSQL text
        assert "\x00" not in text
    orjson.dumps(event.props)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoder_never_crashes(body: bytes) -> None:
    try:
        doc = decode_json(body)
    except ApiError as exc:
        assert exc.code is ErrorCode.INVALID_JSON
        return
    with contextlib.suppress(ApiError):
        validate(doc)


#: C0 and C1 controls and DEL: a terminal obeys them (U+009B starts an escape sequence); and
#: the bidirectional overrides and isolates, which reorder what is shown after them.
CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F)]]
CONTROLS += [chr(c) for c in range(0x2066, 0x206A)]


@settings(max_examples=400, deadline=None)
@given(
    st.text(st.characters(codec="utf-8") | st.sampled_from(CONTROLS), max_size=130),
    st.text(st.characters(codec="utf-8") | st.sampled_from(CONTROLS), max_size=60),
)
def test_fuzz_names_and_paths_of_any_unicode(name: str, path: str) -> None:
    """Arbitrary unicode in a name and in a URL's path: accepted as given, or refused with a
    reason; an accepted event never carries a control character to a terminal."""
    doc = {**GOOD, "name": name, "url": f"https://example.com/{path}"}
    try:
        event = validate(doc)
    except ApiError as exc:
        assert exc.code is ErrorCode.INVALID_EVENT and exc.field in ("name", "url")
        return
    assert event.name == name
    for text in (event.name, event.url, event.path):
        assert not any(c in CONTROLS for c in text), repr(text)


@pytest.mark.parametrize("bad", ["\x7f", "\x9b", "\x85", "\x1b[2J"])
def test_control_characters_in_a_name_are_refused(bad: str) -> None:
    with pytest.raises(ApiError) as info:
        validate({**GOOD, "name": f"Sign{bad}up"})
    assert info.value.field == "name"
