"""The firewall set-up of the nat plugin's tests (and the media plugin's, on top of it): the
proxy's inside and outside addresses, the phone, the provider, and the config."""

from __future__ import annotations

from sipproxy.message import Source

INSIDE = "192.168.77.1"
OUTSIDE = "203.0.113.1"
PROVIDER_IP = "203.0.113.50"
PHONE = Source("UDP", "192.168.77.10", 5062, INSIDE, 5060, "inside")
PROVIDER = Source("UDP", PROVIDER_IP, 5060, OUTSIDE, 5060, "outside")
PHONE_CONTACT = "sip:alice@192.168.77.10:5060"
PHONE_VIA = "SIP/2.0/UDP 192.168.77.10:5060;rport;branch="
FIREWALL = f"""
[proxy]
domains = []
user_agent = "sipproxy-test"

[[listen]]
side = "inside"
transport = "udp"
address = "{INSIDE}"
port = 5060

[[listen]]
side = "outside"
transport = "udp"
address = "{OUTSIDE}"
port = 5060

[upstream]
uri = "sip:{PROVIDER_IP}:5060"

[plugins]
enabled = ["nat"]

[nat]
inside_networks = ["192.168.77.0/24"]
"""
