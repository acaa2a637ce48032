"""How many SIP messages the transports took in and sent out, by method and status code.

Counted on the hot path, so each count is one ``+= 1`` on a list or dict slot: the admin
listener's Prometheus collector (:mod:`sipproxy.admin.metrics`) reads them at scrape time.
Methods are counted under their name when it is one of :data:`COUNTED_METHODS`, else under
``"OTHER"``: a scanner's made-up methods must not grow the table (nor the metrics' labels).
"""

from __future__ import annotations

from typing import Final

__all__ = ["COUNTED_METHODS", "MessageCounts"]

#: The methods counted by name (RFC 3261 and its extensions a proxy sees).
COUNTED_METHODS: Final = (
    "ACK", "BYE", "CANCEL", "INFO", "INVITE", "MESSAGE", "NOTIFY", "OPTIONS", "PRACK",
    "PUBLISH", "REFER", "REGISTER", "SUBSCRIBE", "UPDATE", "OTHER",
)


class MessageCounts:
    """The counts; ``responses_*`` are indexed by status code (100 to 699). Count a method
    with ``try: table[method] += 1`` / ``except KeyError: table["OTHER"] += 1``."""

    __slots__ = ("requests_received", "requests_sent", "responses_received", "responses_sent")

    def __init__(self) -> None:
        self.requests_received: dict[str, int] = dict.fromkeys(COUNTED_METHODS, 0)
        self.requests_sent: dict[str, int] = dict.fromkeys(COUNTED_METHODS, 0)
        self.responses_received: list[int] = [0] * 700
        self.responses_sent: list[int] = [0] * 700

    @staticmethod
    def by_code(table: list[int]) -> dict[int, int]:
        """The status codes counted at least once, with their counts."""
        return {code: n for code, n in enumerate(table) if n}
