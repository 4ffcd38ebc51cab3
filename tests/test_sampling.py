"""A sampled stream (`sample=N`, app.gateway.sampling): at most N events a second, and
`sampled` notices that account for every event left out, on both transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from app.gateway.hub import EVENT, NOTICE, Item
from app.gateway.sampling import Sampler, parse_sample
from app.wire import parse_cursor
from tests.clients import SseViewer, WsViewer, post_batches
from tests.processes import AppProcess
from tests.support import FAST, eventually, token


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def events(first: int, count: int) -> list[Item]:
    return [(EVENT, offset, b"{}") for offset in range(first, first + count)]


async def test_the_sampler_keeps_n_a_second_and_accounts_for_the_rest() -> None:
    clock = Clock()
    sampler = Sampler("e", 4, clock)
    woken = asyncio.Event()
    kept: list[Item] = []
    kept += sampler.filter(events(1, 100), woken.set)  # a burst: one passes, 99 wait
    assert [o for k, o, _ in kept if k == EVENT] == [1]
    assert not any(k == NOTICE for k, _, _ in kept)  # the first notice waits a second...
    await asyncio.wait_for(woken.wait(), 2)  # ...and a timer asks for it when nothing else does
    clock.now += 1.0
    kept += sampler.filter([], woken.set)
    notice = kept[-1]
    assert notice[0] == NOTICE and notice[1] == 100  # the cursor moves to the last skipped
    for second in range(1, 6):  # 40 events a second for five seconds, 10 at a time
        for tenth in range(4):
            clock.now += 0.25
            kept += sampler.filter(events(101 + second * 40 + tenth * 10 - 40, 10), lambda: None)
    clock.now += 1.0
    kept += sampler.filter([], lambda: None)
    sent = [o for k, o, _ in kept if k == EVENT]
    skipped = [orjson.loads(p)["skipped"] for k, _, p in kept if k == NOTICE]
    assert len(sent) + sum(skipped) == 300  # every event: sent, or counted as skipped
    assert sent == sorted(set(sent))
    assert 1 + 4 * 5 - 2 <= len(sent) <= 1 + 4 * 5 + 2  # four a second, not 40
    sampler.close()


def test_a_bad_sample_is_refused() -> None:
    assert parse_sample(None) is None and parse_sample("5") == 5
    for bad in ("0", "-1", "1001", "2.5", "many"):
        with pytest.raises(ValueError, match="sample"):
            parse_sample(bad)


@pytest.fixture
def stack(spawn: Callable[..., AppProcess]) -> tuple[AppProcess, AppProcess]:
    return spawn("ingest", **FAST), spawn("gateway", **FAST)


async def test_sampled_viewers_get_a_few_events_and_an_exact_account(
    stack: tuple[AppProcess, AppProcess], site: str
) -> None:
    ingest, gateway = stack
    ws = await WsViewer.open(gateway.ws_url, site, token(site), "&sample=5")
    sse = await SseViewer.open(gateway.url, site, token(site), query={"sample": "5"})
    full = await WsViewer.open(gateway.ws_url, site, token(site))
    total = 1000
    try:
        for viewer in (ws, sse, full):
            await viewer.wait_notice("welcome")
        started = asyncio.get_running_loop().time()
        await post_batches(ingest.url, site, total)
        await full.wait_for(total, timeout=20)
        for viewer in (ws, sse):
            await eventually(lambda v=viewer: _reached(v) == total, timeout=10, what="accounted")
        elapsed = asyncio.get_running_loop().time() - started
        for viewer in (ws, sse):
            notices = [n for n in viewer.notices if n["type"] == "sampled"]
            assert len(viewer.events) + sum(n["skipped"] for n in notices) == total
            assert viewer.offsets == sorted(set(viewer.offsets))
            assert len(viewer.events) <= 5 * elapsed + 3, (len(viewer.events), elapsed)
            assert all(n["sample"] == 5 and n["rate"] > 0 for n in notices)
        assert sse.ids[-1] == f"{parse_cursor(sse.ids[-1])[0]}-{total}"  # Last-Event-ID: all
    finally:
        for viewer in (ws, sse, full):
            await viewer.close()


def _reached(viewer: WsViewer | SseViewer) -> int:
    """The viewer's resume position: its last event or the last `sampled` notice's cursor."""
    last = viewer.offsets[-1] if viewer.events else 0
    for n in viewer.notices:
        if n["type"] == "sampled":
            last = max(last, parse_cursor(n["through"])[1])
    return last


async def test_a_bad_sample_parameter_is_refused(
    stack: tuple[AppProcess, AppProcess], site: str
) -> None:
    _, gateway = stack
    sse = await SseViewer.open(gateway.url, site, token(site), query={"sample": "0"})
    await sse.close()
    assert sse.status == 400 and sse.notices[0]["error"]["field"] == "sample"
    ws = await WsViewer.open(gateway.ws_url, site, token(site), "&sample=lots")
    assert await ws.wait_closed() == 4502


async def test_a_sampled_replay_is_not_held_back(
    stack: tuple[AppProcess, AppProcess], site: str
) -> None:
    """A replay waits for the viewer's queue to drain; a sampled viewer's queue is drained
    even when all it held was left out, so a long replay goes at full speed, with no
    keep-alive ping for every empty take."""
    ingest, gateway = stack
    total = 4000
    await post_batches(ingest.url, site, total)
    ws = await WsViewer.open(gateway.ws_url, site, token(site), f"&sample=2&last={total}")
    query = {"sample": "2", "last": str(total)}
    sse = await SseViewer.open(gateway.url, site, token(site), query=query)
    try:
        for viewer in (ws, sse):
            await eventually(lambda v=viewer: _reached(v) == total, timeout=10, what="replayed")
            notices = [n for n in viewer.notices if n["type"] == "sampled"]
            assert len(viewer.events) + sum(n["skipped"] for n in notices) == total
        assert sse.comments == 0  # a ping only after 15 s of silence, not per empty take
    finally:
        await ws.close()
        await sse.close()
