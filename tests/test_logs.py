"""[log] format = "json": every event is one line of plain JSON (no record separator), with
the call's Call-ID, the source and the plugin as fields when the event has them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.scripts.twistd import ServerOptions

from sipproxy.logs import event_as_json_line
from sipproxy.message import Source
from sipproxy.pipeline import Pipeline, Plugin
from sipproxy.tap import makeService
from sipproxy.testing import ProxyHarness, listen_toml, sip_request
from tests.nat_site import OUTSIDE, PROVIDER, PROVIDER_IP


def events_of(emit: Any) -> list[dict[str, Any]]:
    """The events a Logger emits while ``emit(log)`` runs."""
    events: list[dict[str, Any]] = []
    emit(Logger(namespace="sipproxy.plugins.nat.keepalive", observer=events.append))
    return events


def line_of(event: dict[str, Any]) -> dict[str, Any]:
    line = event_as_json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1 and "\x1e" not in line
    record: dict[str, Any] = json.loads(line)
    return record


def test_an_event_is_one_line_with_its_call_source_and_plugin() -> None:
    source = Source("UDP", "192.168.1.20", 5062, side="inside")
    [event] = events_of(lambda log: log.warn("refused {method}\nfrom {source}", method="INVITE",
                                             source=source, call_id="abc@phone"))
    event["log_time"] = 1_780_000_000.25
    assert line_of(event) == {
        "time": "2026-05-28T20:26:40.250Z", "level": "warn",
        "namespace": "sipproxy.plugins.nat.keepalive",
        "text": f"refused INVITE\nfrom {source}", "call_id": "abc@phone",
        "source": "192.168.1.20:5062", "plugin": "nat",
    }


def test_a_failure_carries_its_traceback_and_a_refusal_its_source() -> None:
    def fail(log: Logger) -> None:
        try:
            raise ValueError("bad header")
        except ValueError:
            log.failure("handling a request", plugin="acl")
        log.info("refused from {refused_source}", refused_source="2001:db8::1")

    failure, refusal = map(line_of, events_of(fail))
    assert failure["level"] == "critical" and failure["plugin"] == "acl"
    assert "handling a request" in failure["text"] and "ValueError: bad header" in failure["text"]
    assert refusal["source"] == "2001:db8::1" and "call_id" not in refusal


def test_the_proxy_logs_a_refused_call_with_its_call_id_source_and_plugin() -> None:
    """acl refuses a call from the outside to a foreign domain: the log line says which call,
    from where, and which plugin refused it."""
    config = f"""
[proxy]
domains = ["lan.example"]
{listen_toml(outside=OUTSIDE, transport=None)}"""
    harness = ProxyHarness.build(config)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        harness.receive(sip_request(
            "INVITE", "sip:+4930123@elsewhere.example",
            via=f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch=z9hG4bKrelay", from_="<sip:x@y>;tag=1",
            to="<sip:+4930123@elsewhere.example>", call_id="relay-attempt@scanner"), PROVIDER)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [refusal] = [line_of(e) for e in events if e.get("log_level") == LogLevel.info
                 and "relaying denied" in line_of(e)["text"]]
    assert (refusal["call_id"], refusal["source"], refusal["plugin"]) \
        == ("relay-attempt@scanner", PROVIDER_IP, "acl")


def test_twistd_writes_json_lines_where_its_logfile_option_says(tmp_path: Path) -> None:
    config = tmp_path / "sipproxy.toml"
    config.write_text('[[listen]]\naddress = "127.0.0.1"\nport = 0\n[log]\nformat = "json"\n')
    log_file = tmp_path / "twistd.log"
    options = ServerOptions()
    options.parseOptions(["--logfile", str(log_file), "sipproxy", "--config", str(config)])
    service = makeService(options.subOptions)
    application = Application("sipproxy")  # as twistd makes it from the service
    service.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is not None
    Logger(namespace="sipproxy.test", observer=observer).info("hello {who}", who="jq")
    [record] = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (record["namespace"], record["text"]) == ("sipproxy.test", "hello jq")


def test_text_format_leaves_twistds_log_alone(tmp_path: Path) -> None:
    config = tmp_path / "sipproxy.toml"
    config.write_text('[[listen]]\naddress = "127.0.0.1"\nport = 0\n')
    options = ServerOptions()
    options.parseOptions(["--logfile", str(tmp_path / "twistd.log"), "sipproxy",
                          "--config", str(config)])
    application = Application("sipproxy")
    makeService(options.subOptions).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None


def test_a_failing_plugin_hook_is_logged_with_the_plugins_name() -> None:
    class Broken(Plugin):
        name = "broken"

        def dialog_ended(self, dialog: Any, reason: str) -> None:
            raise RuntimeError("oops")

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        Pipeline([Broken()]).notify("dialog_ended", None, "bye")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [failure] = [line_of(e) for e in events if "log_failure" in e]
    assert failure["plugin"] == "broken" and "RuntimeError: oops" in failure["text"]
