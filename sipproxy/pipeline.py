"""The ordered chain of plugins, and how plugins are found by name."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.config import Config, ConfigError
from sipproxy.context import Branch, RequestContext
from sipproxy.interfaces import IImpliedPluginFactory, IPluginFactory, IProxyCore, IProxyPlugin

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from sipproxy.dialogs import Dialog
    from sipproxy.message import Response

__all__ = [
    "HOOKS",
    "Pipeline",
    "Plugin",
    "find_factory",
    "implied_plugins",
    "implying_factories",
    "load_plugins",
    "then",
]

ENTRY_POINT_GROUP = "sipproxy.plugins"
HOOKS = (
    "request_received",
    "request_forwarding",
    "response_received",
    "response_forwarding",
    "dialog_established",
    "dialog_ended",
)

_log = Logger(namespace="sipproxy.pipeline")


@implementer(IProxyPlugin)
class Plugin:
    """A base with every hook a no-op: a plugin overrides what it needs, and only overridden
    hooks are ever called (so an idle hook costs nothing per message)."""

    name = "plugin"

    def request_received(self, ctx: RequestContext) -> Any:
        return None

    def request_forwarding(self, ctx: RequestContext, branch: Branch) -> Any:
        return None

    def response_received(self, ctx: RequestContext, branch: Branch, response: Response) -> Any:
        return None

    def response_forwarding(self, ctx: RequestContext, response: Response) -> Any:
        return None

    def dialog_established(self, dialog: Dialog) -> None:
        return None

    def dialog_ended(self, dialog: Dialog, reason: str) -> None:
        return None


def _overrides(plugin: object, hook: str) -> bool:
    base = getattr(Plugin, hook)
    impl = getattr(type(plugin), hook, None)
    return impl is not base and callable(getattr(plugin, hook, None))


class Pipeline:
    """Runs one hook across the plugins, stopping at the first that answers.

    ``run`` returns the result directly while every plugin answers synchronously and switches
    to a Deferred only when one returns a Deferred, so the common path pays nothing for the
    asynchronous case.
    """

    def __init__(self, plugins: Sequence[Any] = ()) -> None:
        self.plugins = list(plugins)
        self._by_hook: dict[str, list[Callable[..., Any]]] = {
            hook: [getattr(p, hook) for p in self.plugins if _overrides(p, hook)]
            for hook in HOOKS
        }

    def run(self, hook: str, *args: Any) -> Any:
        """The first non-None result of the hook, or None; a Deferred if a plugin waits."""
        calls = self._by_hook[hook]
        return self._run_from(calls, 0, args) if calls else None

    def _run_from(self, calls: list[Callable[..., Any]], start: int, args: tuple[Any, ...]) -> Any:
        for i in range(start, len(calls)):
            result = calls[i](*args)
            if isinstance(result, Deferred):
                return result.addCallback(self._resume, calls, i + 1, args)
            if result is not None:
                return result
        return None

    def _resume(
        self, result: Any, calls: list[Callable[..., Any]], start: int, args: tuple[Any, ...]
    ) -> Any:
        if result is not None:
            return result
        return self._run_from(calls, start, args)

    def notify(self, hook: str, *args: Any) -> None:
        """Call a notification hook (dialog events) on every plugin; errors are only logged."""
        for call in self._by_hook[hook]:
            try:
                result = call(*args)
                if isinstance(result, Deferred):
                    result.addErrback(_hook_failed, hook, call)
            except Exception:
                _log.failure("plugin hook {hook} raised", hook=hook, plugin=_plugin_of(call))


def _plugin_of(hook: Callable[..., Any]) -> str | None:
    """The name of the plugin whose bound method ``hook`` is (for the log)."""
    return getattr(getattr(hook, "__self__", None), "name", None)


def _hook_failed(failure: Failure, hook: str, call: Callable[..., Any]) -> None:
    _log.failure("plugin hook {hook}", failure, hook=hook, plugin=_plugin_of(call))


def then(result: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to a result that may or may not be a Deferred yet."""
    if isinstance(result, Deferred):
        return result.addCallback(fn)
    return fn(result)


