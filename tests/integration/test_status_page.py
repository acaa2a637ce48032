"""
The live status page (``/`` of ``[admin]``) in a real browser, against a real proxy.

Headless Chromium (tests/integration/support/browser.py) opens the page of a proxy on
127.0.0.1 with the ``media`` plugin, a flood guard and an ``[admin] token`` (given as the
password in the address, as a user would type it: the page's own requests must carry it
without putting it in their URL); then, while the page stays loaded (it is never reloaded):

- a source (127.0.0.2, not exempt) floods the proxy and is banned: its row appears;
- a phone (sipp) registers: its row shows the AOR, where the phone is, the transport, the
  time left and its User-Agent, which is markup and shown as text (nothing injected);
- a caller (sipp) calls the phone through the proxy; both play G.711 RTP through the relay, the
  phone for 2 s only: the call row appears within 2 s, its packet counts rise, and once the
  phone has been silent for a while its direction (alone) is flagged red;
- the caller hangs up (BYE): the row is gone within 2 s;
- the proxy stops: the page says it is offline.

"Within 2 s" is measured two ways: against the test's own clock from the moment the proxy's
API (``/api/status``, the page's source) shows the change, and, for the BYE, from sipp's
exit. At 400 px wide (a phone) nothing scrolls sideways. Screenshots (phone and desktop width,
or ``failure.png`` when the test fails) are saved as artifacts in
``$SIPPROXY_ARTIFACTS/status_page/``, else in the test's tmp_path; their paths are printed in
the test output.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support.browser import (
    artifacts_dir,
    browser_unavailable,
    chromium,
    resize,
)
from tests.integration.support.harness import (
    LOOPBACK,
    SCENARIOS,
    ProxyProcess,
    Sipp,
    free_port,
)
from tests.integration.support.rtp import callee_scenario, write_rtp_pcap

FLOODER = "127.0.0.2"
#: what a phone says it is: markup, which the page must show as text
USER_AGENT = '<b id="injected">Phone</b><script>document.title = "x"</script>'
TOKEN = "status-page-test"
BAN_TIME = 120
DOMAIN = "lan.example"
AOR = f"sip:alice@{DOMAIN}"
#: the caller's RTP lasts the whole call; the phone's stops after PHONE_RTP seconds
CALL_SECONDS = 10.0
PHONE_RTP = 2.0
#: the page's own threshold (status.js SILENT_AFTER) for flagging a direction silent
SILENT_AFTER = 3.0
#: the page lags the API by at most its poll period (1 s); what the issue asks is 2 s
MAX_LAG = 2.0
PHONE_WIDTH = 400
#: the page's colour for trouble (status.css --bad, light scheme), as red, green, blue
RED = (198, 40, 40)


@pytest.fixture
def browser() -> Iterator[Any]:
    reason = browser_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with chromium(PHONE_WIDTH, 900) as driver:
        yield driver


def config(sip_port: int, admin_port: int) -> dict[str, Any]:
    return {
        "proxy": {"domains": [DOMAIN]},
        "listen": [{"side": "inside", "transport": "udp", "address": LOOPBACK, "port": sip_port}],
        "plugins": {"enabled": ["media"]},
        # userspace relay: the kernel fast path's counters are read every 2 s, which would
        # make "rising" coarse; its own tests are test_media_kernel_netns.py
        "media": {"kernel": False},
        "limits": {
            "exempt": [f"{LOOPBACK}/32"],  # the sipp phones; 127.0.0.2 is not exempt
            "messages_per_second": 20,
            "burst": 40,
            "ban_time": BAN_TIME,
        },
        "admin": {"address": LOOPBACK, "port": admin_port, "token": TOKEN},
    }


# --- what the page shows ------------------------------------------------------------------------

#: every row of a section as the user sees it: its cells' text (and, for calls, each media
#: direction's text, whether it is flagged silent and its colour)
_READ = """
const rows = [];
for (const tr of document.querySelectorAll("#" + arguments[0] + " tbody tr")) {
  rows.push({
    cells: Array.from(tr.children, (td) => td.innerText.trim()),
    streams: Array.from(tr.querySelectorAll(".stream"), (s) => ({
      direction: s.dataset.direction,
      text: s.innerText,
      packets: s.querySelector(".packets").innerText,
      silent: s.classList.contains("silent"),
      color: getComputedStyle(s).color,
    })),
  });
}
return rows;
"""


def rows(driver: Any, section: str) -> list[dict[str, Any]]:
    return list(driver.execute_script(_READ, section))


def packets(text: str) -> int:
    """"1,520 packets" -> 1520"""
    return int(text.split()[0].replace(",", ""))


def rgb(css: str) -> tuple[int, ...]:
    """"rgb(198, 40, 40)" (or rgba) -> (198, 40, 40)"""
    return tuple(int(float(n)) for n in css[css.index("(") + 1:-1].split(",")[:3])


def api(admin: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{admin}/api/status",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=2) as response:
        return dict(json.load(response))


def until(check: Callable[[], Any], limit: float, what: str, page: Any) -> Any:
    """Poll ``check`` every 0.05 s until it returns something true (returned) or ``limit``
    seconds are over (fail, saying ``what`` with what the page shows)."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {limit} s; the page shows: "
                        f"{page.find_element('tag name', 'main').text}")
        time.sleep(0.05)


