"""JSON responses encoded with orjson (FastAPI's ORJSONResponse is deprecated), and what
both apps share about errors: one JSON shape for every error, FastAPI's own included."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.codes import ErrorCode
from app.errors import ApiError

#: FastAPI options both apps use: no docs or OpenAPI schema on the public ports, and no
#: trailing-slash redirects (FastAPI builds their Location from the Host header, as http://,
#: with the query, viewer tokens included, in it).
API_OPTIONS: dict[str, Any] = {
    "docs_url": None,
    "redoc_url": None,
    "openapi_url": None,
    "redirect_slashes": False,
}


def json_response(
    body: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status_code, media_type="application/json", headers=headers
    )


def error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if error.retry_after is not None:
        extra["Retry-After"] = str(error.retry_after)
    return json_response(error.body(), error.code.status, extra)


def install_error_handlers(app: FastAPI) -> None:
    """Every error in the documented shape: ours (ApiError) and FastAPI's (404, 405)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.INVALID_REQUEST
        )
        return error_response(ApiError(code, str(exc.detail)))
