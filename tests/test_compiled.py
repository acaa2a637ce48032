"""The two builds of the message, transaction and proxy core layers (sipproxy.compiled,
setup.py).

When the install compiled them with mypyc (:data:`sipproxy.compiled.MODULES`), the suite runs
against the compiled modules (asserted here, so CI proves it), and their tests run once more in
a subprocess against the pure-Python source. A stale build (its source edited since)
is never loaded. ``scripts/test`` sets ``SIPPROXY_EXPECT_COMPILED=1``: there, a pure-Python
install (mypyc or the C compiler failed) fails the suite instead of passing unnoticed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sipproxy import compiled
from sipproxy.message import parse_via

ROOT = Path(__file__).resolve().parent.parent
PURE = os.environ.get("SIPPROXY_PURE_PYTHON", "") not in ("", "0")
#: the tests that run against the pure-Python build too (when the compiled one is in use)
COMPILED_MODULE_TESTS = (
    "tests/test_message.py",
    "tests/test_message_properties.py",
    "tests/test_uri.py",
    "tests/test_framing.py",
    "tests/test_conformance.py",
    "tests/test_compiled.py",
    "tests/test_transaction.py",
    "tests/test_proxy.py",
    "tests/test_forking.py",
    "tests/test_routing.py",
    "tests/test_dialogs.py",
    "tests/test_pipeline.py",
    "tests/test_plugin_api.py",
    "tests/test_nat.py",
    "tests/test_acl.py",
    "tests/test_auth.py",
    "tests/test_flood.py",
)


def test_the_build_that_is_loaded() -> None:
    build = compiled.select()
    assert "stale" not in build.reason, build.reason
    if os.environ.get("SIPPROXY_EXPECT_COMPILED") == "1" and not PURE:
        assert build.installed, "the install did not compile the modules (see setup.py)"
    if PURE:
        assert not build.compiled
    for name in compiled.MODULES:
        importlib.import_module(name)
    loaded = compiled.loaded()
    assert loaded == dict.fromkeys(compiled.MODULES, build.compiled), (build, loaded)


def test_each_compiled_module_can_be_imported_first() -> None:
    """In a fresh interpreter, each compiled module alone: one whose dataclasses name another
    module's compiled classes must import that module at run time, not for type checking
    only (mypyc's class would read the other's type before it is made: a segfault)."""
    if not compiled.select().compiled:
        pytest.skip("nothing is compiled here")
    runs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], env=_environment(),
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
            for name in compiled.MODULES}
    failed = {}
    for name, run in runs.items():
        out, _ = run.communicate(timeout=120)
        if run.returncode != 0:
            failed[name] = (run.returncode, out[-500:])
    assert failed == {}


def test_setup_compiles_the_modules_the_import_checks() -> None:
    """setup.py cannot import the package it builds: its list is a copy of this one."""
    names = {}
    for node in ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = ast.literal_eval(node.value) if isinstance(
                node.value, ast.Constant | ast.Tuple) else None
    assert names["COMPILED"] == tuple(
        name.replace(".", "/") + ".py" for name in compiled.MODULES)
    assert names["MANIFEST"] == compiled.MANIFEST


def test_a_bare_rport_reads_as_true_itself() -> None:
    """Not as 1 (a port): mypyc would make the bool of an ``int | bool`` an int."""
    via = parse_via("SIP/2.0/UDP 192.0.2.1:5060;rport;branch=z9hG4bKx")
    assert via.rport is True
    assert parse_via("SIP/2.0/UDP 192.0.2.1;rport=1;branch=z9hG4bKx").rport == 1
    assert parse_via("SIP/2.0/UDP 192.0.2.1;rport=1;branch=z9hG4bKx").rport is not True


def _package(tmp_path: Path, extensions: bool = True) -> Path:
    """A fake installed package: the sources, (empty) extensions and their manifest."""
    package = tmp_path / "sipproxy"
    package.mkdir()
    digests = {}
    for name in compiled.MODULES:
        stem = "/".join(name.split(".")[1:])  # e.g. proxy/core
        source = package / f"{stem}.py"
        source.parent.mkdir(exist_ok=True)
        source.write_text(f"# {stem}\n")
        digests[f"sipproxy/{stem}.py"] = hashlib.sha256(source.read_bytes()).hexdigest()
        if extensions:
            (package / f"{stem}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (package / compiled.MANIFEST).write_text(json.dumps(digests))
    return package


@pytest.fixture
def linux_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake packages' extensions count as extensions on this interpreter."""
    monkeypatch.setattr("importlib.machinery.EXTENSION_SUFFIXES",
                        [".cpython-311-x86_64-linux-gnu.so", ".so"])


