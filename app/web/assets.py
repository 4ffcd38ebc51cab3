"""Static files shipped in the package (the tracking script, the dashboard page).

Each is read once when the app is built and served from memory, gzipped when the client
accepts it. No build step: the files in app/static are served as they are.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import Request, Response


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    etag: str
    max_age: int

    @classmethod
    def load(cls, name: str, media_type: str, max_age: int) -> Asset:
        body = resources.files("app").joinpath("static", name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        return cls(body, gzip.compress(body, 9, mtime=0), media_type, etag, max_age)

    def response(self, request: Request) -> Response:
        headers = {
            "ETag": self.etag,
            "Cache-Control": f"public, max-age={self.max_age}",
            "Vary": "Accept-Encoding",
        }
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(self.gzipped, media_type=self.media_type, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)