def lag(admin: str, driver: Any, in_api: Callable[[dict[str, Any]], bool],
        on_page: Callable[[], bool], limit: float, what: str) -> float:
    """Seconds from the moment the API first shows a change (``in_api``) until the page does
    (``on_page``): both polled in turn, every 0.05 s, for at most ``limit`` s."""
    deadline = time.monotonic() + limit
    seen_in_api: float | None = None
    while time.monotonic() < deadline:
        if seen_in_api is None and in_api(api(admin)):
            seen_in_api = time.monotonic()
        if on_page():
            return time.monotonic() - (seen_in_api or time.monotonic())
        time.sleep(0.05)
    pytest.fail(f"{what}: the page did not show it within {limit} s (API at "
                f"{seen_in_api}); it shows: {driver.find_element('tag name', 'main').text}")


def ban(source: str, target: tuple[str, int], count: int = 300) -> None:
    """Garbage datagrams from ``source``, more than the flood guard's burst."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for i in range(count):
            s.sendto(b"garbage %d" % i, target)


def page_width(driver: Any) -> tuple[int, int]:
    """(the page's width, the viewport's): wider means a sideways scroll."""
    scroll, client = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    return int(scroll), int(client)


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """A line in the test run's output, also when the test passes."""
    with capsys.disabled():
        print(f"\n{text}")


def screenshot(driver: Any, directory: Path, name: str,
               capsys: pytest.CaptureFixture[str]) -> Path:
    path = directory / f"{name}.png"
    driver.save_screenshot(str(path))
    say(capsys, f"status page screenshot: {path}")
    return path