def test_a_build_matching_its_source_is_used(tmp_path: Path, linux_suffix: None) -> None:
    package = _package(tmp_path)
    assert compiled.choose(package, pure=False) == compiled.Build(installed=True, compiled=True)
    forced = compiled.choose(package, pure=True)
    assert (forced.compiled, forced.reason) == (False, "SIPPROXY_PURE_PYTHON is set")


def test_an_edited_source_makes_the_build_stale(tmp_path: Path, linux_suffix: None) -> None:
    package = _package(tmp_path)
    with (package / "message.py").open("a") as f:
        f.write("# edited\n")
    build = compiled.choose(package, pure=False)
    assert not build.compiled
    assert "sipproxy/message.py changed since it was compiled" in build.reason
    assert compiled.REBUILD in build.reason


def test_a_build_without_its_manifest_or_with_a_module_missing_is_not_used(
    tmp_path: Path, linux_suffix: None
) -> None:
    package = _package(tmp_path)
    (package / compiled.MANIFEST).unlink()
    assert "mypyc-sources.json is missing" in compiled.choose(package, pure=False).reason
    (tmp_path / "b").mkdir()
    package = _package(tmp_path / "b")
    (package / "uri.cpython-311-x86_64-linux-gnu.so").unlink()
    build = compiled.choose(package, pure=False)
    assert (build.installed, build.compiled) == (False, False)
    assert build.reason.startswith("stale build: only some of the modules are compiled")
    assert compiled.REBUILD in build.reason


def test_nothing_compiled_is_plain_pure_python(tmp_path: Path, linux_suffix: None) -> None:
    build = compiled.choose(_package(tmp_path, extensions=False), pure=False)
    assert build == compiled.Build(installed=False, compiled=False)


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SIPPROXY_PURE_PYTHON"}
    # the sipproxy this process imported, wherever it is installed
    here = str(compiled.PACKAGE_DIR.parent)
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


@pytest.mark.skipif(PURE, reason="this run is the pure-Python one")
def test_the_compiled_modules_tests_pass_against_the_pure_build_too() -> None:
    if not compiled.select().compiled:
        pytest.skip("nothing is compiled here: the suite ran the pure build")
    out = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                *COMPILED_MODULE_TESTS], _environment(SIPPROXY_PURE_PYTHON="1"), ROOT, 600)
    assert " passed" in out and "failed" not in out


def test_an_edited_module_loads_from_source_with_a_warning(tmp_path: Path) -> None:
    """The real guard, end to end, on a copy of the compiled package with a module of its
    subpackage (proxy/forking.py) edited: every module loads from source."""
    if not compiled.select().compiled:
        pytest.skip("nothing is compiled here")
    shutil.copytree(compiled.PACKAGE_DIR, tmp_path / "sipproxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for shared in compiled.PACKAGE_DIR.parent.glob("sipproxy__mypyc.*"):
        shutil.copy(shared, tmp_path)
    with (tmp_path / "sipproxy" / "proxy" / "forking.py").open("a") as f:
        f.write("EDITED = True\n")
    script = (
        "import importlib, sipproxy.compiled as c;"
        "[importlib.import_module(name) for name in c.MODULES];"
        "import sipproxy.proxy.forking as f;"
        "print(f.EDITED, c.loaded(), c.select().reason)"
    )
    env = _environment(PYTHONPATH=str(tmp_path))
    out = _run([sys.executable, "-c", script], env, tmp_path, 60)
    assert f"True {dict.fromkeys(compiled.MODULES, False)}" in out
    assert "RuntimeWarning" in out and compiled.REBUILD in out
