"""The plugin pipeline: hook order, short-circuits, Deferreds, notifications, and finding plugins.

How the proxy acts on what the pipeline returns (500 for a raising hook, DROP...) is tested in
test_proxy.py; here the pipeline is driven on its own.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from sipproxy import pipeline as pipeline_module
from sipproxy.config import ConfigError, Section, parse_config
from sipproxy.interfaces import DROP, IPluginFactory, IProxyPlugin
from sipproxy.pipeline import HOOKS, Pipeline, Plugin, find_factory, load_plugins, then


class Recorder(Plugin):
    """Answers ``answer`` from request_received and records every call in ``log``."""

    def __init__(self, name: str, log: list[str], answer: Any = None) -> None:
        self.name = name
        self.log = log
        self.answer = answer

    def request_received(self, ctx: Any) -> Any:
        self.log.append(self.name)
        return self.answer


@implementer(IProxyPlugin)
class Bare:
    """Not a Plugin subclass: every hook it defines is called."""

    name = "bare"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def request_received(self, ctx: Any) -> Any:
        self.calls.append("request_received")

    def request_forwarding(self, ctx: Any, branch: Any) -> Any:
        self.calls.append("request_forwarding")

    def response_received(self, ctx: Any, branch: Any, response: Any) -> Any:
        self.calls.append("response_received")

    def response_forwarding(self, ctx: Any, response: Any) -> Any:
        self.calls.append("response_forwarding")

    def dialog_established(self, dialog: Any) -> None:
        self.calls.append("dialog_established")

    def dialog_ended(self, dialog: Any, reason: str) -> None:
        self.calls.append("dialog_ended")


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------
def test_empty_pipeline_answers_none() -> None:
    p = Pipeline()
    assert p.run("request_received", object()) is None
    assert p.run("response_received", None, None, None) is None


def test_plugins_run_in_order_until_one_answers() -> None:
    log: list[str] = []
    answer = object()
    p = Pipeline([Recorder("a", log), Recorder("b", log, answer), Recorder("c", log)])
    assert p.run("request_received", object()) is answer
    assert log == ["a", "b"]


def test_drop_is_an_answer_like_any_other() -> None:
    class Dropper(Plugin):
        def response_received(self, ctx: Any, branch: Any, response: Any) -> Any:
            return DROP

    class Never(Plugin):
        def response_received(self, ctx: Any, branch: Any, response: Any) -> Any:
            raise AssertionError("after DROP nothing runs")

    assert Pipeline([Dropper(), Never()]).run("response_received", 1, 2, 3) is DROP


def run_every_hook(p: Pipeline) -> None:
    p.run("request_received", None)
    p.run("request_forwarding", None, None)
    p.run("response_received", None, None, None)
    p.run("response_forwarding", None, None)
    p.notify("dialog_established", None)
    p.notify("dialog_ended", None, "bye")


def test_only_overridden_hooks_are_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """The base's no-op hooks are never called: an idle hook costs nothing per message."""
    called: list[str] = []
    for hook in HOOKS:
        monkeypatch.setattr(Plugin, hook, lambda self, *args, _hook=hook: called.append(_hook))
    log: list[str] = []
    p = Pipeline([Recorder("a", log)])
    run_every_hook(p)
    assert (log, called) == (["a"], [])


def test_a_plugin_that_is_no_subclass_gets_every_hook() -> None:
    bare = Bare()
    p = Pipeline([bare])
    run_every_hook(p)
    assert bare.calls == list(HOOKS)


def test_a_plugin_written_before_a_hook_existed_is_not_called_for_it() -> None:
    class Older:
        name = "older"

        def request_received(self, ctx: Any) -> Any:
            return None

    p = Pipeline([Older()])
    assert p.run("response_received", None, None, None) is None


def test_a_deferred_holds_the_rest_until_it_fires() -> None:
    log: list[str] = []
    d: Deferred[Any] = Deferred()

    class Waiter(Plugin):
        def request_received(self, ctx: Any) -> Any:
            log.append("waiter")
            return d

    p = Pipeline([Waiter(), Recorder("after", log)])
    result = p.run("request_received", None)
    assert isinstance(result, Deferred)
    assert log == ["waiter"]
    outcome: list[Any] = []
    result.addCallback(outcome.append)
    d.callback(None)
    assert log == ["waiter", "after"]
    assert outcome == [None]


def test_a_deferred_answer_stops_the_chain() -> None:
    log: list[str] = []
    d: Deferred[Any] = Deferred()

    class Waiter(Plugin):
        def request_received(self, ctx: Any) -> Any:
            return d

    p = Pipeline([Waiter(), Recorder("after", log)])
    outcome: list[Any] = []
    p.run("request_received", None).addCallback(outcome.append)
    d.callback("answer")
    assert outcome == ["answer"]
    assert log == []


def test_two_deferreds_in_a_row() -> None:
    ds: list[Deferred[Any]] = [Deferred(), Deferred()]

    class Waiter(Plugin):
        def __init__(self, i: int) -> None:
            self.i = i

        def request_received(self, ctx: Any) -> Any:
            return ds[self.i]

    outcome: list[Any] = []
    Pipeline([Waiter(0), Waiter(1)]).run("request_received", None).addCallback(outcome.append)
    ds[0].callback(None)
    assert outcome == []
    ds[1].callback("late answer")
    assert outcome == ["late answer"]


