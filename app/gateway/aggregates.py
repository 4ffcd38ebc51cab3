"""A site's live aggregates over the last 30 minutes, from its events: pure counting, no I/O.

`SiteStats.add` takes each event (its JSON object, as viewers receive it) exactly once, in
offset order; `snapshot` answers the body of `GET /v1/sites/{site}/stats` and of `stats`
frames (docs/protocol.md, "Stats"). Events are bucketed by the minute of their server
timestamp; buckets older than the window are dropped.

What is counted: `events` (all), `pageviews` (name "pageview"), unique visitors per minute,
in the last 5 minutes (`visitors_now`) and in the window; per value, pageviews for pages, entry
pages (a visitor's first pageview in the window), sources (`utm_source` of the URL, else the
referrer's host, else "(direct)"; a link between the site's own pages is no source),
countries, devices, browsers and OS; events per goal (any other name) and per value of each
goal's props. Memory is bounded per minute: at most
MAX_VALUES distinct values per list (the rest count under "(other)"), MAX_PROP_ENTRIES goal
props (goal, prop, value) in all, and the visitor ids seen.

A `SiteStats` may count only the events matching filters (`page`, `source`, `country`,
`device`, `browser`, `os`: each the same label the lists count): the dashboard's "click a
value to filter the panels". Every offset still advances `offset`, matched or not.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from app.text import UNSHOWN

WINDOW_MINUTES = 30
NOW_MINUTES = 5
#: Entries per list in a snapshot.
TOP = 10
#: Distinct values kept per list per minute; more are counted as OTHER.
MAX_VALUES = 1000
OTHER = "(other)"
DIRECT = "(direct)"
UNKNOWN = "(unknown)"
#: Props names and values are counted by their text, cut to this many characters.
PROP_VALUE_CHARS = 100
#: Distinct (goal, prop, value) a minute counts, over all its goals. Past it, a new value of a
#: prop already counted that minute counts as OTHER, and a new prop is not counted: a visitor
#: inventing props cannot make a gateway hold more, or a stats frame grow (a test from
#: outside: 130 events of one goal, 30 new props each, made 1.2 MB frames).
MAX_PROP_ENTRIES = 1000
#: Distinct props a goal counts in a minute (an event carries at most 30): what a snapshot
#: merges per goal stays small. With both bounds, the worst a visitor can build costs a
#: snapshot ~50 ms here, against 1.3 s with 5,000 entries a minute and no bound per goal (an
#: outside test: a gateway's loop near saturation after 14 minutes of invented props).
MAX_GOAL_PROPS = 30

DIMENSIONS = ("pages", "entry_pages", "sources", "countries", "devices", "browsers", "os")
#: The filters a stats request may carry: query parameter -> the list its labels fill.
FILTERS = {
    "page": "pages",
    "source": "sources",
    "country": "countries",
    "device": "devices",
    "browser": "browsers",
    "os": "os",
}
#: The longest filter value accepted (a path, a source): the labels are cut shorter anyway.
MAX_FILTER_CHARS = 1000

#: A set of filters, in a canonical order: ((parameter, value), ...); () counts everything.
Filters = tuple[tuple[str, str], ...]


class BadFilter(ValueError):
    """A filter's value is refused; `field` names the query parameter."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def parse_filters(query: Mapping[str, str]) -> Filters:
    """The filters named in a query (`page`, `source`, ...); other parameters are ignored.
    Raises BadFilter for an empty or over-long value."""
    found: list[tuple[str, str]] = []
    for name in FILTERS:
        value = query.get(name)
        if value is None:
            continue
        if not value or len(value) > MAX_FILTER_CHARS:
            raise BadFilter(f"{name} must be 1 to {MAX_FILTER_CHARS} characters", name)
        found.append((name, value))
    return tuple(found)


class Minute:
    """The counts of one minute."""

    __slots__ = ("events", "goal_props", "goals", "lists", "pageviews", "prop_entries", "visitors")

    def __init__(self) -> None:
        self.events = 0
        self.pageviews = 0
        self.visitors: set[str] = set()
        self.lists: dict[str, Counter[str]] = {name: Counter() for name in DIMENSIONS}
        self.goals: Counter[str] = Counter()
        self.goal_props: dict[str, dict[str, Counter[str]]] = {}
        self.prop_entries = 0  # distinct (goal, prop, value) in goal_props


