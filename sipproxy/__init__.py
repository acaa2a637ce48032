"""sipproxy: a Twisted-based SIP edge proxy (NAT traversal, TLS to the provider, media relay)."""

__version__ = "0.1.0"
