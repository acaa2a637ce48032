"""The ``[admin]`` HTTP listener: ``/metrics``, ``/api/...`` and the status page at ``/``.

Added to the proxy's services by :func:`sipproxy.service.makeService` when ``[admin] enabled``.
With a ``token``, every request must carry it (``Authorization: Bearer TOKEN``, or basic
auth with the token as the password, which a browser asks for); without one, the listener
may only be on a loopback address (the config refuses anything else).

When the port cannot be bound (another program has it), the proxy logs one error line and
goes on serving SIP without it: the admin listener is for watching the proxy, and must not
keep phones from calling.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sipproxy.admin.api import ApiResource
from sipproxy.admin.metrics import MetricsPage, proxy_registry
from sipproxy.admin.page import page_resource
from sipproxy.admin.status import StatusModel
from sipproxy.config import AdminConfig

__all__ = ["AdminService", "QuietSite", "TokenGuard", "admin_root"]

_log = Logger(namespace="sipproxy.admin")


def admin_root(proxy: Any) -> Resource:
    """The admin site's root: the status page at ``/`` (with its files), ``/metrics``, ``/api``."""
    root = page_resource()
    root.putChild(b"metrics", MetricsPage(proxy_registry(proxy)))
    model = StatusModel(proxy)
    root.putChild(b"api", ApiResource(model))
    return root


class _Unauthorized(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Basic realm="sipproxy admin"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"401 Unauthorized: this sipproxy admin listener needs its token\n"


class TokenGuard(Resource):
    """Lets a request through to ``wrapped`` only with ``token`` (see the module docstring)."""

    def __init__(self, wrapped: Resource, token: str) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.token = token.encode()

    def authorized(self, request: Request) -> bool:
        """Whether ``request`` carries the token."""
        header = request.getHeader("authorization") or ""
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            offered = value.encode()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            offered = decoded.partition(b":")[2]
        else:
            return False
        return hmac.compare_digest(offered, self.token)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if not self.authorized(request):
            return _Unauthorized()
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request: Request) -> bytes:
        if not self.authorized(request):
            return _Unauthorized().render(request)
        return self.wrapped.render(request)


class QuietSite(Site):
    """A site without access log: the status page polls every second, Prometheus every few."""

    noisy = False

    def startFactory(self) -> None:
        pass  # (the access log's clock and file)

    def stopFactory(self) -> None:
        pass

    def log(self, request: Any) -> None:
        pass


class AdminService(Service):
    """Listens on ``[admin] address``:``port`` while the proxy runs.

    :ivar port: the listening port once started (``port.getHost().port`` is the real port
        number when the config says 0); None when stopped or when binding failed.
    """

    name = "admin"

    def __init__(self, proxy: Any, config: AdminConfig, reactor: Any) -> None:
        self.proxy = proxy
        self.config = config
        self.reactor = reactor
        root = admin_root(proxy)
        self.site = QuietSite(TokenGuard(root, config.token) if config.token else root)
        self.site.displayTracebacks = False
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        config = self.config
        shown = f"[{config.address}]" if ":" in config.address else config.address
        try:
            self.port = self.reactor.listenTCP(config.port, self.site, interface=config.address)
        except CannotListenError as e:
            _log.error(
                "sipproxy admin: cannot listen on {address}:{port} ({why}); serving SIP without"
                " /metrics and the status page (set [admin] port, or enabled = false)",
                address=shown, port=config.port, why=e.socketError)
            return
        _log.info("sipproxy admin listening on http://{address}:{port}/ ({auth})",
                  address=shown, port=self.port.getHost().port,  # type: ignore[union-attr]
                  auth="token required" if config.token else "no token: loopback only")

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