class SiteStats:
    def __init__(self, filters: Filters = ()) -> None:
        #: Only events whose labels match all of these are counted.
        self.filters = filters
        #: Minute key ("2026-11-29T21:07") -> its counts.
        self._minutes: dict[str, Minute] = {}
        #: Visitor -> the minute of its latest pageview (for entry pages).
        self._last_seen: dict[str, str] = {}
        #: The last offset counted.
        self.offset = 0
        #: False once a gap could not be recovered: some events are missing from the counts.
        self.complete = True

    def add(self, event: dict[str, Any], offset: int) -> None:
        """Count one event (offsets must come in order; an offset seen before is ignored)."""
        if offset <= self.offset:
            return
        self.offset = offset
        labels = _labels(event) if self.filters else None
        if labels is not None and any(labels[name] != value for name, value in self.filters):
            return
        key = str(event["ts"])[:16]
        minute = self._minutes.get(key)
        if minute is None:
            minute = self._minutes[key] = Minute()
        minute.events += 1
        visitor = str(event.get("visitor"))
        minute.visitors.add(visitor)
        name = str(event.get("name"))
        if name != "pageview":
            props = event.get("props")
            if _count(minute.goals, name) and props and isinstance(props, dict):
                _count_props(minute, name, props)
            return
        minute.pageviews += 1
        lists = minute.lists
        if labels is None:
            labels = _labels(event)
        for label, list_name in FILTERS.items():
            value = labels[label]
            if value is not None:
                _count(lists[list_name], value)
        previous = self._last_seen.get(visitor)
        if previous is None or previous < _window_start(key):
            _count(lists["entry_pages"], str(labels["page"]))
        self._last_seen[visitor] = key

    def snapshot(self, now: datetime) -> dict[str, Any]:
        """The aggregates of the 30 minutes up to `now` (UTC)."""
        keys = [
            (now - timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M")
            for i in range(WINDOW_MINUTES - 1, -1, -1)
        ]
        self._forget_before(keys[0])
        minutes = [self._minutes.get(k) for k in keys]
        present = [m for m in minutes if m is not None]
        recent = [m for m in minutes[-NOW_MINUTES:] if m is not None]
        goals: Counter[str] = Counter()
        for m in present:
            goals.update(m.goals)
        body: dict[str, Any] = {
            "window_minutes": WINDOW_MINUTES,
            "filters": dict(self.filters),
            "offset": self.offset,
            "complete": self.complete,
            "visitors_now": len(set().union(*(m.visitors for m in recent))),
            "visitors": len(set().union(*(m.visitors for m in present))),
            "pageviews": sum(m.pageviews for m in present),
            "events": sum(m.events for m in present),
            "per_minute": [
                {
                    "minute": f"{k}:00Z",
                    "visitors": len(m.visitors) if m else 0,
                    "pageviews": m.pageviews if m else 0,
                    "events": m.events if m else 0,
                }
                for k, m in zip(keys, minutes, strict=True)
            ],
        }
        for name in DIMENSIONS:
            total: Counter[str] = Counter()
            for m in present:
                total.update(m.lists[name])
            body[name] = _top(total)
        body["goals"] = [
            {**entry, "props": self._goal_props(present, entry["value"])} for entry in _top(goals)
        ]
        return body

    def _goal_props(self, minutes: list[Minute], goal: str) -> dict[str, list[dict[str, Any]]]:
        """The goal's TOP props by the events that carried them, each with its TOP values."""
        props: dict[str, Counter[str]] = {}
        for m in minutes:
            for prop, values in m.goal_props.get(goal, {}).items():
                props.setdefault(prop, Counter()).update(values)
        ranked = sorted(props.items(), key=lambda item: (-item[1].total(), item[0]))[:TOP]
        return {prop: _top(values) for prop, values in ranked}

    def _forget_before(self, first_key: str) -> None:
        old = [k for k in self._minutes if k < first_key]
        if not old:
            return
        for key in old:
            del self._minutes[key]
        self._last_seen = {v: k for v, k in self._last_seen.items() if k >= first_key}


@functools.lru_cache(maxsize=64)
def _window_start(key: str) -> str:
    """The first minute of the window that ends with minute `key`."""
    start = datetime.strptime(key, "%Y-%m-%dT%H:%M") - timedelta(minutes=WINDOW_MINUTES - 1)
    return start.strftime("%Y-%m-%dT%H:%M")


def _count(counter: Counter[str], value: str) -> bool:
    """Count `value`, or OTHER past MAX_VALUES distinct ones; whether it counted as itself."""
    if value in counter or len(counter) < MAX_VALUES:
        counter[value] += 1
        return True
    counter[OTHER] += 1
    return False


def _count_props(minute: Minute, goal: str, props: dict[str, Any]) -> None:
    kept = minute.goal_props.get(goal)
    for prop, value in props.items():
        name, text = str(prop)[:PROP_VALUE_CHARS], str(value)[:PROP_VALUE_CHARS]
        values = kept.get(name) if kept is not None else None
        if values is not None and text in values:
            values[text] += 1
        elif minute.prop_entries < MAX_PROP_ENTRIES and (
            values is not None or kept is None or len(kept) < MAX_GOAL_PROPS
        ):
            if kept is None:
                kept = minute.goal_props[goal] = {}
            if values is None:
                values = kept[name] = Counter()
            values[text] += 1
            minute.prop_entries += 1
        elif values is not None:
            values[OTHER] += 1  # at most one more entry per prop counted


def _labels(event: dict[str, Any]) -> dict[str, str | None]:
    """The value the lists count for each filter name: what a filter is compared with (None:
    not counted in that list, and no filter of it matches)."""
    return {
        "page": str(event.get("path")),
        "source": _source(event),
        "country": event.get("country") or UNKNOWN,
        "device": event.get("device") or UNKNOWN,
        "browser": event.get("browser") or UNKNOWN,
        "os": event.get("os") or UNKNOWN,
    }


def _source(event: dict[str, Any]) -> str | None:
    url = event.get("url")
    if isinstance(url, str) and "utm_source=" in url:
        found = parse_qs(urlsplit(url).query).get("utm_source")
        if found and found[0].strip():
            # Ingest refuses app.text's characters raw in a URL, but `utm_source` is decoded
            # here: `%E2%80%AEmoc.elgoog` showed as "google.com". The dashboard does the same.
            return UNSHOWN.sub("\ufffd", found[0].strip()[:PROP_VALUE_CHARS].lower())
    host = event.get("referrer_host")
    if host:
        return str(host)
    # A referrer without a host is one on the page's own host (ingest leaves it out): a visitor
    # moving between the site's pages, counted as no source rather than as "(direct)".
    return None if event.get("referrer") else DIRECT


def _top(counter: Counter[str]) -> list[dict[str, Any]]:
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    return [{"value": value, "count": count} for value, count in ranked]
