"""The validate-only baseline for ingest: a typical FastAPI endpoint that checks the same
event with a pydantic model and answers 202 without storing or publishing anything.

What a Python web stack costs per event before any durability: Sitewire's ingest throughput is
read against it (docs/performance.md, scenario 4; issue #20 item 3). Same server (uvicorn,
uvloop, httptools), same bodies, same load generator. The body is read whatever its
Content-Type (the tracking script sends text/plain, which FastAPI's JSON body parameter would
refuse) and validated by pydantic's own JSON parser, its fastest path.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

SiteId = Annotated[
    str,
    StringConstraints(
        max_length=253,
        pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$",
    ),
]
Url = Annotated[str, StringConstraints(max_length=2000, pattern=r"^https?://[^\s/]+\S*$")]


class Event(BaseModel):
    """The rules of docs/ingest.md, as a pydantic model."""

    model_config = ConfigDict(extra="forbid")

    site: SiteId
    name: Annotated[str, StringConstraints(min_length=1, max_length=120)]
    url: Url
    referrer: Url | Literal[""] | None = None
    props: Annotated[dict[str, str | int | float | bool], Field(max_length=30)] = {}
    id: uuid.UUID | None = None


Batch = TypeAdapter(Annotated[list[Event], Field(min_length=1, max_length=100)])
app = FastAPI()


@app.post("/api/event", status_code=202, response_model=None)
async def post_event(request: Request) -> Response | dict[str, bool]:
    try:
        Event.model_validate_json(await request.body())
    except ValidationError as exc:
        return Response(exc.json(), status_code=422, media_type="application/json")
    return {"ok": True}


@app.post("/api/events", status_code=202, response_model=None)
async def post_events(request: Request) -> Response | dict[str, list[dict[str, int | bool]]]:
    try:
        events = Batch.validate_json(await request.body())
    except ValidationError as exc:
        return Response(exc.json(), status_code=422, media_type="application/json")
    return {"results": [{"status": 202, "ok": True} for _ in events]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
