"""`sitewire top SITE`: a site's live aggregates in the terminal, redrawn in place on each
`stats` frame (at most once a second), or one JSON object per update with --json. It streams
with `stats=only` (docs/protocol.md, "Stats"): one small frame a second whatever the site's
event rate."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any, TextIO

from workers.tail import json_line, printable

BARS = " ▁▂▃▄▅▆▇█"
#: Entries shown per list.
SHOWN = 5
PANELS = (
    ("Pages", "pages"), ("Sources", "sources"), ("Countries", "countries"),
    ("Devices", "devices"), ("Browsers", "browsers"), ("OS", "os"),
)  # fmt: skip


@dataclass
class Top:
    out: TextIO
    err: TextIO
    as_json: bool
    #: Redraw in place (a terminal); otherwise each update is printed after the last.
    in_place: bool
    updates: int = 0
    _notices: list[str] = field(default_factory=list)

    def event(self, event: dict[str, Any]) -> None:
        """Never called: the stream carries no events with stats=only."""

    def notice(self, notice: dict[str, Any]) -> None:
        if notice["type"] == "stats":
            self.stats(notice["stats"])
        elif notice["type"] == "gap" and notice.get("recovered") is False:
            self._notices.append("some events could not be recovered: counts may be low")

    def retry(self, url: str, why: str, delay: float) -> None:
        self.err.write(f"! {url}: {printable(why)}; trying again in {delay:.1f} s\n")
        self.err.flush()

    def stats(self, stats: dict[str, Any]) -> None:
        self.updates += 1
        if self.as_json:
            self.out.write(json_line(stats))
        else:
            self.out.write(("\x1b[H\x1b[2J" if self.in_place else "") + render(stats) + "\n")
        self.out.flush()


def render(stats: dict[str, Any], width: int | None = None) -> str:
    """The aggregates as text: totals, a sparkline of pageviews per minute, the top lists."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    lines = [
        f"{printable(stats['site'])}  last {stats['window_minutes']} min   "
        f"visitors now {stats['visitors_now']}   visitors {stats['visitors']}   "
        f"pageviews {stats['pageviews']}   events {stats['events']}",
        f"pageviews/min  {sparkline([m['pageviews'] for m in stats['per_minute']])}  now",
    ]
    if stats.get("filters"):
        where = ", ".join(f"{k} = {v}" for k, v in stats["filters"].items())
        lines.insert(1, f"only events where {printable(where)}")
    if not stats.get("complete", True):
        lines.append("(some events could not be recovered: counts may be low)")
    column = max(24, min(40, width // 3))
    blocks = [_block(title, stats.get(key, []), column) for title, key in PANELS]
    blocks.append(_block("Goals", stats.get("goals", []), column))
    per_row = max(1, width // (column + 2))
    for first in range(0, len(blocks), per_row):
        row = blocks[first : first + per_row]
        for i in range(max(len(b) for b in row)):
            cells = [(b[i] if i < len(b) else "").ljust(column) for b in row]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
    # Below the grid, as wide as the terminal: a column's width cut the values and their
    # counts ("Signup.plan: pro 23, tea" in 80 columns).
    lines += _goal_props(stats.get("goals", []), width)
    return "\n".join(lines).rstrip("\n")


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return BARS[0] * len(values)
    return "".join(BARS[round(v * (len(BARS) - 1) / top)] for v in values)


def _block(title: str, entries: list[dict[str, Any]], column: int) -> list[str]:
    lines = [title]
    for entry in entries[:SHOWN]:
        count = str(entry["count"])
        value = printable(str(entry["value"]))[: column - len(count) - 2]
        lines.append(f"{value.ljust(column - len(count) - 1)} {count}")
    return lines if entries else [title, "-"]


def _goal_props(goals: list[dict[str, Any]], width: int) -> list[str]:
    """A line per goal and prop: its three most used values, each with its count. A value
    too long for the line is cut to leave room for its count and those after it."""
    lines = []
    for goal in goals[:SHOWN]:
        for prop, values in goal.get("props", {}).items():
            head = f"{printable(goal['value'])}.{printable(prop)}: "
            counts = [f" {v['count']}" for v in values[:3]]
            room = max(8, (width - len(head) - sum(len(c) + 2 for c in counts)) // len(counts))
            shown = ", ".join(
                _cut(printable(str(v["value"])), room) + count
                for v, count in zip(values, counts, strict=False)
            )
            lines.append((head + shown)[:width])
    return lines


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: room - 1] + "…"
