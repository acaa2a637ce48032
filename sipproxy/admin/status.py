"""
The proxy's live state as JSON-able dicts: what ``/api/status`` (and the status page) shows.

Everything is read from the live objects at request time (nothing is counted on the hot path).
Times are seconds (floats unless said), addresses ``host:port`` (IPv6 as ``[addr]:port``).

The contract of the JSON API (``sipproxy.admin.api``), each endpoint a ``GET`` returning
``application/json``::

    GET /api/status -> {
        "now": 1733419200.5,                  # the proxy's clock (Unix time)
        "registrations": [Registration, ...],
        "calls": [Call, ...],
        "bans": [Ban, ...],
        "listeners": [Listener, ...],
        "plugins": [Plugin, ...],
    }
    GET /api/registrations -> {"now": ..., "registrations": [...]}
    GET /api/calls         -> {"now": ..., "calls": [...]}
    GET /api/bans          -> {"now": ..., "bans": [...]}
    GET /api/listeners     -> {"now": ..., "listeners": [...]}
    GET /api/plugins       -> {"now": ..., "plugins": [...]}

    Registration = {
        "aor": "sip:alice@example.com",
        "contact": "sip:alice@203.0.113.5:5060;...",  # the contact as the provider (the
                                                       # upstream) sees it: rewritten by the
                                                       # nat plugin, else as registered
        "source": "192.168.1.20:5060",        # the phone's real address (where the REGISTER
                                              # came from); null if unknown
        "transport": "udp",                   # "udp" | "tcp" | "tls" (lower case)
        "expires_in": 3597,                   # whole seconds left (int, >= 0)
        "user_agent": "Yealink ..." | null,
    }
    Call = {
        "call_id": "a84b4c76e66710",
        "from": "sip:alice@example.com",      # From URI of the INVITE, without the tag
        "to": "sip:bob@example.com",          # To URI of the INVITE, without the tag
        "state": "established",               # "established" (a 2xx set up the dialog)
        "duration": 12.5,                     # seconds since the dialog was set up
        "media": [Media, ...],                # [] when the proxy relays no media for it
    }
    Media = {                                 # one per direction and media line (RTP only)
        "direction": "caller->callee",        # "caller->callee" | "callee->caller"
        "media": "audio",                     # the m= line's type
        "packets": 1520,                      # relayed so far (userspace + kernel)
        "bytes": 261440,
        "path": "userspace",                  # "userspace" | "kernel" (nftables fast path)
        "last_packet_age": 0.02,              # seconds since the last packet; null: none yet
    }
    Ban = {
        "source": "198.51.100.7",             # the banned IP
        "reason": "over 20 messages/s (burst 40)",
        "time_left": 287.4,                   # seconds until the ban ends
    }
    Listener = {"transport": "udp", "address": "0.0.0.0", "port": 5060,
                "side": "inside", "advertised": "192.168.1.1"}
    Plugin = {
        "name": "nat",
        "status": {...} | null,               # the plugin's own section (IStatusProvider)
    }

A plugin that provides :class:`sipproxy.interfaces.IStatusProvider` adds its section under its
``Plugin`` entry; keys the page does not know are shown as a generic table.
"""
