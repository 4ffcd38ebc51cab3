"""Run one role's ASGI app under uvicorn."""

from __future__ import annotations

from types import FrameType
from typing import Literal

import uvicorn

from app import gateway, ingest, logs
from app.settings import Settings

Role = Literal["ingest", "gateway"]


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after a graceful shutdown, so the process "dies" of
        # SIGTERM. A completed drain is a success: exit 0 so supervisors see a clean stop.
        self._captured_signals.clear()


def serve(role: Role, settings: Settings, host: str, port: int) -> None:
    logs.configure(role, settings.log_level)
    factory = ingest.create_app if role == "ingest" else gateway.create_app
    config = uvicorn.Config(
        factory(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        # Per-message compression costs ~64 KiB per connection; off (docs/decisions.md).
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    _Server(config).run()
