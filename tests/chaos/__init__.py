"""Chaos suite (issue #15, "exactly once under partial failure"): real ingest and gateway
processes under steady load while a process, Redis, a network link or PostgreSQL fails.

`make test` runs a quick version of every scenario; `make chaos` (SITEWIRE_CHAOS=full) runs
the full one and writes a Markdown table of the results (tests/chaos/report.py).
"""
