"""
The ``twistd sipproxy`` command line: options, and the service built from the config file.

A bad config file ends the command with one line on stderr and exit status 2, never a traceback:
the operator needs the key to fix, not our stack.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.python import usage

from sipproxy.config import ConfigError, load_config

__all__ = ["EXIT_CONFIG_ERROR", "Options", "makeService"]

EXIT_CONFIG_ERROR = 2


class Options(usage.Options):
    """Options of ``twistd sipproxy``."""

    synopsis = "[--config FILE]"
    longdesc = (
        "Run the sipproxy SIP edge proxy. Without --config it listens on 0.0.0.0:5060 "
        "(UDP and TCP) with built-in defaults; see examples/sipproxy.toml for every setting."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: built-in defaults)"],
    ]


def makeService(options: usage.Options) -> IService:
    """Load the config named by the options and build the proxy's service from it."""
    # Imported late: `twistd --help` and option parsing must not import the whole proxy.
    from sipproxy.logs import use_json_log
    from sipproxy.service import makeService as makeProxyService
    from sipproxy.service import tune_garbage_collector

    path = options["config"]
    try:
        config = load_config(path)
        service = makeProxyService(config)  # plugins validate their own sections here
    except ConfigError as e:
        # twistd calls us before it starts logging or daemonizing: stderr is still the terminal.
        # SystemExit passes through twistd untouched, so Python exits with our status, silently.
        sys.stderr.write(f"sipproxy: {e}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    if config.log.format == "json":
        use_json_log(service, options)
    tune_garbage_collector()
    _explain_listen_errors(service)
    return service


def _explain_listen_errors(service: IService) -> None:
    """A socket that cannot be opened (port in use, address not on this host, no permission)
    stops twistd with one line saying which, instead of a traceback."""
    start = service.startService

    def startService() -> None:
        try:
            start()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            sys.stderr.write(
                f"sipproxy: cannot listen on {e.interface or '*'}:{e.port}: {reason}\n"
            )
            sys.stderr.flush()
            raise SystemExit(EXIT_CONFIG_ERROR) from None

    service.startService = startService  # type: ignore[method-assign]
