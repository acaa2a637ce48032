"""What the relay refuses: the exceptions whose text an NG reply carries as ``error-reason``."""

from __future__ import annotations

__all__ = ["OutOfPorts", "RelayError", "UnknownCall"]


class RelayError(Exception):
    """A command the relay cannot carry out; ``str()`` is the NG ``error-reason``."""


class UnknownCall(RelayError):
    """No call (or no party) with that Call-ID / tag."""


class OutOfPorts(RelayError):
    """Every port pair of the range is taken."""
