"""Validation of incoming events: bytes in, `EventIn` or `ApiError` out. No I/O.

The rules are the public contract (docs/ingest.md). Each failure names the offending field so
the tracking script's author can fix it; nothing here touches storage, so a rejected event can
never leave a row or a publication behind.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import orjson

from app.codes import ErrorCode
from app.errors import ApiError
from app.store.sites import is_valid_site_id
from app.text import UNSHOWN_CLASS

MAX_NAME_CHARS = 120
MAX_URL_BYTES = 2000
MAX_PROPS = 30
MAX_PROP_KEY_BYTES = 300
MAX_PROP_VALUE_BYTES = 2000
FIELDS = frozenset({"site", "name", "url", "referrer", "props", "id"})
ACCEPTED_MEDIA_TYPES = frozenset({"application/json", "text/plain"})

PropValue = str | int | float | bool

# One regex scan instead of a Python-level loop over every character (profiled: the URL
# checks were a third of validation).
#: C0 controls, DEL and C1 controls (U+009B is a terminal's CSI: it could spoof `tail`), and
#: the bidirectional embeddings, overrides and isolates: `/invoice\u202efdp.exe` shows as
#: `/invoiceexe.pdf` (an outside test spoofed a referrer host as google.com with one).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: For URLs also spaces, and every other invisible format character (app.text): a browser's
#: URL holds them percent-encoded, never raw.
_SPACE_OR_CONTROL = re.compile(rf"[\x20{UNSHOWN_CLASS}]")


# Not frozen: built once per event on the hot path (a frozen dataclass's __init__ costs twice
# as much). Nothing mutates it.
@dataclass(slots=True)
class EventIn:
    """A valid event as the client sent it (before enrichment)."""

    site: str
    name: str
    url: str
    path: str
    referrer: str | None
    referrer_host: str | None
    props: dict[str, PropValue]
    id: uuid.UUID | None


def check_media_type(content_type: str | None) -> None:
    """JSON may come as application/json or text/plain (the tracking script's choice, so
    browsers skip the CORS preflight)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in ACCEPTED_MEDIA_TYPES:
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be application/json or text/plain, not {media or 'missing'!r}",
        )


def check_content_encoding(encoding: str | None) -> None:
    """Bodies come as they are: a compressed one was read as text and refused as invalid JSON
    (a gzip body), or stored when it only claimed to be compressed (RFC 9110: 415)."""
    if _foreign_codings(encoding, ("", "identity")):
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {_shown(encoding)!r} is not accepted: send the body as it is",
        )


def check_transfer_encoding(encoding: str | None) -> None:
    """Only `chunked` is decoded (by the HTTP parser): a body sent `gzip, chunked` was read as
    text and refused as invalid JSON. RFC 9112 section 6.1: 501 for a coding not understood."""
    if _foreign_codings(encoding, ("", "chunked", "identity")):
        raise ApiError(
            ErrorCode.NOT_IMPLEMENTED,
            f"Transfer-Encoding {_shown(encoding)!r} is not supported: "
            "send the body chunked or as it is",
        )


def _foreign_codings(header: str | None, understood: tuple[str, ...]) -> bool:
    """Whether a coding list header (`gzip, chunked`) names one not in `understood`."""
    return any(c.strip() not in understood for c in (header or "").lower().split(","))


def _shown(header: str | None) -> str:
    return (header or "").strip()[:40]


def decode_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None


def parse_batch(doc: Any, max_events: int) -> list[Any]:
    """A batch is a JSON array of event objects."""
    if not isinstance(doc, list):
        raise ApiError(ErrorCode.INVALID_REQUEST, "a batch must be a JSON array of events")
    if not doc:
        raise ApiError(ErrorCode.INVALID_REQUEST, "a batch must hold at least one event")
    if len(doc) > max_events:
        raise ApiError(
            ErrorCode.TOO_LARGE, f"a batch holds at most {max_events} events, got {len(doc)}"
        )
    return doc


