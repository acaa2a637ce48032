"""Helpers for the integration tests: network namespaces, the real proxy process, and the real
peers (sipp, kamailio, baresip, linphone, TLS peers, RTP endpoints) the tests run against.

Test modules import from here; no test module imports another as a library.
"""
