"""
An example sipproxy plugin: refuse calls and messages to blocked number prefixes.

Premium-rate and similar numbers ("0900...", "+1900...") are a classic source of toll fraud
from a hijacked phone. This plugin answers an INVITE or MESSAGE whose Request-URI dials such a
number with ``403 Forbidden`` (plus a ``Warning`` and a ``Reason`` saying which prefix matched),
so the request never reaches the provider. Requests it screened and let through get
``X-Screened: sipproxy-blocklist``, so the next hop can tell they were checked.

Enable it and configure it in the proxy's TOML file::

    [plugins]
    enabled = ["examples.blocklist_plugin:factory"]   # its section is [blocklist]

    [blocklist]
    prefixes = ["0900", "+1900", "+49900", "0049900"]  # required: digits, optional leading "+"
    methods = ["INVITE", "MESSAGE"]                    # optional; this is the default

``examples`` must be importable (run from the source tree, or ``PYTHONPATH=.``). A plugin that
lives in its own distribution registers its factory under the ``sipproxy.plugins`` entry-point
group instead, in that distribution's ``setup.cfg``::

    [options.entry_points]
    sipproxy.plugins =
        blocklist = mycompany_sip.blocklist_plugin:factory

and is then enabled by that name, ``enabled = ["blocklist"]``; the entry-point name is also the
name of its config section.

Matching is on the number as dialed: the user part of a ``sip:``/``sips:`` URI or the number of a
``tel:`` URI, with %-escapes decoded, parameters (``;isub=``, ``;phone-context=``) and visual
separators (``-``, ``.``, ``(``, ``)``) removed. No number normalisation is attempted, so list
every form your phones may dial (``0900``, ``+49900``, ``0049900``). Requests inside a dialog
(with a To tag) are not screened: the dialog was screened when it was set up.

On the admin listener (``[admin]``), the plugin shows what it blocked: it provides
:class:`~sipproxy.interfaces.IStatusProvider`, so ``/metrics`` has
``sipproxy_refusals_total{plugin="blocklist",reason="blocked_prefix"}`` and
``sipproxy_blocklist_blocked_total{prefix}``, and ``/api/status`` a ``blocklist`` section
under ``plugins`` (its prefixes and the counts).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.interfaces import IPluginFactory, IProxyCore, IStatusProvider
from sipproxy.message import Request, Response, new_tag
from sipproxy.pipeline import Plugin
from sipproxy.refusals import refusal_metrics
from sipproxy.settings import Section, read_section, setting
from sipproxy.uri import URI, unescape

if TYPE_CHECKING:
    from sipproxy.context import Branch, RequestContext

__all__ = [
    "DEFAULT_METHODS",
    "SCREENED_HEADER",
    "SCREENED_VALUE",
    "BlocklistFactory",
    "BlocklistPlugin",
    "BlocklistSettings",
    "dialed_number",
    "factory",
]

#: Methods screened unless ``methods`` says otherwise: the ones that cost money or spam.
DEFAULT_METHODS: Final = ("INVITE", "MESSAGE")
SCREENED_HEADER: Final = "X-Screened"
SCREENED_VALUE: Final = "sipproxy-blocklist"
#: Warn-agent of the Warning header (RFC 3261 20.43 allows a pseudonym instead of a host).
WARN_AGENT: Final = "sipproxy-blocklist"

# ACK is never answered and CANCEL never reaches the plugins: screening them could only mislead.
_UNSCREENABLE: Final = frozenset({"ACK", "CANCEL"})
_PREFIX = re.compile(r"\+?[0-9]+\Z")
_METHOD = re.compile(r"[A-Z]+\Z")
_VISUAL_SEPARATORS = str.maketrans("", "", "-.() ")
_SCREENED_KEY = "blocklist.screened"

_log = Logger(namespace="sipproxy.examples.blocklist")


def dialed_number(uri: URI) -> str | None:
    """The number a Request-URI dials, as matched against the prefixes, or None if it has none."""
    scheme = uri.scheme.lower()
    if uri.is_sip:
        user = uri.user
    elif scheme == "tel":
        user = uri.opaque
    else:
        return None
    if not user:
        return None
    number = unescape(user).split(";", 1)[0].translate(_VISUAL_SEPARATORS)
    return number or None


@implementer(IStatusProvider)
class BlocklistPlugin(Plugin):
    """Answers 403 to screened requests that dial a blocked prefix; marks the others."""

    name = "blocklist"

    def __init__(self, prefixes: Iterable[str], methods: Iterable[str] = DEFAULT_METHODS) -> None:
        # Longest first, so the Warning names the most specific entry that matched.
        self.prefixes = tuple(sorted(set(prefixes), key=len, reverse=True))
        self.methods = frozenset(methods)
        self.blocked: Counter[str] = Counter()
        """How many requests were refused since start, by the prefix that matched."""

    def blocked_prefix(self, number: str) -> str | None:
        """The configured prefix ``number`` starts with, or None."""
        for prefix in self.prefixes:
            if number.startswith(prefix):
                return prefix
        return None

    def request_received(self, ctx: RequestContext) -> Response | None:
        request = ctx.request
        if request.method not in self.methods or request.to.tag:
            return None
        number = dialed_number(request.uri)
        prefix = self.blocked_prefix(number) if number is not None else None
        if prefix is None:
            ctx.data[_SCREENED_KEY] = True
            return None
        self.blocked[prefix] += 1
        source = request.source
        _log.info(
            "blocked {method} to {number} (prefix {prefix}) from {host}",
            method=request.method,
            number=number,
            prefix=prefix,
            host=f"{source.host}:{source.port}" if source is not None else "?",
        )
        return refusal(request, prefix)

    # -- IStatusProvider: read at scrape time, nothing counted but the refusals themselves
    def metrics(self) -> Iterable[Metric]:
        """Refusals (with every plugin's), and by prefix."""
        by_prefix = CounterMetricFamily(
            "sipproxy_blocklist_blocked", "Requests refused, by the prefix they dialed.",
            labels=["prefix"])
        for prefix in self.prefixes:
            by_prefix.add_metric([prefix], self.blocked[prefix])
        return [refusal_metrics(self.name, {"blocked_prefix": sum(self.blocked.values())}),
                by_prefix]

    def status(self) -> Mapping[str, Any]:
        """The prefixes, and what was blocked."""
        return {"prefixes": list(self.prefixes), "methods": sorted(self.methods),
                "blocked": dict(self.blocked)}

    def request_forwarding(self, ctx: RequestContext, branch: Branch) -> None:
        # Our header must mean "this proxy screened it": a caller must not be able to forge it.
        headers = branch.request.headers
        headers.remove(SCREENED_HEADER)
        if ctx.data.get(_SCREENED_KEY):
            headers.add(SCREENED_HEADER, SCREENED_VALUE)


def refusal(request: Request, prefix: str) -> Response:
    """The 403 for a blocked request: it ends the transaction here, so it carries a To tag."""
    response = request.make_response(403, "Forbidden")
    to = response.to.copy()
    to.tag = new_tag()
    response.set_name_addr("To", to)
    response.headers.add(
        "Warning", f'399 {WARN_AGENT} "Numbers starting with {prefix} are blocked"'
    )
    response.headers.add("Reason", f'SIP;cause=403;text="Blocked number prefix {prefix}"')
    return response


def _prefix(text: str) -> str:
    if not _PREFIX.match(text):
        raise ValueError(f'must be digits with an optional leading "+", got {json.dumps(text)}')
    return text


def _method(text: str) -> str:
    if not _METHOD.match(text):
        raise ValueError(
            f'must be a SIP method in upper case, like "INVITE", got {json.dumps(text)}')
    if text in _UNSCREENABLE:
        raise ValueError(f"{text} cannot be refused; screen the INVITE instead")
    return text


@dataclass(frozen=True, slots=True)
class BlocklistSettings:
    """``[blocklist]``, declared once: ``read_section`` checks every key against this."""

    prefixes: tuple[str, ...] = setting(
        parse=_prefix, allow_empty=False, unique=True,
        doc='Dialed numbers starting with one of these are refused ("+" and digits).')
    methods: tuple[str, ...] = setting(
        DEFAULT_METHODS, parse=_method, allow_empty=False, unique=True,
        doc="The methods screened (upper case).")


@implementer(IPluginFactory)
class BlocklistFactory:
    """Validates ``[blocklist]`` and builds the plugin."""

    name = "blocklist"
    settings = BlocklistSettings

    def build(self, core: IProxyCore, section: Section) -> BlocklistPlugin:
        s = read_section(BlocklistSettings, section)
        return BlocklistPlugin(s.prefixes, s.methods)


#: What ``enabled = ["examples.blocklist_plugin:factory"]`` (or an entry point) names.
factory: Final = BlocklistFactory()
