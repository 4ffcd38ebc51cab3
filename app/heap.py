"""How the garbage collector treats a server's heap once it has started (both roles).

CPython's cyclic collector runs a young collection every 700 container allocations and, now
and then, a full one that walks every tracked object. An ingest process holds large tables that
live as long as it does (the country database, the crawler patterns, the app itself): a full
collection walked them in ~19 ms, during which nothing else ran, and at thousands of events a
second the young collections were frequent. `settle()` moves everything alive at the end of
startup out of the collector's sight (`gc.freeze`) and makes collections rarer: per batched
event, ingest spent 14 % less CPU and took 10-19 % more events a second (docs/performance.md,
"Ingest's own cost per event"). Garbage in reference cycles is still collected, later.
"""

from __future__ import annotations

import gc

#: Container allocations between young collections (CPython's default is 700), and how many
#: collections of one generation make one of the next (defaults 10 and 10). Ingest's.
THRESHOLDS = (50_000, 50, 100)
#: The gateway's: young collections as often as by default (its viewers' objects are made as
#: they connect, and a young collection walks what is still young: 50,000 made each one stall
#: ~85 ms in a resume storm), full ones a hundred times rarer. A full collection walks every
#: viewer's objects: 100-200 ms at 8,000 viewers, with nothing else running, four of them
#: in a storm of 8,000 resumes; the storm's garbage in cycles was ~0.5 object per viewer.
GATEWAY_THRESHOLDS = (700, 10, 1000)


def settle(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Call once, when startup has made what lives for the process's whole life."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
