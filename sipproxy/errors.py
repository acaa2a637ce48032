"""The one exception the message layer raises for bad input."""

from __future__ import annotations


class ParseError(ValueError):
    """Input that is not a valid SIP message (or part of one).

    Carries the status a proxy should answer a request with, so callers never have to map
    exceptions to responses themselves. For a response that fails to parse there is nobody to
    answer: the caller drops it (``is_response`` tells which case this is, when known).
    """

    def __init__(self, reason: str, status: int = 400, *, is_response: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.is_response = is_response

    def __repr__(self) -> str:
        return f"ParseError({self.reason!r}, status={self.status})"
