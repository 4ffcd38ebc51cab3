"""Sitewire's one exception hierarchy.

    SitewireError
    ├── SettingsError          a bad environment value; names the variable
    ├── MigrationError         the migration runner refused to continue
    │   └── ChecksumMismatch   an applied migration file was edited afterwards
    ├── InvalidSiteId          a site id that is not a lowercase domain-like name
    ├── ApiError               a request rejected with an ErrorCode (HTTP JSON error)
    └── StorageUnavailable     PostgreSQL could not commit; nothing was acknowledged

Exceptions carry their data as attributes; I/O edges catch narrow tuples and translate.
"""

from __future__ import annotations

from app.codes import ErrorCode


class SitewireError(Exception):
    """Base class of every error Sitewire raises on purpose."""


class SettingsError(SitewireError):
    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable
        self.problem = problem


class MigrationError(SitewireError):
    pass


class ChecksumMismatch(MigrationError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"migration {name} was changed after it was applied; "
            "add a new migration instead of editing an applied one"
        )
        self.name = name


class InvalidSiteId(SitewireError):
    def __init__(self, site: str) -> None:
        super().__init__(
            f"invalid site id {site!r}: use a lowercase domain-like name "
            "(letters, digits, '-' and '.', at most 253 characters)"
        )
        self.site = site


class ApiError(SitewireError):
    """A rejected request. `field` names the offending input where there is one."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str]]:
        error = {"code": self.code.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def unknown_site(site: str) -> ApiError:
    """The one wording of "no such site", for ingest and the gateway alike."""
    return ApiError(ErrorCode.UNKNOWN_SITE, f"site {site} is not registered", "site")


class StorageUnavailable(SitewireError):
    """PostgreSQL did not confirm a commit; the events in it must not be acknowledged.
    `maybe_stored`: the commit was sent and its outcome is unknown (a retry with the same ids
    is safe: a stored event comes back as a duplicate); else nothing was stored."""

    def __init__(self, message: str, *, maybe_stored: bool = False) -> None:
        super().__init__(message)
        self.maybe_stored = maybe_stored
