"""sipproxy: a Twisted-based SIP edge proxy (NAT traversal, TLS to the provider, media relay)."""

__version__ = "0.1.0"

# before any module of the message layer is imported: its compiled build, or its source when
# that build is missing, stale or SIPPROXY_PURE_PYTHON is set (sipproxy/compiled.py)
from sipproxy.compiled import select as _select_build

_select_build()
