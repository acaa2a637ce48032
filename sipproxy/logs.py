"""The proxy's log as JSON lines (``[log] format = "json"``), for ``jq`` and log shippers.

One JSON object per line, nothing else on the line: twisted's own ``jsonFileLogObserver``
starts every record with a record-separator byte (``\\x1e``, RFC 7464), which ``jq`` and most
shippers refuse, and writes every key of the event. Each object has ``time`` (ISO 8601, UTC),
``level``, ``namespace`` and ``text`` (the formatted message, with the traceback of a
failure), and ``call_id``, ``source`` and ``plugin`` when the event has them:

- ``call_id``: the event's ``call_id`` key;
- ``source``: the event's ``source`` key (a :class:`~sipproxy.message.Source` as
  ``host:port``), else its ``refused_source`` (what :class:`~sipproxy.refusals.RefusalLog`
  logs);
- ``plugin``: the event's ``plugin`` key, else ``X`` of a ``sipproxy.plugins.X`` namespace.

:func:`use_json_log` installs it for the command that runs the proxy: ``twist`` (``python -m
twisted sipproxy``) takes it as its log observer factory, so it writes where ``--log-file``
says; ``twistd`` takes it as the application's log observer, writing where twistd would
(``--logfile``, stdout with ``-n``, else ``twistd.log``); with ``--syslog`` twistd's syslog
observer stays.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import IService
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, eventAsText
from twisted.python.logfile import LogFile

__all__ = ["event_as_json_line", "iso_utc", "json_lines_observer", "use_json_log"]

_PLUGIN_NAMESPACE = "sipproxy.plugins."


def _text(value: Any) -> str:
    host, port = getattr(value, "host", None), getattr(value, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(value)


def iso_utc(seconds: float) -> str:
    """A POSIX time as ISO 8601 in UTC, to the millisecond: ``2026-12-05T17:20:01.120Z``."""
    when = datetime.fromtimestamp(seconds, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_json_line(event: LogEvent) -> str:
    """``event`` as one line of JSON, newline included (the fields the module docstring
    lists)."""
    level = event.get("log_level")
    namespace = event.get("log_namespace") or ""
    record: dict[str, Any] = {
        "time": iso_utc(event.get("log_time", 0.0)),
        "level": level.name if level is not None else "info",
        "namespace": namespace,
        "text": eventAsText(event, includeTimestamp=False, includeSystem=False),
    }
    call_id = event.get("call_id")
    if call_id is not None:
        record["call_id"] = _text(call_id)
    source = event.get("source", event.get("refused_source"))
    if source is not None:
        record["source"] = _text(source)
    plugin = event.get("plugin")
    if plugin is None and namespace.startswith(_PLUGIN_NAMESPACE):
        plugin = namespace[len(_PLUGIN_NAMESPACE):].partition(".")[0]
    if plugin is not None:
        record["plugin"] = _text(plugin)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def json_lines_observer(out: IO[Any]) -> FileLogObserver:
    """An observer writing each event to ``out`` as one JSON line (a log observer factory, as
    ``twist`` takes one)."""
    return FileLogObserver(out, event_as_json_line)


def _twistd_log_file(options: Mapping[str, Any]) -> IO[Any] | None:
    """Where twistd would write its log (its ``--logfile``, ``-n`` and ``--syslog`` rules);
    None for syslog."""
    if options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    if name == "-" or (options.get("nodaemon") and not name):
        return sys.stdout
    return LogFile.fromFullPath(name or "twistd.log")


def use_json_log(service: IService, options: Any) -> None:
    """Make the command that runs ``service`` write its log as JSON lines. ``options`` are
    the sub-command's options (``twistd sipproxy``'s or ``twist sipproxy``'s); their
    ``parent`` is the command's own."""
    command = getattr(options, "parent", None)
    if command is None:  # built by other code than twistd or twist: its log is its own
        return
    if "fileLogObserverFactory" in command:  # twist: opens --log-file, asks us to observe it
        command["fileLogObserverFactory"] = json_lines_observer
        return
    if "logfile" not in command:
        return
    out = _twistd_log_file(command)
    if out is None:
        return
    observer = json_lines_observer(out)
    set_parent: Callable[[Any], Any] = service.setServiceParent

    def setServiceParent(parent: Any) -> Any:
        # twistd makes an Application (a Componentized) and uses its ILogObserver, if set
        if hasattr(parent, "setComponent") and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, observer)
        return set_parent(parent)

    service.setServiceParent = setServiceParent  # type: ignore[method-assign]
