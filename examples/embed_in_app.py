"""
Embedding sipproxy in an existing Twisted application.

An application that already runs its own services (here: a small HTTP status page) attaches the
proxy to its own ``MultiService`` with :func:`sipproxy.service.makeService`: one reactor, one
process, one start and stop, and the application can read the proxy's live state
(``service.proxy``) directly, without any RPC.

Run it in the foreground::

    twistd -n -y examples/embed_in_app.py
    curl http://127.0.0.1:8080/             # plain text
    curl http://127.0.0.1:8080/status.json  # the same as JSON

Without ``SIPPROXY_CONFIG`` the proxy uses a demo config (registrar for ``lan.example`` on
UDP 127.0.0.1:5060, and ``[admin] enabled = false``: the proxy's own admin listener, also on
port 8080 by default, would take this page's port; an application may as well serve the
proxy's ``/metrics`` and ``/api`` instead, from ``sipproxy.admin``). A config of your own
needs ``[admin] enabled = false`` or another ``port`` too. Environment variables:

- ``SIPPROXY_CONFIG``: path of a sipproxy TOML file (e.g. ``examples/sipproxy.toml``);
- ``STATUS_PORT``: TCP port of the status page (default 8080);
- ``STATUS_INTERFACE``: address it listens on (default 127.0.0.1: it is not meant for the world).
"""

from __future__ import annotations

import json
import os
from typing import Any, Final, cast

from twisted.application.service import Application, MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.python.components import Componentized
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sipproxy.config import Config, ConfigError, load_config, parse_config
from sipproxy.service import SipProxyService, makeService

__all__ = [
    "DEMO_CONFIG",
    "EmbeddedApp",
    "StatusPage",
    "StatusWebService",
    "application",
    "make_app_service",
]

DEMO_CONFIG: Final = """
[proxy]
domains = ["lan.example"]

[[listen]]
side = "inside"
transport = "udp"
address = "127.0.0.1"
port = 5060

[admin]
enabled = false  # this application serves its own status page
"""


class StatusPage(Resource):
    """``/`` (text) and ``/status.json``: the proxy's state, read live on every request."""

    isLeaf = True

    def __init__(self, proxy: Any) -> None:
        super().__init__()
        self.proxy = proxy

    def status(self) -> dict[str, Any]:
        proxy = self.proxy
        return {
            "registered_bindings": proxy.location.count(),
            "transactions": len(proxy.transactions),
            "dialogs": len(proxy.dialogs),
            "plugins": [getattr(p, "name", type(p).__name__) for p in proxy.pipeline.plugins],
            "listeners": [
                f"{lst.transport} {lst.address}:{lst.port} ({lst.side})" for lst in proxy.listeners
            ],
        }

    def render_GET(self, request: Request) -> bytes:
        path = b"/".join(request.postpath or [])
        status = self.status()
        if path == b"status.json":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(status).encode() + b"\n"
        if path != b"":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        lines = [
            f"registered bindings: {status['registered_bindings']}",
            f"live transactions: {status['transactions']}",
            f"dialogs: {status['dialogs']}",
            f"plugins: {', '.join(status['plugins']) or 'none'}",
            *(f"listening: {text}" for text in status["listeners"]),
        ]
        return ("\n".join(lines) + "\n").encode()


class StatusWebService(Service):
    """Serves a site on one TCP port; ``port`` is the bound port (useful when asked for 0)."""

    def __init__(
        self, site: Site, port: int, interface: str = "127.0.0.1", reactor: Any = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.site = site
        self.requested_port = port
        self.interface = interface
        self.reactor = reactor
        self.listening: IListeningPort | None = None

    @property
    def port(self) -> int:
        if self.listening is None:
            raise RuntimeError("the status page is not listening")
        return cast(IPv4Address, self.listening.getHost()).port

    def startService(self) -> None:
        self.listening = self.reactor.listenTCP(
            self.requested_port, self.site, interface=self.interface
        )
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        listening, self.listening = self.listening, None
        if listening is None:
            return None
        return listening.stopListening()


class EmbeddedApp(MultiService):
    """Stands for your application's own top-level service: the proxy is one child of it."""

    def __init__(self, sip: SipProxyService, status: StatusWebService) -> None:
        super().__init__()
        self.setName("app")
        self.sip = sip
        self.status = status
        sip.setServiceParent(self)  # named "sipproxy" by makeService
        status.setName("status-http")
        status.setServiceParent(self)


def make_app_service(
    config: Config,
    *,
    status_port: int = 8080,
    status_interface: str = "127.0.0.1",
    reactor: Any = None,
) -> EmbeddedApp:
    """The application's services: sipproxy next to the status page that reads its state."""
    sip = makeService(config, reactor)
    site = Site(StatusPage(sip.proxy))
    return EmbeddedApp(sip, StatusWebService(site, status_port, status_interface, reactor))


def _make_application() -> Componentized:
    """What ``twistd -y`` runs; settings come from the environment (see the module docstring)."""
    path = os.environ.get("SIPPROXY_CONFIG")
    interface = os.environ.get("STATUS_INTERFACE", "127.0.0.1")
    port_text = os.environ.get("STATUS_PORT", "8080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SystemExit(f"embed_in_app: STATUS_PORT must be a port number, got {port_text!r}")
    status_port = int(port_text)
    try:
        config = load_config(path) if path else parse_config(DEMO_CONFIG, "<demo config>")
        # Plugins validate their own sections while the service is built: errors come from here too.
        services = make_app_service(config, status_port=status_port, status_interface=interface)
    except ConfigError as e:
        raise SystemExit(f"embed_in_app: {e}") from None
    app = Application("sipproxy-embedded")
    services.setServiceParent(app)
    return app


#: The object ``twistd -y`` looks for. Building it binds nothing: sockets open on start.
application = _make_application()
