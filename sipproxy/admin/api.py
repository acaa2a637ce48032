"""``/api/...``: the proxy's live state as JSON, for scripts and the status page.

``/api/status`` has every part, ``/api/<part>`` one of them (:data:`~sipproxy.admin.status.PARTS`);
the shapes are documented in :mod:`sipproxy.admin.status`. Answers are never cached (each is
the state at that moment).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from sipproxy.admin.status import PARTS, StatusModel

__all__ = ["ApiResource", "JsonPart", "json_body"]


def json_body(request: Request, value: Any) -> bytes:
    """``value`` as the JSON body of ``request``'s answer (no caching)."""
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class JsonPart(Resource):
    """One endpoint: the ``parts`` of the status, as JSON."""

    isLeaf = True

    def __init__(self, model: StatusModel, parts: Iterable[str]) -> None:
        super().__init__()
        self.model = model
        self.parts = tuple(parts)

    def render_GET(self, request: Request) -> bytes:
        return json_body(request, self.model.status(self.parts))


class ApiResource(Resource):
    """``/api``: ``status`` and each part by name."""

    def __init__(self, model: StatusModel) -> None:
        super().__init__()
        self.putChild(b"status", JsonPart(model, PARTS))
        for part in PARTS:
            self.putChild(part.encode(), JsonPart(model, [part]))

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound("No such API endpoint", "Try /api/status.")

    def render_GET(self, request: Request) -> bytes:
        endpoints = ["/api/status", *(f"/api/{part}" for part in PARTS)]
        return json_body(request, {"endpoints": endpoints})
