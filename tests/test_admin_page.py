"""sipproxy.admin.page: the status page's files over real HTTP (a twisted.web site on
127.0.0.1), what they may load (nothing from elsewhere), and that an installed sipproxy has them.

The page's behaviour in a browser against a real proxy: tests/integration/test_status_page.py.
"""

from __future__ import annotations

import configparser
import fnmatch
import re
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import Site

from sipproxy.admin.page import STATIC, page_resource

reactor: Any = _reactor
ROOT = STATIC.parents[2]
#: what loads something from elsewhere: an absolute or protocol-relative URL, a CSS import or
#: web font
ELSEWHERE = re.compile(r"[a-z]+://|[\"'(]//|@import|@font-face", re.I)


class Body(Protocol):
    """A response's body (``readBody`` warns about Agent's own transport in this Twisted)."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(b"".join(self.data))


class Metrics(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"sipproxy_up 1\n"


class PageOverHTTPTests(unittest.TestCase):
    def setUp(self) -> None:
        root = page_resource()
        root.putChild(b"metrics", Metrics())  # as the admin service mounts its own children
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}".encode()
        response = yield self.agent.request(b"GET", url)
        done: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(Body(done))
        body = yield done
        self.headers = response.headers
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        return response.code, types[0].decode(), body

    @defer.inlineCallbacks
    def test_root_is_the_page_and_its_files_are_served(self) -> Any:
        code, ctype, body = yield self.get("/")
        self.assertEqual((code, ctype), (200, "text/html; charset=utf-8"))
        self.assertEqual(body, (STATIC / "index.html").read_bytes())
        # nothing but its own files, no inline script, not framed (the browser test checks
        # that the page works under it: no console error)
        [policy] = self.headers.getRawHeaders(b"content-security-policy")
        for directive in (b"default-src 'none'", b"script-src 'self'", b"connect-src 'self'",
                          b"frame-ancestors 'none'"):
            self.assertIn(directive, policy)
        for name, kind in (("status.js", "text/javascript"), ("status.css", "text/css")):
            code, ctype, body = yield self.get(f"/{name}")
            self.assertEqual((code, ctype), (200, f"{kind}; charset=utf-8"), name)
            self.assertEqual(body, (STATIC / name).read_bytes())

    @defer.inlineCallbacks
    def test_children_of_the_admin_service_take_precedence(self) -> Any:
        code, _, body = yield self.get("/metrics")
        self.assertEqual((code, body), (200, b"sipproxy_up 1\n"))

    @defer.inlineCallbacks
    def test_anything_else_is_404(self) -> Any:
        for path in ("/nope", "/status.js/x", "/static/status.js", "/%2e%2e/page.py",
                     "/../page.py"):
            code, _, body = yield self.get(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"page_resource", body)


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, no external font: the page's files name no other site, and the page loads only
    its own files (and the API, relative to it)."""
    for path in STATIC.iterdir():
        assert ELSEWHERE.search(path.read_text()) is None, path.name
    html = (STATIC / "index.html").read_text()
    loaded = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(loaded) == ["api/status", "data:,", "status.css", "status.js"], loaded
    assert '"api/status"' in (STATIC / "status.js").read_text()


def test_the_page_is_package_data() -> None:
    """setup.cfg ships every file of the page, so an installed sipproxy serves it."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "sipproxy.admin" in setup["options"]["packages"].split()
    patterns = setup["options.package_data"]["sipproxy.admin"].split()
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir())
    assert files == ["static/index.html", "static/status.css", "static/status.js"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), (name, patterns)
