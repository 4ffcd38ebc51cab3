"""The fanout core, synchronously, without sockets or Redis."""

import orjson
from prometheus_client import CollectorRegistry

from app.codes import CloseCode, StandardCloseCode
from app.gateway.hub import (
    MAX_FRAME_BYTES,
    Hub,
    Sequencer,
    Viewer,
    event_count,
    sse_chunk,
    ws_frames,
)
from app.gateway.metrics import DeliveryStats, GatewayMetrics
from tests.processes import ROOT


def viewer(site: str = "a.com", max_bytes: int = 1000) -> tuple[Viewer, list[int]]:
    wakes: list[int] = []
    v = Viewer(site, "e1e2e3e4", max_bytes, lambda: wakes.append(1))
    return v, wakes


def test_viewer_queue_is_capped_in_bytes() -> None:
    v, wakes = viewer(max_bytes=100)
    assert v.push(1, b"x" * 60)
    assert wakes == [1]  # woken once when the queue becomes non-empty
    assert v.push(2, b"y" * 30)
    assert wakes == [1]
    assert not v.push(3, b"z" * 20)  # would exceed the cap: the caller closes it as slow
    assert v.queued_bytes == 90
    assert [o for _, o, _ in v.take()] == [1, 2]
    assert v.queued_bytes == 0


def test_viewer_skips_what_it_already_has() -> None:
    v, _ = viewer()
    v.after = 5
    assert v.push(5, b"old") and v.push(6, b"new")
    assert [o for _, o, _ in v.take()] == [6]


def test_fail_releases_memory_and_wakes_the_writer() -> None:
    v, wakes = viewer()
    v.push(1, b"x" * 500)
    wakes.clear()
    v.fail(CloseCode.SLOW_CONSUMER)
    assert v.close_code == CloseCode.SLOW_CONSUMER and v.queued_bytes == 0 and wakes == [1]
    assert v.push(2, b"y")  # ignored once closed
    assert v.take() == []


def test_hub_refcounts_sites_and_shares_bytes() -> None:
    hub = Hub()
    a, _ = viewer()
    b, _ = viewer()
    other, _ = viewer("b.com")
    assert hub.add(a) is True  # first viewer: subscribe
    assert hub.add(b) is False
    assert hub.add(other) is True
    payload = b'{"offset":1}'
    assert hub.publish_many("a.com", [(1, payload)]) == ([], 0, 0)  # no sink: queued
    assert a.take()[0][2] is payload and b.take()[0][2] is payload  # encoded once, shared
    assert other.take() == []
    assert hub.remove(a) is False
    assert hub.remove(b) is True  # last viewer: unsubscribe
    assert hub.remove(b) is False
    assert hub.sites() == ["b.com"]


def test_hub_reports_slow_viewers_without_slowing_others() -> None:
    hub = Hub()
    slow, _ = viewer(max_bytes=10)
    fast, _ = viewer(max_bytes=10_000)
    hub.add(slow)
    hub.add(fast)
    overflowed = []
    for offset in range(1, 6):
        overflowed += hub.publish_many("a.com", [(offset, b"x" * 8)])[0]
    assert overflowed and all(v is slow for v in overflowed)
    assert len(fast.take()) == 5


def test_sequencer_orders_dedupes_and_reports_gaps() -> None:
    seq = Sequencer(last=0)
    assert seq.offer(1, b"1") == [(1, b"1")]
    assert seq.offer(1, b"1") == []  # duplicate
    assert seq.offer(3, b"3") == []  # held behind a gap
    assert seq.missing() == (2, 2)
    assert seq.offer(2, b"2") == [(2, b"2"), (3, b"3")]
    assert seq.missing() is None
    assert seq.offer(6, b"6") == []
    assert seq.fill([(4, b"4")]) == [(4, b"4")]
    assert seq.missing() == (5, 5)
    assert seq.skip() == [(6, b"6")]
    assert seq.last == 6


def test_sequencer_without_baseline_starts_at_the_first_event() -> None:
    seq = Sequencer()
    assert seq.offer(41, b"x") == [(41, b"x")]
    assert seq.offer(40, b"old") == []


def test_sequencer_holds_a_bounded_amount() -> None:
    seq = Sequencer(last=0, max_held=3)
    for offset in range(3, 6):
        assert seq.offer(offset, b"") == []
    assert [o for o, _ in seq.offer(6, b"")] == [3, 4, 5, 6]  # gap abandoned, not grown


def test_ws_frames_coalesce_events_and_keep_notices_apart() -> None:
    items = [(0, 1, b'{"offset":1}'), (0, 2, b'{"offset":2}'), (1, 0, b'{"type":"gap"}'),
             (0, 3, b'{"offset":3}')]  # fmt: skip
    frames = [orjson.loads(f) for f in ws_frames(items)]
    assert frames == [
        {"type": "events", "events": [{"offset": 1}, {"offset": 2}]},
        {"type": "gap"},
        {"type": "events", "events": [{"offset": 3}]},
    ]
    assert event_count(items) == 3


