"""What the proxy hands its plugins about one request: :class:`RequestContext`, its
:class:`Branch` es and the :class:`Target` s they go to.

These are the plugin API's data types (re-exported by :mod:`sipproxy.interfaces`). The core's
own state is in typed fields; ``data`` on a context or a branch is a free dict for plugins'
own state, keyed by names the plugin chooses (prefix them with the plugin's name). Keys the
built-in plugins use: ``authenticated_user`` (:data:`sipproxy.interfaces.AUTHENTICATED_USER`),
``tls_peer``, ``tls_next_hop``, ``tls_failure`` (the ``tls`` plugin), ``nat_token``,
``nat_call_id`` and, on a branch, ``nat_rr`` and ``nat_call_id`` (the ``nat`` plugin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# imported at run time, not for type checking only: compiled with mypyc, these dataclasses'
# fields name the compiled classes, which must be loaded before this module is
from sipproxy.dialogs import Dialog
from sipproxy.message import Request, Response, Source
from sipproxy.transaction import ClientTransaction, ServerTransaction

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.python.failure import Failure

    from sipproxy.location import Binding
    from sipproxy.transport.manager import Listener

__all__ = ["Branch", "RequestContext", "Target"]


@dataclass(frozen=True, slots=True)
class Target:
    """One place to send a request: try the targets of a resolution in list order.

    :param transport: ``"UDP"``, ``"TCP"`` or ``"TLS"``.
    :param host: an IP literal (IPv6 without brackets).
    :param port: the port to send to.
    :param server_name: the URI's host, not an SRV/NAPTR-derived name: RFC 5922 section 4 says
        a TLS client checks the certificate against the domain it was asked to reach, since DNS
        itself is not trusted.
    """

    transport: str
    host: str
    port: int
    server_name: str


@dataclass(eq=False, slots=True)
class Branch:
    """One outgoing fork of a request (RFC 3261 16.6), given to ``request_forwarding`` and
    ``response_received``.

    ``request`` is the branch's own copy (new Request-URI, the proxy's Via and Record-Route);
    ``target`` is where it goes (None for a target that could not be resolved) and ``listener``
    the socket it leaves from. A plugin may set ``hide_vias``; to send the branch elsewhere it
    calls :meth:`sipproxy.interfaces.IProxyCore.retarget`.
    """

    request: Request
    target: Target | None
    listener: Listener | None
    transaction: ClientTransaction | None = None
    #: a provisional response (101-199) arrived: a CANCEL may be sent
    provisional: bool = False
    #: the final response of this branch (received, or made by the proxy)
    final: Response | None = None
    #: a CANCEL waits for the first provisional response
    cancel_pending: bool = False
    cancelled: bool = False
    timer_c: IDelayedCall | None = None
    #: set by a plugin in request_forwarding: send only the proxy's own Via (the ones below it
    #: name the caller's network); responses get the original Vias back from the proxy
    hide_vias: bool = False
    #: the next targets of the same resolution, tried in order when this one is unreachable
    #: (RFC 3263 section 4.3)
    targets: list[Target] = field(default_factory=list)
    #: the location service binding this branch was routed by (a request to a local user),
    #: None otherwise
    binding: Binding | None = None
    #: the connection this branch needed could not be opened (a logged Failure): the branch
    #: is answered 503 by the proxy instead of being sent
    flow_failed: Failure | None = None
    #: free for plugins' own per-branch state
    data: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self, request: Request, target: Target | None, listener: Listener | None,
        transaction: ClientTransaction | None = None, provisional: bool = False,
        final: Response | None = None, cancel_pending: bool = False, cancelled: bool = False,
        timer_c: IDelayedCall | None = None, hide_vias: bool = False,
        targets: list[Target] | None = None, binding: Binding | None = None,
        flow_failed: Failure | None = None, data: dict[str, Any] | None = None,
    ) -> None:
        # written out, not the dataclass's: compiled (mypyc), the generated one stays Python
        self.request = request
        self.target = target
        self.listener = listener
        self.transaction = transaction
        self.provisional = provisional
        self.final = final
        self.cancel_pending = cancel_pending
        self.cancelled = cancelled
        self.timer_c = timer_c
        self.hide_vias = hide_vias
        self.targets = [] if targets is None else targets
        self.binding = binding
        self.flow_failed = flow_failed
        self.data = {} if data is None else data


@dataclass(eq=False, slots=True)
class RequestContext:
    """Everything about one request the proxy handles, given to every request and response
    hook. ``data`` is free for plugins' own per-request state."""

    request: Request
    #: None for an ACK to a 2xx (forwarded statelessly)
    server_transaction: ServerTransaction | None
    #: the dialog an in-dialog request belongs to (or that a 2xx to this INVITE set up)
    dialog: Dialog | None = None
    branches: list[Branch] = field(default_factory=list)
    #: targets still being resolved (not yet a branch)
    pending_targets: int = 0
    final_sent: bool = False
    #: a final response is on its way (its response_forwarding hooks may still be waiting)
    final_chosen: bool = False
    cancelled: bool = False
    best_2xx_sent: bool = False
    #: dialogs the 2xx responses to this INVITE set up (at most [proxy] max_branches)
    dialogs_made: int = 0
    #: set by a plugin in request_received: send the request there (Request-URI as it is),
    #: skipping the location service, [upstream] and DNS (e.g. NAT: a phone's real address)
    destination: Target | None = None
    #: when an initial INVITE (no To tag) arrived, by the proxy's clock (set by the core for
    #: those only, one clock read each; None for every other request): the status page's
    #: calls not answered yet count their duration from it
    arrived: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self, request: Request, server_transaction: ServerTransaction | None,
        dialog: Dialog | None = None, branches: list[Branch] | None = None,
        pending_targets: int = 0, final_sent: bool = False, final_chosen: bool = False,
        cancelled: bool = False, best_2xx_sent: bool = False, dialogs_made: int = 0,
        destination: Target | None = None, arrived: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        # written out, as Branch's
        self.request = request
        self.server_transaction = server_transaction
        self.dialog = dialog
        self.branches = [] if branches is None else branches
        self.pending_targets = pending_targets
        self.final_sent = final_sent
        self.final_chosen = final_chosen
        self.cancelled = cancelled
        self.best_2xx_sent = best_2xx_sent
        self.dialogs_made = dialogs_made
        self.destination = destination
        self.arrived = arrived
        self.data = {} if data is None else data

    @property
    def source(self) -> Source | None:
        """Where the request came from (``request.source``)."""
        return self.request.source
