"""
The twistd plugin behind C{twistd sipproxy-relay}: the media relay as its own process.

This directory is part of the C{twisted.plugins} namespace: it must never get an C{__init__.py}.
"""

from twisted.application.service import ServiceMaker

sipproxy_relay = ServiceMaker(
    "sipproxy-relay",
    "sipproxy.media.tap",
    "sipproxy media relay (RTP/RTCP, rtpengine NG control protocol)",
    "sipproxy-relay",
)