def test_ws_frames_split_large_runs() -> None:
    big = b'{"pad":"' + b"x" * 100_000 + b'"}'
    frames = ws_frames([(0, i, big) for i in range(1, 6)])
    assert len(frames) >= 2
    assert all(len(f) <= MAX_FRAME_BYTES + len(big) + 64 for f in frames)
    assert sum(len(orjson.loads(f)["events"]) for f in frames) == 5


def test_sse_chunk_uses_the_cursor_as_id() -> None:
    chunk = sse_chunk(
        [(0, 7, b'{"offset":7}'), (1, 0, b'{"type":"gap","recovered":true}')], "ab12cd34"
    )
    assert chunk == (
        b'id: ab12cd34-7\ndata: {"offset":7}\n\n'
        b'event: gap\ndata: {"type":"gap","recovered":true}\n\n'
    )


def test_the_close_codes_clients_switch_on_are_the_documented_ones() -> None:
    """docs/protocol.md's table is what client authors read: every code the gateway sends is
    in it, under its name, and a client told to reconnect by the table is told so by the
    code (and the other way round)."""
    table = {}
    for line in (ROOT / "docs" / "protocol.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            table[int(cells[0])] = (cells[1], cells[2].startswith("yes"))
    sent = {c.value: (c.name.lower(), c.reconnect) for c in CloseCode}
    standard = {c.value: c.name.lower() for c in StandardCloseCode}
    assert {code: table[code] for code in sent if code in table} == sent
    assert {code: table[code][0] for code in standard if code in table} == standard
    assert table.keys() == sent.keys() | standard.keys()


def test_event_age_reads_the_wire_timestamp() -> None:
    from datetime import UTC, datetime

    from app.gateway.hub import event_age_s

    ts = datetime(2026, 1, 1, tzinfo=UTC)
    payload = orjson.dumps({"offset": 1, "ts": "2026-01-01T00:00:00.000Z"})
    age = event_age_s(payload, ts.timestamp() + 0.25)
    assert age is not None and abs(age - 0.25) < 1e-6
    assert event_age_s(b'{"offset":1}', 0) is None


def test_replay_then_live_has_no_gap_and_no_duplicate_at_the_seam() -> None:
    v, _ = viewer(max_bytes=10_000)
    v.after = 10
    v.start_replay()
    for offset in (13, 14, 15):  # live events arrive while storage is still being read
        assert v.push(offset, b"live%d" % offset)
    for offset in (11, 12, 13):  # the replay overlaps the live stream by one
        assert v.push_replay(offset, b"stored%d" % offset)
    assert v.go_live() is None  # nothing held past the replay: live now
    assert v.push(16, b"live16")
    items = v.take()
    assert [o for _, o, _ in items] == [11, 12, 13, 14, 15, 16]
    assert items[2][2] == b"stored13"


def test_go_live_asks_for_more_replay_when_live_is_ahead() -> None:
    v, _ = viewer(max_bytes=10_000)
    v.start_replay()
    v.push(5, b"5")
    v.push_replay(1, b"1")
    assert v.go_live() == 5  # read storage up to 4 first
    for offset in (2, 3, 4):
        v.push_replay(offset, b"%d" % offset)
    assert v.go_live() is None
    assert [o for _, o, _ in v.take()] == [1, 2, 3, 4, 5]


def test_held_events_past_half_the_cap_are_read_from_storage_instead() -> None:
    """A replaying viewer is never closed for the live events that arrive meanwhile: past
    half its cap they are dropped, and the replay reads up to the last of them."""
    v, _ = viewer(max_bytes=100)
    v.push_replay(1, b"r1")
    v.start_replay()
    assert v.push(2, b"x" * 40)
    assert v.push(3, b"x" * 40)  # over half the cap: 2 and 3 dropped, storage up to 3
    assert v.push(4, b"4")
    assert v.go_live() == 4  # read storage up to (not including) 4
    v.push_replay(2, b"r2")
    v.push_replay(3, b"r3")
    assert v.go_live() is None
    assert [data for _, _, data in v.take()] == [b"r1", b"r2", b"r3", b"4"]


def test_moving_held_events_behind_the_replay_never_overflows() -> None:
    v, _ = viewer(max_bytes=100)
    v.start_replay()
    assert v.push(1, b"x" * 45)
    assert v.go_live() is None
    assert v.queued_bytes == 45 and v.held_bytes == 0


def test_held_events_with_no_room_left_are_read_from_storage_later() -> None:
    """A notice can take the queue past half its cap: held events that no longer fit stay
    held, and the replay is asked to read up to them (never a silent skip)."""
    v, _ = viewer(max_bytes=100)
    v.start_replay()
    v.push_replay(1, b"x" * 45)
    assert v.push_notice(b"n" * 20)
    assert v.push(2, b"a" * 20) and v.push(3, b"b" * 20)
    assert v.go_live() == 3  # 2 fitted; 3 did not: read storage up to just before it
    assert v.after == 2 and v.held_bytes == 20
    v.take()
    assert v.go_live() is None
    assert [data for _, _, data in v.take()] == [b"b" * 20]


def test_caught_up_viewers_get_one_shared_frame_others_the_queue() -> None:
    from app.gateway.hub import ws_broadcast_frame

    hub = Hub()
    written: list[bytes] = []
    live, _ = viewer()
    live.sink = written.append
    behind, _ = viewer()
    behind.sink = written.append
    behind.push_notice(b'{"type":"welcome"}')  # something still queued: must stay in order
    paused, _ = viewer()
    paused.sink = None  # flow control: the connection switched its direct writes off
    for v in (live, behind, paused):
        hub.add(v)
    events = [(1, b'{"offset":1}'), (2, b'{"offset":2}')]
    slow, frames, direct = hub.publish_many("a.com", events)
    assert slow == [] and frames == 1 and direct == 2
    assert written == [ws_broadcast_frame([b'{"offset":1}', b'{"offset":2}'])]
    assert live.after == 2 and live.take() == []
    assert [o for _, o, _ in behind.take()] == [0, 1, 2]
    assert [o for _, o, _ in paused.take()] == [1, 2]


def test_broadcast_frame_is_a_valid_unmasked_text_frame() -> None:
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from app.gateway.hub import ws_broadcast_frame

    for size in (10, 200, 70_000):
        frame = ws_broadcast_frame([b'{"pad":"' + b"x" * size + b'"}'])
        reader = StreamReader()
        reader.feed_data(frame)
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            parsed = done.value
        assert parsed.opcode is Opcode.TEXT and parsed.fin
        assert orjson.loads(parsed.data)["type"] == "events"


def test_frames_and_deliveries_are_counted_per_viewer() -> None:
    """`sitewire_gateway_frames_total` counts writes: a shared frame to two viewers is two."""
    registry = CollectorRegistry()
    stats = DeliveryStats(GatewayMetrics(registry))
    hub = Hub()
    written: list[bytes] = []
    for _ in range(2):
        v, _ = viewer()
        v.sink = written.append
        hub.add(v)
    events = [(1, b'{"offset":1}'), (2, b'{"offset":2}'), (3, b'{"offset":3}')]
    sent = hub.publish_many("a.com", events)
    assert sent == ([], 2, 6) and len(written) == 2
    stats.direct(sent.frames, sent.events, events)
    stats.flush()
    assert registry.get_sample_value("sitewire_gateway_frames_total") == 2
    assert registry.get_sample_value("sitewire_gateway_delivered_events_total") == 6


def test_a_viewer_back_from_flow_control_gets_its_queue_first_then_direct_frames() -> None:
    hub = Hub()
    written: list[bytes] = []
    v, _ = viewer()
    hub.add(v)
    hub.publish_many("a.com", [(1, b'{"offset":1}')])  # paused: no sink, so queued
    v.sink = written.append  # resumed: the connection switches direct writes back on
    hub.publish_many("a.com", [(2, b'{"offset":2}')])
    # Offset 1 is still queued (the flush has not run yet): 2 must not overtake it.
    assert written == [] and [o for _, o, _ in v.take()] == [1, 2]
    hub.publish_many("a.com", [(3, b'{"offset":3}')])
    assert len(written) == 1 and v.after == 3


def test_a_transport_that_closed_under_the_hub_is_switched_off_and_its_events_queued() -> None:
    hub = Hub()
    v, _ = viewer()
    other, _ = viewer()
    written: list[bytes] = []

    def closed(frame: bytes) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    v.sink, other.sink = closed, written.append
    hub.add(v)
    hub.add(other)
    slow, frames, direct = hub.publish_many("a.com", [(1, b'{"offset":1}')])
    assert slow == [] and frames == direct == 1 and len(written) == 1
    assert v.sink is None and [o for _, o, _ in v.take()] == [1]  # nothing skipped


def test_sequencer_offer_many_is_offer_in_a_row() -> None:
    for burst in ([1, 2, 3], [2, 1, 3], [1, 3], [3, 4], [1, 1, 2], [0, 1, 2]):
        one, many = Sequencer(0), Sequencer(0)
        singly = [e for o in burst for e in one.offer(o, b"%d" % o)]
        assert many.offer_many([(o, b"%d" % o) for o in burst]) == singly
        assert (many.last, many.missing()) == (one.last, one.missing())


def test_a_burst_larger_than_a_frame_goes_out_as_several_shared_frames() -> None:
    from app.gateway.hub import MAX_FRAME_BYTES

    hub = Hub()
    written: list[bytes] = []
    v, _ = viewer(max_bytes=10 * MAX_FRAME_BYTES)
    v.sink = written.append
    hub.add(v)
    payload = b'{"pad":"' + b"x" * 990 + b'"}'
    events = [(i, payload) for i in range(1, 601)]  # ~600 KB: three frames' worth
    slow, frames, direct = hub.publish_many("a.com", events)
    assert slow == [] and frames == 3 and direct == 600 and v.after == 600 and v.take() == []
    assert len(written) == 3 and all(len(f) <= MAX_FRAME_BYTES + 10 for f in written)
    bodies = [orjson.loads(f[f.index(b"{") :]) for f in written]
    assert sum(len(b["events"]) for b in bodies) == 600
