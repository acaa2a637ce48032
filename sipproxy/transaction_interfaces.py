"""The two interfaces around the transaction layer: what it sends through
(:class:`ITransportSender`, implemented by ``sipproxy.transport``) and what it calls
(:class:`ITransactionUser`, implemented by ``sipproxy.proxy``).

They live apart from ``sipproxy/transaction.py`` because that module is compiled with mypyc
(setup.py), which cannot build a zope ``Interface``; ``sipproxy.transaction`` re-exports both,
so ``from sipproxy.transaction import ITransportSender`` keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Interface

if TYPE_CHECKING:
    from sipproxy.context import Target
    from sipproxy.message import Request, Response, Source
    from sipproxy.transaction import ServerTransaction

__all__ = ["ITransactionUser", "ITransportSender"]


class ITransportSender(Interface):
    """What the transaction layer needs from the transports (implemented by sipproxy.transport).

    Both methods may raise or return a Deferred whose failure means the message could not be
    sent (connection refused, TLS handshake failed, ICMP unreachable...). ``None`` or a
    Deferred that succeeds means "handed to the network"; nothing more is promised.
    """

    def send_request(request: Request, target: Target) -> Deferred[Any] | None:
        """Send ``request`` to ``target`` (a resolved next hop: transport, host, port)."""

    def send_response(response: Response, request_source: Source | None) -> Deferred[Any] | None:
        """Send ``response`` back the way its request came (RFC 3261 18.2.2, RFC 3581).

        ``request_source`` is where the request arrived from (its connection for TCP/TLS, the
        address and port for UDP with rport, the side to leave from); a response without it
        (a request made in this process) is not sent.
        """


class ITransactionUser(Interface):
    """The proxy core as the transaction layer sees it. Exceptions raised here are logged."""

    def request_received(tx: ServerTransaction, request: Request) -> None:
        """A new request (not a retransmission, not an ACK) created server transaction ``tx``.

        CANCEL gets its own non-INVITE transaction like any other request; the INVITE it
        cancels is ``TransactionLayer.find_server_transaction_for_cancel(request)``. For INVITE
        the layer has already sent 100 Trying. Answer with ``tx.respond()``, now or later.
        """

    def ack_received(request: Request) -> None:
        """An ACK that no server transaction absorbs: the ACK for a 2xx, to be sent end to end.

        Also called for an ACK that matches an INVITE transaction in the Accepted state
        (RFC 6026 section 7.1).
        """

    def stray_response(response: Response) -> None:
        """A response that matches no client transaction: a transaction-stateful proxy drops
        it (RFC 6026 section 7.3; 2xx retransmissions reach the TU through the INVITE client
        transaction's Accepted state, Timer M)."""

    def server_transaction_failed(tx: ServerTransaction, reason: Failure) -> None:
        """``tx`` terminated without success: Timer H fired (no ACK came for a non-2xx final;
        ``reason.value`` is a ``TransactionTimeout``) or a response could not be sent (the
        transport's exception)."""
