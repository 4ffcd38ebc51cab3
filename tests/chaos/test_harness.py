"""The chaos harness's own checks catch what they are meant to catch (no servers needed)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.client import StreamClient
from tests.chaos.harness import Post, Viewer, check_storage, check_viewers, post_path
from tests.chaos.proxy import PausableProxy
from tests.chaos.report import HEADER, ScenarioResult, percentile

EPOCH = "0badcafe"


def acked(index: int, offset: int, epoch: str = EPOCH) -> Post:
    return Post(index, index % 2, status=202, cursor=f"{epoch}-{offset}")


def failed(index: int, status: int | None = 503) -> Post:
    return Post(index, index % 2, status=status, error="" if status else "ConnectError")


def storage(posts: list[Post], rows: list[tuple[int, str]]) -> ScenarioResult:
    result = ScenarioResult("test", "quick")
    check_storage(result, posts, rows, EPOCH)
    return result


def test_a_clean_run_is_exactly_once() -> None:
    posts = [acked(0, 1), failed(1), acked(2, 2), failed(3, None)]
    rows = [(1, post_path(0)), (2, post_path(2))]
    result = storage(posts, rows)
    assert result.stored_exactly_once, result.storage_problems
    assert (result.acked, result.failed_posts, result.stored_unacked) == (2, 2, 0)
    assert result.failure_kinds == {"503": 1, "ConnectError": 1}


def test_a_failed_post_that_was_stored_anyway_is_counted_not_blamed() -> None:
    posts = [acked(0, 1), failed(1, None), acked(2, 3)]
    rows = [(1, post_path(0)), (2, post_path(1)), (3, post_path(2))]
    result = storage(posts, rows)
    assert result.stored_exactly_once, result.storage_problems
    assert result.stored_unacked == 1


@pytest.mark.parametrize(
    ("posts", "rows", "problem"),
    [
        ([acked(0, 1), acked(1, 2)], [(1, post_path(0))], "acked but not stored"),
        ([acked(0, 1)], [(1, post_path(0)), (2, post_path(0))], "stored more than once"),
        ([acked(0, 1), acked(1, 2)], [(1, post_path(1)), (2, post_path(0))], "another post"),
        ([acked(0, 1), acked(1, 3)], [(1, post_path(0)), (3, post_path(1))], "not 1..N"),
        ([acked(0, 1), acked(1, 1)], [(1, post_path(0))], "several posts"),
        ([acked(0, 1, epoch="00000000")], [(1, post_path(0))], "another epoch"),
        ([acked(0, 1)], [(1, post_path(0)), (2, "/elsewhere")], "nobody posted"),
    ],
)
def test_storage_problems_are_caught(
    posts: list[Post], rows: list[tuple[int, str]], problem: str
) -> None:
    result = storage(posts, rows)
    assert not result.stored_exactly_once
    assert any(problem in p for p in result.storage_problems), result.storage_problems


def viewer(offsets: list[int], notices: list[dict[str, object]] | None = None) -> Viewer:
    client = StreamClient(["ws://127.0.0.1:1"], "s.example.com", "token", lambda e: None)
    return Viewer("v1@g1", client, offsets=offsets, notices=list(notices or []))


@pytest.mark.parametrize(
    "offsets", [[1, 2, 3], [1, 2, 2, 3, 4], [1, 3, 4], [1, 2, 4, 3], [1, 2, 3, 4, 5]]
)
def test_a_viewer_must_get_exactly_1_to_n_in_order(offsets: list[int]) -> None:
    result = ScenarioResult("test", "quick")
    check_viewers(result, [viewer([1, 2, 3, 4]), viewer(offsets)], 4)
    assert not result.viewers_exact
    assert len(result.viewer_problems) == 1 and "v1@g1" in result.viewer_problems[0]


def test_recovered_false_notices_are_collected() -> None:
    result = ScenarioResult("test", "quick")
    notices: list[dict[str, object]] = [
        {"type": "welcome", "recovered": True},
        {"type": "gap", "after": f"{EPOCH}-2", "recovered": False},
    ]
    check_viewers(result, [viewer([1, 2, 3], notices)], 3)
    assert result.viewers_exact
    assert result.recovered_false == [{**notices[1], "viewer": "v1@g1"}]


def test_longest_silence_counts_the_edges_of_the_window() -> None:
    v = viewer([1, 2, 3])
    v.received_at = [10.5, 11.0, 14.0]
    assert v.longest_silence(10.0, 15.0) == (3.0, 11.0)
    assert v.longest_silence(10.0, 20.0) == (6.0, 14.0)  # silent until posting stopped
    assert viewer([]).longest_silence(1.0, 2.5) == (1.5, 1.0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_a_markdown_row_has_a_cell_per_column() -> None:
    row = ScenarioResult("a. x", "quick", notes=["n"]).markdown_row()
    assert row.count("|") == HEADER.splitlines()[0].count("|")


async def test_a_paused_proxy_holds_data_both_ways_until_resumed() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await PausableProxy(upstream.sockets[0].getsockname()[1]).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"a")
        assert await asyncio.wait_for(reader.read(100), 2) == b"a"
        proxy.pause()
        writer.write(b"b")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(100), 0.3)
        assert not reader.at_eof()  # held, not closed
        proxy.resume()
        assert await asyncio.wait_for(reader.read(100), 2) == b"b"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await proxy.close()
        upstream.close()
        await upstream.wait_closed()
