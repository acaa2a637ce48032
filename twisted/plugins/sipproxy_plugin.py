"""
The twistd plugin behind C{twistd sipproxy}.

This directory is part of the C{twisted.plugins} namespace: it must never get an C{__init__.py}.
"""

from twisted.application.service import ServiceMaker

sipproxy = ServiceMaker(
    "sipproxy",
    "sipproxy.tap",
    "SIP edge proxy: registrar, NAT traversal, TLS to the provider, media relay",
    "sipproxy",
)
