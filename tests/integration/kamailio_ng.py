"""
Debian's Kamailio as a real NG client: a small stateful, Record-Routing proxy whose
``rtpengine`` module drives a media relay (``rtpengine_offer`` on an INVITE with SDP,
``rtpengine_answer`` on a reply with SDP, ``rtpengine_delete`` on a BYE), so the relay is tested
against the client most SIP deployments use, not only our own.

    kamailio = kamailio_ng(ns, workdir, listen=[(FW_INSIDE, 5060), (FW_OUTSIDE, 5060)],
                           next_hop=(PROVIDER_IP, 5060), ng=("127.0.0.1", 2223))
    kamailio.start()   # ready once it answers an OPTIONS; stop() ends it

Every new INVITE goes to ``next_hop``; in-dialog requests follow their Route headers.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tests.integration.netns import Namespace, NsProxyProcess

__all__ = ["kamailio_config", "kamailio_ng", "kamailio_unavailable", "module_path"]

#: the rtpengine module's flags for every offer and answer: the relay's interfaces by
#: rtpengine's legacy names (internal = the caller's side), and our address in o= and c=
DEFAULT_FLAGS = "direction=internal direction=external replace-origin " \
    "replace-session-connection"


def module_path() -> Path | None:
    """Where Debian keeps Kamailio's modules (the one holding rtpengine.so), or None."""
    candidates = sorted(Path("/usr/lib").glob("*/kamailio/modules"))
    for candidate in [*candidates, Path("/usr/lib/kamailio/modules")]:
        if (candidate / "rtpengine.so").exists():
            return candidate
    return None


def kamailio_unavailable() -> str | None:
    if shutil.which("kamailio") is None:
        return "kamailio is not installed (Debian package kamailio; scripts/test installs it)"
    if module_path() is None:
        return "kamailio's rtpengine module is missing (Debian package kamailio)"
    return None


def kamailio_config(listen: Sequence[tuple[str, int]], next_hop: tuple[str, int],
                    ng: tuple[str, int], flags: str = DEFAULT_FLAGS) -> str:
    listens = "\n".join(f"listen=udp:{host}:{port}" for host, port in listen)
    return f"""#!KAMAILIO
debug=2
log_stderror=yes
fork=yes
children=2
mhomed=1
auto_aliases=no
{listens}
mpath="{module_path()}/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "rtpengine.so"
modparam("rtpengine", "rtpengine_sock", "udp:{ng[0]}:{ng[1]}")
modparam("rtpengine", "rtpengine_tout_ms", 2000)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("OPTIONS") && uri == myself && !has_totag()) {{
        sl_send_reply("200", "OK");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            if (is_method("BYE")) {{
                rtpengine_delete();
            }} else if (is_method("INVITE") && has_body("application/sdp")) {{
                rtpengine_offer("{flags}");
            }}
            t_on_reply("MEDIA");
            t_relay();
            exit;
        }}
        if (is_method("ACK") && t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            rtpengine_delete();
            t_relay();
        }}
        exit;
    }}
    if (!is_method("INVITE")) {{
        sl_send_reply("405", "Method Not Allowed");
        exit;
    }}
    record_route();
    if (has_body("application/sdp")) {{
        rtpengine_offer("{flags}");
    }}
    $du = "sip:{next_hop[0]}:{next_hop[1]}";
    t_on_reply("MEDIA");
    t_on_failure("FAILED");
    t_relay();
}}

onreply_route[MEDIA] {{
    if (has_body("application/sdp")) {{
        rtpengine_answer("{flags}");
    }}
}}

failure_route[FAILED] {{
    rtpengine_delete();
}}
"""


def kamailio_ng(ns: Namespace, workdir: Path, *, listen: Sequence[tuple[str, int]],
                next_hop: tuple[str, int], ng: tuple[str, int],
                flags: str = DEFAULT_FLAGS) -> NsProxyProcess:
    """Kamailio in ``ns`` (not started), its config and output in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "kamailio.cfg"
    cfg.write_text(kamailio_config(listen, next_hop, ng, flags))
    binary = shutil.which("kamailio") or "kamailio"
    return NsProxyProcess(
        ns, {"listen": [{"transport": "udp", "address": host, "port": port}
                        for host, port in listen]},
        workdir, name="kamailio",
        command=[binary, "-f", str(cfg), "-DD", "-E", "-m", "64", "-M", "8"])
