"""The live status page: plain HTML, CSS and JavaScript files, served as they are.

The files live in ``static/`` beside this module (package data, so an installed sipproxy has
them). The page asks ``api/status`` (the JSON contract in :mod:`sipproxy.admin.status`) once a
second and redraws itself: no build step, no CDN, no external font, nothing but the proxy.

The admin service mounts :func:`page_resource` as its root and puts its own children
(``metrics``, ``api``) on it: ``/`` is then the page, ``/status.js`` and ``/status.css`` its
files, and any other path a 404.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from twisted.web import pages
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

__all__ = ["CONTENT_SECURITY_POLICY", "FILES", "STATIC", "page_resource"]

#: The directory of the page's files.
STATIC: Final = Path(__file__).resolve().parent / "static"
#: Each file of the page, by the path it is served at, with its content type.
FILES: Final = {
    "": ("index.html", "text/html; charset=utf-8"),
    "status.css": ("status.css", "text/css; charset=utf-8"),
    "status.js": ("status.js", "text/javascript; charset=utf-8"),
}


#: What the page may load and do: its own files and ``api/status``, nothing from elsewhere, no
#: inline script, no frames around it (a second line of defence behind setting every value as
#: text).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _PageNode(Resource):
    """A node of the page's tree (its root, or a file): a path not put on it is a 404."""

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return pages.notFound("No such page", "The status page is at /.")


class _PageFile(_PageNode):
    """One file of the page, read when the site is built; ``no-cache``: a browser revalidates
    it, so it gets the new version after an upgrade."""

    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type.encode()

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self.body


def page_resource() -> Resource:
    """The page at ``/`` and its files; the admin service puts its own children on it."""
    root = _PageNode()
    for served_at, (name, content_type) in FILES.items():
        root.putChild(served_at.encode(), _PageFile((STATIC / name).read_bytes(), content_type))
    return root
