"""`sitewire tail SITE`: a site's live events in the terminal.

Readable by default (aligned columns, colour on a terminal), `--json` for one JSON object per
line. It reconnects and resumes by itself (app.client), prints a visible notice when a
recovery was incomplete, and exits cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TextIO

import orjson

from app.client import HandlerFailed, StreamClient, StreamClosed
from app.codes import CloseCode

COLOURS = {"name": "\033[36m", "dim": "\033[2m", "warn": "\033[33m", "reset": "\033[0m"}


@dataclass
class Printer:
    out: TextIO
    err: TextIO
    as_json: bool
    colour: bool
    filter: str | None = None
    printed: int = 0

    def _c(self, key: str, text: str) -> str:
        return f"{COLOURS[key]}{text}{COLOURS['reset']}" if self.colour else text

    def event(self, event: dict[str, Any]) -> None:
        if self.filter and not any(
            self.filter.lower() in str(event.get(k, "")).lower() for k in ("name", "path")
        ):
            return
        if self.as_json:
            self.out.write(json_line(event))
        else:
            when = datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).astimezone()
            name = f"{printable(event['name'])[:24]:<24}"
            self.out.write(
                f"{self._c('dim', when.strftime('%H:%M:%S'))}  "
                f"{self._c('name', name)}  "
                f"{printable(event['path'])[:40]:<40}  "
                f"{printable(event.get('referrer_host') or '-')[:24]:<24}  "
                f"{printable(event['device']):<7}  "
                f"{self._c('dim', printable(event['visitor'])[:8])}"
                f"{self._props(event.get('props'))}\n"
            )
        self.out.flush()
        self.printed += 1

    def _props(self, props: Any) -> str:
        """A custom event's props, after the columns: `  plan=pro seats=3` (cut at 80)."""
        if not isinstance(props, dict) or not props:
            return ""
        text = " ".join(f"{printable(str(k))}={printable(str(v))}" for k, v in props.items())
        return "  " + self._c("dim", text[:80] + ("…" if len(text) > 80 else ""))

    def notice(self, notice: dict[str, Any]) -> None:
        kind = notice["type"]
        if kind == "welcome":
            if notice.get("recovered") is False:
                self._warn(_RESUME_FAILED.get(notice.get("reason"), _RESUME_FAILED[None]))
            if notice.get("delivery") == "storage":
                self._warn(STORAGE_DELIVERY)
            return
        if kind == "gap" and notice.get("recovered") is False:
            self._warn(f"gap after {notice.get('after')}: some events may be missing")
        if kind == "delivery":
            self._warn(STORAGE_DELIVERY if notice.get("mode") == "storage" else LIVE_DELIVERY)

    def retry(self, url: str, why: str, delay: float) -> None:
        """A connection failed or the stream ended: say so, and when the next try is."""
        self._warn(f"{url}: {printable(why)}; trying again in {delay:.1f} s")

    def _warn(self, text: str) -> None:
        self.err.write(self._c("warn", f"! {text}") + "\n")
        self.err.flush()


#: Control characters (C0, DEL, C1): written raw, they would drive the terminal; and the
#: bidirectional overrides and isolates, which would reorder what follows on the line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with control characters shown as escapes: an event's fields come from the
    internet, and a terminal obeys what it prints (ingest refuses them; this is the second
    line of defence, for events stored before it did)."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


#: C1 controls and DEL: JSON may carry them raw, and a terminal may obey them (U+009B is CSI);
#: and the bidirectional overrides and isolates, which reorder the rest of the line.
_RAW_IN_JSON = re.compile(r"[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def json_line(event: dict[str, Any]) -> str:
    """One JSON object and a newline, with DEL, C1 controls and bidirectional overrides escaped
    (\\u009b) as C0 ones already are: the same JSON to a parser, nothing a terminal obeys."""
    text = orjson.dumps(event).decode()
    return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


STORAGE_DELIVERY = "the gateway lost Redis: events come from storage, up to ~1 s late"
LIVE_DELIVERY = "live again"


def start_from(since: str | None, last: int | None) -> dict[str, str]:
    """--since CURSOR or a duration like 10m / 2h / 30s; --last N."""
    if last is not None:
        return {"last": str(last)}
    if not since:
        return {}
    units = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}
    if since[-1:] in units and since[:-1].replace(".", "", 1).isdigit():
        # Plain decimals, as the gateway reads them: str() of 0.1 s in minutes is
        # 0.0016666666666666668 (19 decimals), and of smaller ones an exponent.
        minutes = f"{float(since[:-1]) * units[since[-1]]:.9f}".rstrip("0")
        return {"minutes": minutes + "0" if minutes.endswith(".") else minutes}
    return {"since": since}


class Output(Protocol):
    """Where a stream goes: `Printer` (sitewire tail) or `workers.top.Top` (sitewire top)."""

    err: TextIO

    def event(self, event: dict[str, Any]) -> None: ...

    def notice(self, notice: dict[str, Any]) -> None: ...

    def retry(self, url: str, why: str, delay: float) -> None: ...


#: What a resume that could not be complete means, by the welcome's `reason`
#: (docs/protocol.md): not every reason means that events were missed.
_RESUME_FAILED: dict[Any, str] = {
    "cursor_ahead": "that cursor is ahead of every stored event (never acknowledged, or lost "
    "when storage went back to an earlier point): following from the newest",
    "epoch_changed": "that cursor is from another offset sequence of this site: following "
    "from the newest",
    "expired": "resume incomplete (expired): retention removed some of the missed events",
    "storage_behind": "storage went back to an earlier point: some events printed before are "
    "gone, and the different events that took their offsets follow",
    None: "resume incomplete: some events may be missing",
}


def run(client: StreamClient, printer: Output) -> int:
    client.on_event = printer.event
    client.on_notice = printer.notice
    client.on_retry = printer.retry

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await client.run(stop)
        except StreamClosed as closed:
            fix = ""
            if closed.code == CloseCode.UNAUTHORIZED:
                fix = f"; a new token: sitewire sites token {client.site}"
            printer.err.write(f"sitewire: {closed.reason or 'closed'} (code {closed.code}){fix}\n")
            return 1
        except HandlerFailed as failed:
            if not isinstance(failed.__cause__, BrokenPipeError):
                raise
            # The reader went away (`| head`): stop quietly, and keep Python's own flush at
            # exit from failing on the same pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    return asyncio.run(main())


def default_printer(as_json: bool, text_filter: str | None) -> Printer:
    return Printer(sys.stdout, sys.stderr, as_json, sys.stdout.isatty(), text_filter)