def validate(doc: Any) -> EventIn:
    """Check one decoded event object against every rule; raise ApiError naming the field."""
    if not isinstance(doc, dict):
        raise _invalid(None, "an event must be a JSON object")
    if not FIELDS.issuperset(doc):
        unknown = sorted(set(doc) - FIELDS)[0]
        raise _invalid(unknown, f"unknown field {unknown!r}")
    site = doc.get("site")
    if not isinstance(site, str):
        raise _invalid("site", "site is required and must be a string")
    if not is_valid_site_id(site):
        raise _invalid("site", "site must be a registered site id (a lowercase domain)")
    url, path, host = _url(doc.get("url"))
    referrer, referrer_host = _referrer(doc.get("referrer"))
    if referrer_host == host.removeprefix("www."):
        # A link between the site's own pages: where the visitor came from is not another
        # site, and the site's own host must not rank as its top source (docs/protocol.md).
        referrer_host = None
    return EventIn(
        site=site,
        name=_name(doc.get("name")),
        url=url,
        path=path,
        referrer=referrer,
        referrer_host=referrer_host,
        props=_props(doc.get("props")),
        id=_id(doc.get("id")),
    )


def _invalid(field: str | None, message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_EVENT, message, field)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid("name", "name is required and must be a non-empty string")
    if len(value) > MAX_NAME_CHARS:
        raise _invalid("name", f"name is at most {MAX_NAME_CHARS} characters")
    if _CONTROL.search(value):
        raise _invalid("name", "name must not contain control characters")
    return value


def _http_url(value: str, field: str) -> tuple[SplitResult, str]:
    """Return (parts, host) of an absolute http(s) URL or raise."""
    if len(value.encode()) > MAX_URL_BYTES:
        raise _invalid(field, f"{field} is at most {MAX_URL_BYTES} bytes")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise _invalid(field, f"{field} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise _invalid(field, f"{field} must be an absolute http(s) URL")
    if _SPACE_OR_CONTROL.search(value):
        raise _invalid(
            field, f"{field} must not contain spaces, control or invisible characters (encode them)"
        )
    return parts, host


def _url(value: Any) -> tuple[str, str, str]:
    """The URL, its path (with a hash route), and its host."""
    if not isinstance(value, str):
        raise _invalid("url", "url is required and must be a string")
    parts, host = _http_url(value, "url")
    path = parts.path or "/"
    if parts.fragment.startswith("/"):  # hash routing (#/page) is a page of its own
        path = f"{path}#{parts.fragment}"
    return value, path, host


def _referrer(value: Any) -> tuple[str | None, str | None]:
    if value is None or value == "":
        return None, None
    if not isinstance(value, str):
        raise _invalid("referrer", "referrer must be a string or null")
    _, host = _http_url(value, "referrer")
    return value, host.removeprefix("www.")


def _props(value: Any) -> dict[str, PropValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("props", "props must be a flat JSON object")
    if len(value) > MAX_PROPS:
        raise _invalid("props", f"props holds at most {MAX_PROPS} keys")
    for key, item in value.items():
        if not key or len(key.encode()) > MAX_PROP_KEY_BYTES:
            raise _invalid("props", f"a props key is 1 to {MAX_PROP_KEY_BYTES} bytes")
        if "\x00" in key:
            raise _invalid("props", "props keys must not contain NUL characters")
        if isinstance(item, str):
            if "\x00" in item:
                # PostgreSQL text and jsonb cannot hold NUL; one such value must not fail the
                # group commit it shares with other clients' events.
                raise _invalid(f"props.{key}", "props values must not contain NUL characters")
            size = len(item.encode())
        elif isinstance(item, bool | int | float):
            size = len(str(item))
        else:
            raise _invalid(f"props.{key}", "props values must be strings, numbers or booleans")
        if size > MAX_PROP_VALUE_BYTES:
            raise _invalid(f"props.{key}", f"a props value is at most {MAX_PROP_VALUE_BYTES} bytes")
    return dict(value)


def _id(value: Any) -> uuid.UUID | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid("id", "id must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise _invalid("id", "id must be a UUID string") from None