def test_a_raising_hook_raises_to_the_caller() -> None:
    """The proxy turns this into a 500 (test_proxy); the pipeline must not swallow it."""

    class Boom(Plugin):
        def request_received(self, ctx: Any) -> Any:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Pipeline([Boom()]).run("request_received", None)


def test_a_failing_deferred_fails_the_result() -> None:
    class Boom(Plugin):
        def request_received(self, ctx: Any) -> Any:
            return fail(RuntimeError("later"))

    errors: list[Any] = []
    Pipeline([Boom(), Recorder("after", [])]).run("request_received", None).addErrback(
        errors.append
    )
    assert len(errors) == 1 and errors[0].check(RuntimeError)


def test_then_works_on_values_and_deferreds() -> None:
    assert then(2, lambda x: x * 10) == 20
    d: Deferred[int] = Deferred()
    out: list[int] = []
    then(d, lambda x: x * 10).addCallback(out.append)
    d.callback(3)
    assert out == [30]


# ------------------------------------------------------------------------------------------------
# notify
# ------------------------------------------------------------------------------------------------
def test_notify_calls_everyone_and_only_logs_errors(failures: list[Any]) -> None:
    seen: list[str] = []

    class Boom(Plugin):
        def dialog_ended(self, dialog: Any, reason: str) -> None:
            raise RuntimeError("boom")

    class LaterBoom(Plugin):
        def dialog_ended(self, dialog: Any, reason: str) -> Any:
            return fail(RuntimeError("later boom"))

    class Seen(Plugin):
        def dialog_ended(self, dialog: Any, reason: str) -> None:
            seen.append(reason)

    Pipeline([Boom(), LaterBoom(), Seen()]).notify("dialog_ended", object(), "bye")
    assert seen == ["bye"]
    assert len(failures) == 2


# ------------------------------------------------------------------------------------------------
# finding and building plugins
# ------------------------------------------------------------------------------------------------
@implementer(IProxyPlugin)
class DemoPlugin(Plugin):
    name = "demo"

    def __init__(self, core: Any, greeting: str) -> None:
        self.core = core
        self.greeting = greeting


@implementer(IPluginFactory)
class _DemoFactory:
    name = "demo"

    def build(self, core: Any, section: Section) -> DemoPlugin:
        section.check_no_unknown({"greeting"})
        return DemoPlugin(core, section.get_str("greeting", "hello"))


DemoFactory = _DemoFactory()
NotAFactory = object()


@implementer(IPluginFactory)
class _Useless:
    name = "useless"

    def build(self, core: Any, section: Section) -> Any:
        return object()


Useless = _Useless()


def test_find_factory_by_module_path() -> None:
    assert find_factory(f"{__name__}:DemoFactory") is DemoFactory


@pytest.mark.parametrize("name", [f"{__name__}:NoSuchThing", "no_such_module_xyz:thing"])
def test_find_factory_bad_path_is_one_line_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        find_factory(name)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("plugins.enabled: ")
    assert repr(name) in text


def test_find_factory_unknown_entry_point_is_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        find_factory("no-such-plugin")
    text = str(info.value)
    assert "\n" not in text
    assert info.value.key == "plugins.enabled"
    assert "'no-such-plugin'" in text and "installed" in text


def _fake_entry_points(*eps: EntryPoint) -> Any:
    def entry_points(group: str) -> list[EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    return entry_points


def test_find_factory_by_entry_point_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "entry_points", _fake_entry_points(
        EntryPoint("demo", f"{__name__}:DemoFactory", pipeline_module.ENTRY_POINT_GROUP),
        EntryPoint("other", f"{__name__}:DemoFactory", "some.other.group"),
    ))
    assert find_factory("demo") is DemoFactory
    with pytest.raises(ConfigError, match=r"installed: demo\)"):
        find_factory("other")


def test_entry_point_that_fails_to_load_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "entry_points", _fake_entry_points(
        EntryPoint("broken", "no_such_module_xyz:thing", pipeline_module.ENTRY_POINT_GROUP),
    ))
    with pytest.raises(ConfigError, match="failed to load") as info:
        find_factory("broken")
    assert "\n" not in str(info.value)


def test_load_plugins_builds_in_config_order_with_their_own_section() -> None:
    config = parse_config(
        f'[plugins]\nenabled = ["{__name__}:DemoFactory"]\n[demo]\ngreeting = "hi"\n'
    )
    core = object()
    plugins = load_plugins(config, core)  # type: ignore[arg-type]
    assert len(plugins) == 1
    assert isinstance(plugins[0], DemoPlugin)
    assert (plugins[0].core, plugins[0].greeting) == (core, "hi")


def test_load_plugins_lets_the_plugin_validate_its_section() -> None:
    config = parse_config(
        f'[plugins]\nenabled = ["{__name__}:DemoFactory"]\n[demo]\ngretting = "typo"\n'
    )
    with pytest.raises(ConfigError, match="gretting"):
        load_plugins(config, object())  # type: ignore[arg-type]


@pytest.mark.parametrize("attr, problem", [
    ("NotAFactory", "is not a plugin factory"),
    ("Useless", "built no IProxyPlugin"),
])
def test_load_plugins_refuses_what_is_no_plugin(attr: str, problem: str) -> None:
    config = parse_config(f'[plugins]\nenabled = ["{__name__}:{attr}"]\n')
    with pytest.raises(ConfigError, match=problem):
        load_plugins(config, object())  # type: ignore[arg-type]
