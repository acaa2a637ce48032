"""
A real SIP provider for the end-to-end tests: Debian's C{kamailio} (5.6), in a namespace.

L{Kamailio} writes a config (like a small provider's: the shape of Debian's sample
kamailio.cfg with NAT, auth and TLS, no database) and runs it in the foreground (C{-DD -E}),
with its own pid file and runtime directory in the test's directory; L{Kamailio.stop} kills its
whole process group. What the config does:

- registrar for C{domain} (usrloc in memory), digest auth (C{auth} module, passwords from the
  config itself) for REGISTER and for calls from its users; a registering client behind a NAT
  (its Via or Contact does not match where it sent from) is stored with the address it came
  from (nathelper C{fix_nated_register}), so calls reach it over the same UDP mapping or TLS
  connection;
- C{service}: a number (e.g. 600) forwarded to a server (a sipp UAS that echoes RTP);
- calls to its users through C{lookup("location")}; C{peers}: domains forwarded to an address
  (a public proxy's users);
- C{record_route} for every dialog, loose routing inside them;
- a UDP listener, and with C{tls} a TLS listener (C{tls} module, certificate from the test,
  C{tcp_accept_aliases}: an RFC 5923 C{;alias} on a Via makes the connection reusable for the
  Via's address);
- C{trusted}: sources never challenged (a trunk, the provider's own gateways);
- every SIP message it receives is logged whole (L{Kamailio.log_text}): what the provider saw.

L{NgKamailio} is Kamailio as a real NG client instead: a small stateful, Record-Routing proxy
whose C{rtpengine} module drives a media relay (C{rtpengine_offer} on an INVITE with SDP,
C{rtpengine_answer} on a reply with SDP, C{rtpengine_delete} on a BYE), so the relay is tested
against the client most SIP deployments use, not only our own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.support.harness import (
    HarnessError,
    options_probe,
    read_tail,
    wait_started,
)
from tests.integration.support.netns import Namespace

__all__ = ["Kamailio", "NgKamailio", "kamailio_unavailable"]


def _module_dir() -> Path | None:
    """Where Debian keeps kamailio's modules (/usr/lib/<multiarch>/kamailio/modules)."""
    for directory in [*sorted(Path("/usr/lib").glob("*/kamailio/modules")),
                      Path("/usr/lib/kamailio/modules")]:
        if (directory / "tm.so").exists():
            return directory
    return None


def kamailio_unavailable(tls: bool = False, rtpengine: bool = False) -> str | None:
    """Why kamailio (with its tls and rtpengine modules if asked) cannot run here, or None."""
    if shutil.which("kamailio") is None and not Path("/usr/sbin/kamailio").exists():
        return "kamailio is not installed (Debian package kamailio; scripts/test installs it)"
    modules = _module_dir()
    if modules is None:
        return "kamailio's modules are not installed"
    if tls and not (modules / "tls.so").exists():
        return "kamailio's tls module is not installed (Debian package kamailio-tls-modules)"
    if rtpengine and not (modules / "rtpengine.so").exists():
        return "kamailio's rtpengine module is missing (Debian package kamailio)"
    return None


