"""The plugin API as a plugin author meets it: typed hooks, documented public names, and no
private names imported across modules by the core and the built-in plugins."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest
from zope.interface.interface import InterfaceClass

import sipproxy.addressing
import sipproxy.context
import sipproxy.dialogs
import sipproxy.interfaces
import sipproxy.proxy.record_route
import sipproxy.proxy.routing
import sipproxy.settings
import sipproxy.testing
from sipproxy import compiled
from sipproxy.interfaces import IProxyCore, IProxyPlugin

ROOT = Path(__file__).resolve().parent.parent
#: every Python source of the project: no private name is imported across modules anywhere
CHECKED = [
    *(
        path
        for folder in ("sipproxy", "tests", "examples", "twisted/plugins")
        for path in sorted((ROOT / folder).rglob("*.py"))
    ),
    ROOT / "bench" / "cps",
    ROOT / "bench" / "relay",
]
#: epytext markup; the project's docstrings are reST (``code``, :class:`X`, :param x:)
EPYTEXT = re.compile(
    r"(?<![A-Za-z])[LCI]\{[^}]*\}|^\s*@(param|returns?|type|rtype|ivar|raises?)\b", re.M
)
API_MODULES = [
    sipproxy.interfaces, sipproxy.context, sipproxy.proxy.record_route, sipproxy.proxy.routing,
    sipproxy.settings, sipproxy.testing, sipproxy.addressing,
]


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_from_another_module(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert private == []


@pytest.mark.parametrize("module", API_MODULES, ids=lambda m: m.__name__)
def test_every_public_name_of_the_plugin_api_has_a_docstring(module: ModuleType) -> None:
    names: list[str] = module.__all__
    undocumented = []
    for name in names:
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue  # constants are documented with #: comments
        if compiled.loaded().get(value.__module__):
            continue  # mypyc keeps no docstrings: the pure-Python rerun checks this one
        if not inspect.getdoc(value):
            undocumented.append(name)
        if isinstance(value, InterfaceClass):
            undocumented += [f"{name}.{m}" for m in value.names()
                             if not value[m].getDoc()]
        elif inspect.isclass(value):
            undocumented += [
                f"{name}.{m}" for m, member in vars(value).items()
                if not m.startswith("_") and inspect.isfunction(member)
                and not inspect.getdoc(member)
            ]
    assert undocumented == []


@pytest.mark.parametrize("interface", [IProxyPlugin, IProxyCore], ids=lambda i: i.__name__)
def test_hooks_and_core_methods_take_no_untyped_parameter(interface: InterfaceClass) -> None:
    source = inspect.getsource(inspect.getmodule(interface))  # type: ignore[arg-type]
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == interface.__name__)
    untyped = [
        f"{fn.name}({arg.arg})"
        for fn in cls.body if isinstance(fn, ast.FunctionDef)
        for arg in fn.args.args
        if arg.annotation is None or ast.unparse(arg.annotation) == "Any"
    ]
    assert untyped == []


def test_context_types_are_one_and_the_same_wherever_imported() -> None:
    # a plugin may import them from sipproxy.interfaces or sipproxy.context
    for name in ("RequestContext", "Branch", "Target"):
        assert getattr(sipproxy.interfaces, name) is getattr(sipproxy.context, name)
    # the core's own state is in typed fields, not in keys of the plugins' ``data``
    fields = {f.name for f in dataclasses.fields(sipproxy.context.Branch)}
    assert {"targets", "binding", "flow_failed", "data"} <= fields


@pytest.mark.parametrize("cls", [sipproxy.context.Branch, sipproxy.context.RequestContext,
                                 sipproxy.dialogs.Dialog], ids=lambda c: c.__name__)
def test_a_written_out_init_takes_every_field_with_its_default(cls: type) -> None:
    """These dataclasses write their ``__init__`` out (compiled, the generated one would stay
    Python): it must take every field, by name, with the field's default."""
    if compiled.loaded().get(cls.__module__):
        pytest.skip("compiled, it checks the types given: the pure-Python rerun runs this")
    fields = dataclasses.fields(cls)
    required = [f for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    given = {f.name: object() for f in fields}
    made = cls(**given)
    assert {f.name: getattr(made, f.name) for f in fields} == given
    bare = cls(*(given[f.name] for f in required))
    for f in fields:
        if f not in required:
            expected = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert getattr(bare, f.name) == expected, f.name
    assert cls(*(given[f.name] for f in required)).data is not bare.data


@pytest.mark.parametrize(
    "path", sorted((ROOT / "sipproxy").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_docstrings_are_in_one_dialect(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    epytext = [
        f"line {getattr(node, 'lineno', 1)}: {match.group(0)!r}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        for match in [EPYTEXT.search(ast.get_docstring(node, clean=False) or "")]
        if match
    ]
    assert epytext == []


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_test_module_is_imported_as_a_library(path: Path) -> None:
    """Shared test helpers live in helper modules (tests/*_site.py, tests/integration/support/),
    so running or deleting one test module never changes another."""
    tree = ast.parse(path.read_text(), str(path))
    imported = [
        name
        for node in ast.walk(tree)
        for name in (
            [node.module or ""] if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names] if isinstance(node, ast.Import) else []
        )
        if name.rpartition(".")[2].startswith("test_")
    ]
    assert imported == []