def find_factory(name: str) -> Any:
    """A plugin factory by entry-point name, or by ``"module:attribute"`` path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError.for_key("plugins.enabled", f"cannot load plugin {name!r}: {e}") from e
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    builtin = f"sipproxy.plugins.{name}"
    if not found and name.isidentifier() and importlib.util.find_spec(builtin) is not None:
        return _builtin_factory(builtin)  # a source tree whose package metadata is older
    if not found:
        known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        raise ConfigError.for_key(
            "plugins.enabled",
            f"no plugin named {name!r} is installed (installed: {', '.join(known) or 'none'})",
        )
    try:
        return found[0].load()
    except Exception as e:
        raise ConfigError.for_key("plugins.enabled", f"plugin {name!r} failed to load: {e}") from e


def _builtin_factory(module_name: str) -> Any:
    return importlib.import_module(module_name).factory


@functools.cache
def implying_factories() -> tuple[tuple[str, Any], ...]:
    """
    The plugin factories that provide ``IImpliedPluginFactory``, by name: the installed ones
    (entry points) and the built-in ones (``sipproxy.plugins.*``, also when sipproxy runs from a
    source tree that was never installed: an implied plugin is a safeguard and must not vanish
    with the package metadata). One that fails to load implies nothing (it fails when
    enabled). Loaded once per process (``implying_factories.cache_clear()`` looks again).
    """
    import sipproxy.plugins

    candidates: list[tuple[str, Callable[[], Any]]] = [
        (ep.name, ep.load) for ep in entry_points(group=ENTRY_POINT_GROUP)
    ]
    for module in pkgutil.iter_modules(sipproxy.plugins.__path__, "sipproxy.plugins."):
        short = module.name.rpartition(".")[2]
        candidates.append((short, functools.partial(_builtin_factory, module.name)))
    found: dict[str, Any] = {}
    for name, load in candidates:
        if name in found:
            continue
        try:
            factory = load()
        except Exception:
            continue
        if IImpliedPluginFactory.providedBy(factory):
            found[name] = factory
    return tuple(found.items())


def implied_plugins(config: Config) -> tuple[str, ...]:
    """
    The plugins that run although ``[plugins] enabled`` does not name them: those
    whose factory provides :class:`~sipproxy.interfaces.IImpliedPluginFactory` and whose
    ``implied_by(config)`` is true, e.g. ``acl`` when a listener faces the outside. They run
    first, before the enabled ones; ``[plugins] open_relay = true`` turns them off (the config
    does not call this then).
    """
    return tuple(name for name, factory in implying_factories()
                 if name not in config.plugins and factory.implied_by(config))


def load_plugins(config: Config, core: IProxyCore) -> list[Any]:
    """Build the enabled plugins in config order; each validates its own section."""
    plugins = []
    sections: set[str] = set()
    for name in config.plugins:
        factory = find_factory(name)
        if not IPluginFactory.providedBy(factory) and not hasattr(factory, "build"):
            raise ConfigError.for_key("plugins.enabled", f"{name!r} is not a plugin factory")
        section_name = name.rpartition(":")[2] if ":" in name else name
        section_name = getattr(factory, "name", section_name) if ":" in name else section_name
        sections.add(section_name)
        plugin = factory.build(core, config.section(section_name))
        if not IProxyPlugin.providedBy(plugin):
            raise ConfigError.for_key("plugins.enabled", f"{name!r} built no IProxyPlugin")
        plugins.append(plugin)
    _check_no_unknown_tables(config, sections)
    return plugins


def _check_no_unknown_tables(config: Config, used: set[str]) -> None:
    """A table no enabled or installed plugin owns is a typo (``[limit]``, ``[nta]``): one line
    naming it, as for an unknown key, rather than settings silently ignored."""
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in config.sections:
        if name not in used and name not in installed:
            raise ConfigError(
                config.source, name,
                "unknown table (not a core section, and no plugin of that name is enabled"
                " or installed)",
            )
