"""Malformed and unusual client frames against a real gateway process, written byte by byte
over a plain TCP socket (issue #17). Some of these rules are enforced by the `websockets`
sans-I/O parser under app.gateway.transports.websocket, some by that module itself: the tests
pin the behaviour either way, so that neither a library upgrade nor a change of ours loosens it.

A frame that breaks RFC 6455 fails the connection (section 7.1.7): the server sends a close
frame with the RFC's code and closes the TCP connection without waiting for an answer."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.clients import CLOSE, CONT, PING, TEXT, RawClient, encode_frame, stream_path
from tests.processes import AppProcess
from tests.support import FAST, metric

pytestmark = pytest.mark.slow

BINARY, PONG = 0x2, 0xA
PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_DATA, POLICY_VIOLATION = 1002, 1003, 1007, 1008
PING_MESSAGE = b'{"type":"ping"}'


async def welcomed(gateway: AppProcess, site: str) -> RawClient:
    """A client past its welcome: every frame it sends from now on reaches app.websocket."""
    client = await RawClient.open(gateway.port, stream_path(site))
    assert (await client.message())["type"] == "welcome"
    return client


async def refusal(gateway: AppProcess, site: str, frames: bytes) -> int:
    """Send `frames` in one write; the code the server fails the connection with (it must
    also close the TCP connection itself, without waiting for the client's close frame)."""
    client = await welcomed(gateway, site)
    client.write(frames)
    code, _ = await client.close_frame()
    assert await client.closed_by_server(), f"{code}: TCP connection left open"
    client.close()
    return code


async def assert_refused(
    gateway: AppProcess, site: str, cases: dict[str, bytes], expected: int
) -> None:
    for name, frames in cases.items():
        assert await refusal(gateway, site, frames) == expected, name


async def assert_answered(client: RawClient) -> None:
    """The connection is still open and working: a ping message gets its pong."""
    client.send(TEXT, PING_MESSAGE)
    assert (await client.message())["type"] == "pong"


# -- masking -----------------------------------------------------------------------------------


async def test_an_unmasked_client_frame_is_refused_with_1002(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    cases = {
        "unmasked text": encode_frame(TEXT, PING_MESSAGE, mask=False),
        "unmasked ping": encode_frame(PING, b"hi", mask=False),
        "unmasked close": encode_frame(CLOSE, struct.pack("!H", 1000), mask=False),
        "unmasked continuation of a masked start": (
            encode_frame(TEXT, b'{"type":', fin=False) + encode_frame(CONT, b'"ping"}', mask=False)
        ),
    }
    await assert_refused(gateway, site, cases, PROTOCOL_ERROR)
    # The parser refused these itself; each is counted as the gateway's own closes are.
    closes = 'sitewire_gateway_closes_total{reason="protocol_error"}'
    assert await metric(gateway.internal_url, closes) == len(cases)


# -- control frames ----------------------------------------------------------------------------


async def test_control_frames_over_125_bytes_or_fragmented_are_refused_with_1002(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    cases = {
        "ping of 126 bytes": encode_frame(PING, b"p" * 126),
        "pong of 126 bytes": encode_frame(PONG, b"p" * 126),
        "close of 126 bytes": encode_frame(CLOSE, struct.pack("!H", 1000) + b"r" * 124),
        "fragmented ping": encode_frame(PING, b"a", fin=False) + encode_frame(CONT, b"b"),
        "fragmented close": (
            encode_frame(CLOSE, struct.pack("!H", 1000), fin=False) + encode_frame(CONT, b"")
        ),
        "reserved bit set": encode_frame(TEXT, PING_MESSAGE, rsv=0b100),
        "unknown opcode": encode_frame(0x3, b""),
    }
    await assert_refused(gateway, site, cases, PROTOCOL_ERROR)


async def test_a_ping_of_exactly_125_bytes_is_answered(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """The limit is not off by one: 125 bytes is a valid control frame."""
    gateway = spawn("gateway", **FAST)
    client = await welcomed(gateway, site)
    payload = bytes(range(125))
    client.send(PING, payload)
    assert await client.frame() == (PONG, payload)
    await assert_answered(client)
    client.close()


# -- continuation order ------------------------------------------------------------------------


async def test_continuation_frames_out_of_order_are_refused_with_1002(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    start = encode_frame(TEXT, b'{"type":', fin=False)
    cases = {
        "continuation with no message started": encode_frame(CONT, PING_MESSAGE),
        "unfinished continuation with no message started": encode_frame(CONT, b"{", fin=False),
        "text frame inside a fragmented message": start + encode_frame(TEXT, PING_MESSAGE),
        "new fragmented text inside one": start + encode_frame(TEXT, b"{", fin=False),
        "binary frame inside a fragmented message": start + encode_frame(BINARY, b"x"),
        "continuation after the message ended": (
            start + encode_frame(CONT, b'"ping"}') + encode_frame(CONT, b" ")
        ),
        "close inside a fragmented message": start + encode_frame(CLOSE, struct.pack("!H", 1000)),
    }
    await assert_refused(gateway, site, cases, PROTOCOL_ERROR)


async def test_control_frames_may_come_between_fragments(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    client = await welcomed(gateway, site)
    client.send(TEXT, b'{"type":', fin=False)
    client.send(PING, b"between")
    client.send(CONT, b'"ping"}')
    assert await client.frame() == (PONG, b"between")
    assert (await client.message())["type"] == "pong"
    client.close()


# -- data types and UTF-8 ----------------------------------------------------------------------


async def test_binary_frames_are_refused_with_1003(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """The protocol is text JSON only: a binary message is refused, whatever it holds."""
    gateway = spawn("gateway", **FAST)
    cases = {
        "binary ping message": encode_frame(BINARY, PING_MESSAGE),
        "empty binary frame": encode_frame(BINARY, b""),
        "first fragment of a binary message": encode_frame(BINARY, b'{"type":', fin=False),
        "whole fragmented binary message": (
            encode_frame(BINARY, b'{"type":', fin=False) + encode_frame(CONT, b'"ping"}')
        ),
    }
    await assert_refused(gateway, site, cases, UNSUPPORTED_DATA)
    client = await welcomed(gateway, site)
    client.send(BINARY, PING_MESSAGE)
    code, reason = await client.close_frame()
    assert (code, reason) == (UNSUPPORTED_DATA, "text frames only (JSON)")
    client.close()


async def test_invalid_utf8_is_refused_with_1007_whole_or_fragmented(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    gateway = spawn("gateway", **FAST)
    cases = {
        "one frame": encode_frame(TEXT, b'{"type":"\xff"}'),
        "a surrogate (not UTF-8)": encode_frame(TEXT, b'{"type":"\xed\xa0\x80"}'),
        "an overlong encoding": encode_frame(TEXT, b'{"type":"\xc0\xaf"}'),
        "in the last fragment": (
            encode_frame(TEXT, b'{"type":', fin=False) + encode_frame(CONT, b'"\xff"}')
        ),
        "in the first fragment": (
            encode_frame(TEXT, b'{"\xfe":', fin=False) + encode_frame(CONT, b'"ping"}')
        ),
        "in a middle fragment": (
            encode_frame(TEXT, b"{", fin=False)
            + encode_frame(CONT, b'"type"\x80', fin=False)
            + encode_frame(CONT, b':"ping"}')
        ),
        # Each fragment is a fine prefix or suffix: only the whole message is invalid.
        "a character cut short": (
            encode_frame(TEXT, b'{"type":"ping","x":"\xe2\x82', fin=False)
            + encode_frame(CONT, b'"}')
        ),
    }
    await assert_refused(gateway, site, cases, INVALID_DATA)


async def test_a_character_split_between_fragments_is_valid(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """UTF-8 is a property of the message, not of each fragment: "€" cut in two is fine."""
    gateway = spawn("gateway", **FAST)
    client = await welcomed(gateway, site)
    message = '{"type":"ping","x":"€"}'.encode()
    cut = message.index(b"\xe2") + 1
    client.send(TEXT, message[:cut], fin=False)
    client.send(CONT, message[cut:])
    assert (await client.message())["type"] == "pong"
    client.close()


# -- nothing is sent once the connection is closing --------------------------------------------


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(encode_frame(CLOSE, struct.pack("!H", 1000)), id="the client's close"),
        pytest.param(encode_frame(TEXT, b"x", mask=False), id="a malformed frame"),
        pytest.param(encode_frame(BINARY, b"x"), id="a binary frame"),
        pytest.param(encode_frame(TEXT, b"\xff"), id="invalid UTF-8"),
    ],
)
async def test_a_pong_queued_just_before_the_close_is_dropped_without_error(
    spawn: Callable[..., AppProcess], site: str, ending: bytes
) -> None:
    """A ping message and the end of the connection in one read: the pong is queued for the
    next flush, which runs after the close. It must send nothing (and raise nothing: the
    sans-I/O protocol refuses `send_text` once closing)."""
    gateway = spawn("gateway", **FAST)
    client = await welcomed(gateway, site)
    client.write(encode_frame(TEXT, PING_MESSAGE) + ending)
    opcode, _ = await client.frame()
    assert opcode == CLOSE  # no pong before the close: it was queued behind it
    assert await client.closed_by_server()
    client.close()
    # Another connection through the gateway's event loop: the flush has run by its welcome.
    other = await welcomed(gateway, site)
    await assert_answered(other)
    other.close()
    log = gateway.log_path.read_text(errors="replace")
    assert "InvalidState" not in log and '"level":"error"' not in log, log[-2000:]


# -- how many frames -----------------------------------------------------------------------------


async def test_more_than_50_frames_in_10_seconds_fail_the_connection_with_1008(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """From an outside test: 6-byte frames nothing else bounds (unasked pongs, empty fragments
    of a message never finished, pings) held a gateway at 93 % of its core, other viewers'
    events up to 29 s late. A viewer sends a ping message and answers a ping now and then: 50
    frames, plus one per server ping in the window (one, at the default 20 s)."""
    gateway = spawn("gateway", **FAST)
    start = encode_frame(TEXT, b"", fin=False)
    cases = {
        "unasked pongs": encode_frame(PONG, b"") * 60,
        "empty fragments of a message never finished": start
        + encode_frame(CONT, b"", fin=False) * 60,
        "pings": encode_frame(PING, b"x") * 60,
        # One read of ~240 KB: parsed a slice at a time, refused at the first slice's count.
        "forty thousand pongs in one write": encode_frame(PONG, b"") * 40_000,
    }
    await assert_refused(gateway, site, cases, POLICY_VIOLATION)
    closes = 'sitewire_gateway_closes_total{reason="policy_violation"}'
    assert await metric(gateway.internal_url, closes) == len(cases)
    # Fifty is allowed, whatever they are: the connection still works.
    client = await welcomed(gateway, site)
    client.write(encode_frame(PONG, b"") * 49)
    await assert_answered(client)
    client.close()


async def test_a_viewer_answering_frequent_pings_stays_under_the_frame_limit(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """SITEWIRE_PING_INTERVAL_S may be as short as 0.1 s: 100 pongs in 10 s, which a fixed
    limit of 50 cut off after 5 s (an outside tester's `sitewire tail`)."""
    gateway = spawn("gateway", **FAST, SITEWIRE_PING_INTERVAL_S="0.1")
    async with connect(f"{gateway.ws_url}{stream_path(site)}", ping_interval=None) as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        await asyncio.sleep(7)
        await ws.send(PING_MESSAGE.decode())
        assert orjson.loads(await ws.recv())["type"] == "pong"
