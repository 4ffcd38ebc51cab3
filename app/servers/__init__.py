"""The backing servers, opened and probed: PostgreSQL (app.servers.postgres) and Redis
(app.servers.redis). A probe answers `Status`; the apps report it on /readyz."""

from typing import Literal

#: What a probe of a backing server answers.
Status = Literal["ok", "unavailable"]

#: How long a readiness probe waits for each server.
PROBE_TIMEOUT_S = 1.0