@dataclass
class Kamailio:
    """The provider on C{address} in namespace C{ns}: L{start} writes its config into
    C{workdir} and waits until it answers an OPTIONS; L{stop} ends it and its workers."""

    ns: Namespace
    workdir: Path
    address: str
    domain: str = "provider.test"
    users: Mapping[str, str] = field(default_factory=dict)  # user -> password
    service: tuple[str, str, int] | None = None  # (number, host, port)
    peers: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # domain -> (host, port)
    trusted: Sequence[str] = ()
    tls: tuple[Path, Path] | None = None  # (certificate, key)
    port: int = 5060
    tls_port: int = 5061
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    def config(self) -> str:
        modules = _module_dir()
        assert modules is not None
        load = ["tm", "tmx", "sl", "rr", "pv", "maxfwd", "usrloc", "registrar", "textops",
                "siputils", "xlog", "sanity", "auth", "nathelper", "kex", "corex"]
        if self.tls:
            load.append("tls")
        listen = [f"listen=udp:{self.address}:{self.port}"]
        if self.tls:
            listen.append(f"listen=tls:{self.address}:{self.tls_port}")
        passwords = "\n".join(
            f'    if ($au == "{user}") $var(pw) = "{password}";'
            for user, password in self.users.items())
        trusted = "".join(f"    if (src_ip == {ip}) return;\n" for ip in self.trusted)
        service = ""
        if self.service:
            number, host, port = self.service
            service = (f'    if (uri == myself && $rU == "{number}") {{\n'
                       f'        $du = "sip:{host}:{port}";\n'
                       "        route(RELAY);\n    }\n")
        peers = "".join(
            f'    if ($rd == "{domain}") {{ $du = "sip:{host}:{port}"; route(RELAY); }}\n'
            for domain, (host, port) in self.peers.items())
        tls_params = ""
        if self.tls:
            tls_params = f'modparam("tls", "config", "{self.workdir / "tls.cfg"}")\n'
        return f"""#!KAMAILIO
debug=2
log_stderror=yes
fork=yes
children=2
tcp_children=2
auto_aliases=no
alias="{self.domain}"
{chr(10).join(listen)}
enable_tls={"yes" if self.tls else "no"}
tcp_accept_aliases=yes
tcp_connection_lifetime=3605
mpath="{modules}/"
{chr(10).join(f'loadmodule "{m}.so"' for m in load)}
modparam("usrloc", "db_mode", 0)
modparam("rr", "enable_full_lr", 1)
modparam("registrar", "max_expires", 3600)
modparam("nathelper|registrar", "received_avp", "$avp(RECEIVED)")
{tls_params}
request_route {{
    xlog("L_NOTICE", "SIP from $si:$sp ($pr):\n$mb\n");
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (!sanity_check("17895", "7")) exit;
    force_rport();
    if (nat_uac_test("19")) {{
        if (is_method("REGISTER")) fix_nated_register();
        setflag(5);
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) route(RELAY);
        exit;
    }}
    if (!is_method("ACK")) {{
        if (t_precheck_trans()) {{
            t_check_trans();
            exit;
        }}
        t_check_trans();
    }}
    route(WITHINDLG);
    remove_hf("Route");
    if (is_method("INVITE|SUBSCRIBE")) record_route();
    route(AUTH);
    if (is_method("REGISTER")) {{
        if (!save("location")) sl_reply_error();
        exit;
    }}
{service}{peers}    if (uri == myself) {{
        if (!lookup("location")) {{
            sl_send_reply("404", "Not Found");
            exit;
        }}
        route(RELAY);
    }}
    sl_send_reply("403", "Not relaying");
    exit;
}}

onreply_route {{
    xlog("L_NOTICE", "SIP from $si:$sp ($pr):\n$mb\n");
}}

route[RELAY] {{
    if (!t_relay()) sl_reply_error();
    exit;
}}

route[WITHINDLG] {{
    if (!has_totag()) return;
    if (loose_route()) {{
        if (!isdsturiset()) handle_ruri_alias();
        route(RELAY);
    }}
    if (is_method("ACK")) {{
        if (t_check_trans()) route(RELAY);
        exit;
    }}
    sl_send_reply("404", "Not here");
    exit;
}}

route[AUTH] {{
{trusted}    if (!is_method("REGISTER") && !(from_uri == myself)) return;
    $var(pw) = "";
{passwords}
    if ($var(pw) == "" || !pv_auth_check("{self.domain}", "$var(pw)", "0", "1")) {{
        auth_challenge("{self.domain}", "1");
        exit;
    }}
    consume_credentials();
}}
"""

    def tls_config(self) -> str:
        assert self.tls is not None
        cert, key = self.tls
        return (f"[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\n"
                f"require_certificate = no\ncertificate = {cert}\nprivate_key = {key}\n\n"
                "[client:default]\nmethod = TLSv1.2+\nverify_certificate = no\n"
                "require_certificate = no\n")

    def start(self, timeout: float = 15.0) -> Kamailio:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "run").mkdir(exist_ok=True)
        config = self.workdir / "kamailio.cfg"
        config.write_text(self.config())
        if self.tls:
            (self.workdir / "tls.cfg").write_text(self.tls_config())
        check = self.ns.run("kamailio", "-c", "-f", str(config), check=False)
        if check.returncode != 0:
            raise HarnessError(f"kamailio -c refuses {config}:\n{check.stdout}{check.stderr}")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*self.ns.prefix(), "kamailio", "-DD", "-E", "-f", str(config),
                 "-P", str(self.workdir / "kamailio.pid"), "-Y", str(self.workdir / "run"),
                 "-w", str(self.workdir), "-m", "64", "-M", "8"],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            with self.ns.entered():
                return options_probe(self.address, self.port) is not None

        if wait_started(self.process, "kamailio", answers, timeout, self.log_tail):
            return self
        self.stop()
        raise HarnessError(f"kamailio did not answer within {timeout} s\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to its process group (it forks workers), SIGKILL if it lingers."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # its workers may outlive the main process a moment: they are in its group
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        """Its log: every SIP message it received is in it, whole (C{xlog} of C{$mb})."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return f"--- kamailio log ({self.log_path}) ---\n{read_tail(self.log_path, lines)}"


#: the rtpengine module's flags for every offer and answer: the relay's interfaces by
#: rtpengine's legacy names (internal = the caller's side), and our address in o= and c=
NG_FLAGS = "direction=internal direction=external replace-origin replace-session-connection"


@dataclass
class NgKamailio(Kamailio):
    """Kamailio on C{address} (and C{also_listen}) driving the relay at C{ng} over NG: every new
    INVITE goes to C{next_hop}, in-dialog requests follow their Route headers.

        kamailio = NgKamailio(ns, workdir, FW_INSIDE, also_listen=[(FW_OUTSIDE, 5060)],
                              next_hop=(PROVIDER_IP, 5060), ng=("127.0.0.1", 2223)).start()
    """

    also_listen: Sequence[tuple[str, int]] = ()
    next_hop: tuple[str, int] = ("127.0.0.1", 5060)
    ng: tuple[str, int] = ("127.0.0.1", 2223)
    flags: str = NG_FLAGS

    def config(self) -> str:
        listens = "\n".join(f"listen=udp:{host}:{port}"
                            for host, port in [(self.address, self.port), *self.also_listen])
        flags = self.flags
        return f"""#!KAMAILIO
debug=2
log_stderror=yes
fork=yes
children=2
mhomed=1
auto_aliases=no
{listens}
mpath="{_module_dir()}/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "rtpengine.so"
modparam("rtpengine", "rtpengine_sock", "udp:{self.ng[0]}:{self.ng[1]}")
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
    $du = "sip:{self.next_hop[0]}:{self.next_hop[1]}";
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
