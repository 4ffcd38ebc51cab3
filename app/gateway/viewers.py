"""Admitting a viewer: who may watch (token, site), and joining it to the live feed with its
start position. Shared by the WebSocket and SSE endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import orjson

from app import tokens
from app.codes import CloseCode, ErrorCode
from app.errors import ApiError, unknown_site
from app.gateway.aggregates import FILTERS, BadFilter, Filters, parse_filters
from app.gateway.analytics import StatsBusy, StatsMode, parse_stats
from app.gateway.hub import Viewer
from app.gateway.replay import Start, StartRequest, run_replay, welcome
from app.gateway.sampling import Sampler, parse_sample
from app.gateway.state import GatewayState
from app.servers.postgres import STORAGE_ERRORS
from app.store.sites import Site, is_valid_site_id
from app.wire import format_cursor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamOptions:
    """What a viewer asked for beside its start position (docs/protocol.md)."""

    stats: StatsMode = "off"
    #: Narrow the `stats` frames to the matching events (the events themselves are not).
    filters: Filters = ()
    #: At most this many events a second, the rest reported in `sampled` notices.
    sample: int | None = None


class BadOption(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


#: The query parameters a stream reads (docs/protocol.md): each may be given once.
STREAM_PARAMETERS = frozenset({"token", "since", "last", "minutes", "stats", "sample", *FILTERS})


#: The query parameters `GET /history` reads, each once as well.
HISTORY_PARAMETERS = frozenset({"token", "after", "from", "to", "limit"})


def single_values(
    pairs: Iterable[tuple[str, str]], names: frozenset[str] = STREAM_PARAMETERS
) -> dict[str, str]:
    """A query, one value per name (empty values kept: they are refused where they are
    read); BadOption when one of `names` comes twice. WebSocket and SSE used to take the first
    and the last: one query, two meanings (and a proxy checking one of them could be shown the
    other)."""
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query and name in names:
            raise BadOption(f"{name} is given more than once", name)
        query[name] = value
    return query


def parse_options(query: Mapping[str, str]) -> StreamOptions:
    """The stream's query parameters `stats`, `sample` and the stats filters; raises
    BadOption naming the parameter at fault."""
    try:
        stats = parse_stats(query.get("stats"))
    except ValueError as exc:
        raise BadOption(str(exc), "stats") from None
    try:
        sample = parse_sample(query.get("sample"))
    except ValueError as exc:
        raise BadOption(str(exc), "sample") from None
    try:
        filters = parse_filters(query)
    except BadFilter as exc:
        raise BadOption(str(exc), exc.field) from None
    return StreamOptions(stats, filters, sample)


class Refused(Exception):
    """A viewer refused before it joins: carries the close code and the HTTP error."""

    def __init__(self, close: CloseCode, error: ApiError) -> None:
        super().__init__(error.message)
        self.close = close
        self.error = error


async def authorize(state: GatewayState, secret: str, site: str, token: str | None) -> Site:
    try:
        return await check_viewer(state, secret, site, token)
    except Refused as exc:
        raise exc.error from None


async def check_viewer(state: GatewayState, secret: str, site: str, token: str | None) -> Site:
    """Who may watch: a valid token for exactly this site, of a registered site."""
    if state.draining:
        raise Refused(
            CloseCode.SHUTTING_DOWN,
            ApiError(ErrorCode.STORAGE_UNAVAILABLE, "gateway is shutting down", retry_after=1),
        )
    try:
        if not is_valid_site_id(site):
            raise tokens.InvalidToken("the token is not valid for this site")
        tokens.verify(secret, token, site)
    except tokens.InvalidToken as exc:
        state.metrics.auth_failures.inc()
        raise Refused(CloseCode.UNAUTHORIZED, ApiError(ErrorCode.UNAUTHORIZED, str(exc))) from None
    try:
        found = await state.sites.get(site)
    except STORAGE_ERRORS:
        raise Refused(
            CloseCode.INTERNAL,
            ApiError(ErrorCode.STORAGE_UNAVAILABLE, "site registry unavailable", retry_after=2),
        ) from None
    if found is None:
        raise Refused(CloseCode.UNKNOWN_SITE, unknown_site(site))
    return found


async def join(
    state: GatewayState,
    site: Site,
    req: StartRequest,
    wake: Callable[[], None],
    options: StreamOptions = StreamOptions(),
) -> tuple[Viewer, Start]:
    """Add a viewer to the live feed (holding live events), decide where its stream starts,
    and queue its welcome (`wake` is called whenever its queue goes non-empty). With `stats`
    it also gets `stats` frames; "only": no events at all (it never joins the feed). Raises
    app.gateway.replay.StorageUnavailable when a resume cannot be judged now, Refused when
    its stats filters cannot be served now."""
    stats = options.stats
    if stats != "off":
        try:
            state.analytics.check_room(site, options.filters)
        except StatsBusy as exc:
            error = ApiError(ErrorCode.BUSY, str(exc), retry_after=5)
            raise Refused(CloseCode.BUSY, error) from None
    viewer = Viewer(site.id, site.epoch, state.settings.viewer_queue_bytes, wake)
    if options.sample is not None:
        viewer.sample = Sampler(site.epoch, options.sample).filter
    if stats == "only":
        start = Start(after=None, recovered=None)
        viewer.push_notice(welcome(site.id, site.epoch, start, stats_only=True))
    else:
        start = await state.feeds.admit(viewer, req)
    if stats != "off":
        state.analytics.subscribe(site, viewer, options.filters)
    return viewer, start


def gap_notice(viewer: Viewer, after: int) -> None:
    cursor = format_cursor(viewer.epoch, after)
    viewer.push_notice(orjson.dumps({"type": "gap", "after": cursor, "recovered": False}))


async def replay(state: GatewayState, viewer: Viewer, start: Start, drained: asyncio.Event) -> None:
    try:
        await run_replay(state.replayer, viewer, start, drained, gap_notice)
    except Exception:
        log.exception("replay failed", extra={"site": viewer.site})
        viewer.fail(CloseCode.INTERNAL)