@contextmanager
def screenshot_on_failure(driver: Any, directory: Path,
                          capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """What the page showed when the test failed, as ``failure.png``."""
    try:
        yield
    except BaseException:
        try:
            screenshot(driver, directory, "failure", capsys)
        except Exception as e:  # the browser itself failed: the original error matters
            say(capsys, f"status page: no failure screenshot ({e!r})")
        raise


# --- the test ----------------------------------------------------------------------------------


def test_status_page_live_in_a_browser(proxy_factory, sipp: Sipp, browser: Any, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    artifacts = artifacts_dir(tmp_path, "status_page")
    sip_port, admin_port, phone_port = free_port(), free_port(), free_port()
    proxy: ProxyProcess = proxy_factory(config(sip_port, admin_port))
    target = proxy.address("udp")
    admin = f"http://{LOOPBACK}:{admin_port}"

    with screenshot_on_failure(browser, artifacts, capsys):
        browser.get(f"http://admin:{TOKEN}@{LOOPBACK}:{admin_port}/")
        browser.execute_script("window.loadedOnce = true")  # gone if the page were reloaded
        until(lambda: "live" in browser.find_element("id", "connection").text, 5,
              "the page says it is live", browser)
        listeners = rows(browser, "listeners")
        # (advertised: the address it names in Via and Record-Route, its own here)
        assert [r["cells"] for r in listeners] == [
            ["UDP", f"{LOOPBACK}:{sip_port}", "inside", LOOPBACK]]
        plugins = browser.find_element("id", "plugins").text
        assert "media" in plugins, plugins

        # a source floods the proxy and is banned
        ban(FLOODER, target)
        banned = lag(admin, browser, lambda s: any(b["source"] == FLOODER for b in s["bans"]),
                     lambda: any(r["cells"][0] == FLOODER for r in rows(browser, "bans")),
                     5, "the banned source")
        assert banned <= MAX_LAG, banned
        [row] = rows(browser, "bans")
        assert row["cells"][1], row  # a reason
        assert row["cells"][2].endswith(" s") and "min" in row["cells"][2], row  # ~2 min left

        # a phone registers (with a User-Agent that is markup)
        register = sipp.run_uac(register_scenario(tmp_path), target, local_port=phone_port,
                                timeout=10, keys={
                                    "user": "alice", "domain": DOMAIN,
                                    "contact": f"sip:alice@{LOOPBACK}:{phone_port}",
                                    "expires": "3600"})
        assert register.ok(1), register.describe()
        registered = lag(admin, browser, lambda s: any(r["aor"] == AOR for r in s["registrations"]),
                         lambda: any(r["cells"][0] == AOR for r in rows(browser, "registrations")),
                         5, "the registration")
        assert registered <= MAX_LAG, registered
        [row] = rows(browser, "registrations")
        _, contact, phone_at, transport, expires_in, user_agent = row["cells"]
        assert contact == f"sip:alice@{LOOPBACK}:{phone_port}", row
        assert (phone_at, transport) == (f"{LOOPBACK}:{phone_port}", "UDP"), row
        assert expires_in.startswith(("59 min", "1 h 0 min")), row
        assert user_agent == USER_AGENT, row
        assert browser.find_elements("id", "injected") == [], "the User-Agent became markup"

        # the phone answers and plays 2 s of RTP; the caller plays RTP for the whole call
        write_rtp_pcap(sipp.workdir / "audio.pcap", CALL_SECONDS + 2)
        write_rtp_pcap(tmp_path / "phone.pcap", PHONE_RTP)
        phone = sipp.start_uas(phone_scenario(tmp_path, tmp_path / "phone.pcap"), phone_port,
                               count=1, timeout=30)
        caller = sipp.start_uac("uac_audio.xml", target, count=1, timeout=30,
                                call_duration_ms=int(CALL_SECONDS * 1000),
                                keys={"ruri": AOR, "caller": "bob"})

        def call_rows() -> list[dict[str, Any]]:
            return rows(browser, "calls")

        appeared = lag(admin, browser, lambda s: bool(s["calls"]), lambda: bool(call_rows()),
                       5, "the call")
        assert appeared <= MAX_LAG, appeared
        [call] = call_rows()
        assert call["cells"][0].startswith("sip:bob@") and call["cells"][1] == AOR, call
        assert call["cells"][2] == "established" and call["cells"][3].endswith(" s"), call

        def media() -> dict[str, dict[str, Any]]:
            """The call's media directions as shown, once both have packets (else {})."""
            found = call_rows()
            shown = {s["direction"]: s for s in found[0]["streams"]} if found else {}
            return shown if len(shown) == 2 and all(packets(s["packets"]) for s in shown.values()) \
                else {}

        both = until(media, 3, "packets in both directions", browser)
        assert set(both) == {"caller->callee", "callee->caller"}, both
        first = packets(both["caller->callee"]["packets"])
        until(lambda: media() and packets(media()["caller->callee"]["packets"]) > first + 25, 2.5,
              "the caller's packet count rising", browser)

        # the phone went quiet after 2 s: its direction alone is flagged (red), the caller's not
        def phone_flagged() -> dict[str, dict[str, Any]]:
            shown = media()
            return shown if shown and shown["callee->caller"]["silent"] else {}

        flagged = until(phone_flagged, PHONE_RTP + SILENT_AFTER + MAX_LAG + 1,
                        "the silent direction flagged", browser)
        assert rgb(flagged["callee->caller"]["color"]) == RED, flagged
        # said, not only shown in red
        assert flagged["callee->caller"]["text"].endswith("\nSILENT"), flagged
        caller_side = flagged["caller->callee"]
        assert not caller_side["silent"] and "SILENT" not in caller_side["text"], flagged
        assert rgb(caller_side["color"]) != RED, flagged
        assert caller.running(), "the call ended before the page showed all of it"

        scroll_width, width = page_width(browser)
        assert scroll_width <= width == PHONE_WIDTH, (scroll_width, width)
        phone_shot = screenshot(browser, artifacts, "phone", capsys)
        resize(browser, 1280, 900)
        desktop_shot = screenshot(browser, artifacts, "desktop", capsys)
        resize(browser, PHONE_WIDTH, 900)

        # the caller hangs up: the row is gone within 2 s of its BYE's 200 (sipp's exit)
        result = caller.wait()
        hung_up = time.monotonic()
        assert result.ok(1), result.describe()
        gone = lag(admin, browser, lambda s: not s["calls"], lambda: not call_rows(), 5,
                   "the call's end")
        after_bye = time.monotonic() - hung_up
        assert gone <= MAX_LAG and after_bye <= MAX_LAG, (gone, after_bye)
        assert phone.wait(10).ok(1)

        assert browser.execute_script("return window.loadedOnce") is True, "the page was reloaded"
        assert [r["cells"][0] for r in rows(browser, "registrations")] == [AOR]
        assert [r["cells"][0] for r in rows(browser, "bans")] == [FLOODER]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        assert phone_shot.stat().st_size > 0 and desktop_shot.stat().st_size > 0

        # the proxy stops: the page says so (in red), within its request timeout and a poll
        proxy.stop()
        until(lambda: "offline" in browser.find_element("id", "connection").text, 8,
              "the page says the proxy is offline", browser)
        assert rgb(browser.find_element("id", "connection").value_of_css_property("color")) == RED
        say(capsys, f"status page: ban shown {banned:.2f} s, registration {registered:.2f} s, "
            f"call {appeared:.2f} s, hang-up {gone:.2f} s after the API ({after_bye:.2f} s "
            f"after sipp's BYE); whole test {time.monotonic() - started:.1f} s")


def register_scenario(directory: Path) -> Path:
    """scenarios/register.xml with :data:`USER_AGENT`."""
    path = directory / "register_ua.xml"
    text = (SCENARIOS / "register.xml").read_text()
    path.write_text(text.replace("Max-Forwards: 70", f"User-Agent: {USER_AGENT}\n"
                                 "      Max-Forwards: 70", 1))
    return path


def phone_scenario(directory: Path, pcap: Path) -> Path:
    """The callee of rtp.callee_scenario (PCMU), which also plays ``pcap`` once it is
    answered."""
    path = callee_scenario(directory / "phone.xml")
    ack = '<recv request="ACK" crlf="true"/>'
    text = path.read_text()
    path.write_text(text.replace(ack, f'{ack}\n  <nop><action><exec play_pcap_audio="{pcap}"/>'
                                      "</action></nop>", 1))
    return path
