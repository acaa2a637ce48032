"""Which build of the message, transaction and proxy core layers is loaded: mypyc-compiled, or
the pure-Python source.

``pip install .`` compiles :data:`MODULES` with mypyc where it can (see setup.py) and leaves
their ``.py`` files beside the extensions. Python imports an extension
before a ``.py`` of the same name, so an extension built from older source would shadow every
edit to it without a word. :func:`select` (run by ``sipproxy/__init__.py``, before any of these
modules is imported) therefore loads the compiled modules only when all of them are there and were
built from exactly the source beside them (the SHA-256 digests setup.py wrote into
``mypyc-sources.json``). Otherwise, or with ``SIPPROXY_PURE_PYTHON=1`` in the environment, all
of them come from their ``.py`` files; a stale build also gives a ``RuntimeWarning`` that names
the command to rebuild. All or none: compiled modules call each other's classes directly.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["MODULES", "REBUILD", "Build", "choose", "loaded", "select", "stale"]

#: the modules setup.py compiles
MODULES = (
    "sipproxy.uri", "sipproxy.headers", "sipproxy.message", "sipproxy.transaction",
    "sipproxy.context", "sipproxy.dialogs", "sipproxy.pipeline", "sipproxy.proxy.addresses",
    "sipproxy.proxy.record_route", "sipproxy.proxy.routing", "sipproxy.proxy.responses",
    "sipproxy.proxy.dialog_glue", "sipproxy.proxy.forking", "sipproxy.proxy.core",
)
#: rebuilds the in-place extensions of a source checkout
REBUILD = "python3 setup.py build_ext --inplace"
#: written by setup.py beside the extensions: the SHA-256 of each source they were built from
MANIFEST = "mypyc-sources.json"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Build:
    """What :func:`select` found and chose."""

    #: the compiled extensions are present (all of them)
    installed: bool
    #: they are the ones imported
    compiled: bool
    #: why not, when installed but not used ("" otherwise)
    reason: str = ""


_build: Build | None = None


def _stem(package_dir: Path, name: str) -> Path:
    """``sipproxy.proxy.core`` in ``package_dir`` (the ``sipproxy`` directory): its
    ``proxy/core``."""
    return package_dir.joinpath(*name.split(".")[1:])


def _extension(package_dir: Path, name: str) -> Path | None:
    stem = _stem(package_dir, name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = stem.with_name(stem.name + suffix)
        if path.exists():
            return path
    return None


def _source(package_dir: Path, name: str) -> Path:
    stem = _stem(package_dir, name)
    return stem.with_name(stem.name + ".py")


def stale(package_dir: Path) -> str:
    """Why the compiled build in ``package_dir`` does not match the source beside it ("" when
    it does)."""
    try:
        digests = json.loads((package_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    for name in MODULES:
        path = _source(package_dir, name)
        key = path.relative_to(package_dir.parent).as_posix()
        if digests.get(key) != hashlib.sha256(path.read_bytes()).hexdigest():
            return f"{key} changed since it was compiled"
    return ""


def choose(package_dir: Path, pure: bool) -> Build:
    """What is installed in ``package_dir`` and which build to load (``pure``: the
    ``SIPPROXY_PURE_PYTHON`` switch)."""
    present = [_extension(package_dir, name) is not None for name in MODULES]
    installed = all(present)
    why = ""
    if installed:
        why = stale(package_dir)
    elif any(present):  # built before the list grew, or half removed: as stale as an edit
        why = "only some of the modules are compiled"
    reason = f"stale build: {why}; rebuild it with '{REBUILD}' (or reinstall)" if why else ""
    if pure:
        reason = "SIPPROXY_PURE_PYTHON is set"
    return Build(installed=installed, compiled=installed and not reason, reason=reason)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their ``.py`` files, extensions or not."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(PACKAGE_DIR, fullname))


def select() -> Build:
    """Decide (once per process) which build is imported; see the module docstring."""
    global _build
    if _build is None:
        pure = os.environ.get("SIPPROXY_PURE_PYTHON", "") not in ("", "0")
        _build = choose(PACKAGE_DIR, pure)
        if _build.reason.startswith("stale"):
            warnings.warn(f"sipproxy: the compiled modules are not used ({_build.reason})",
                          RuntimeWarning, stacklevel=2)
        if _build.reason and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _SourceFinder())
    return _build


def loaded() -> dict[str, bool]:
    """For each of :data:`MODULES` imported so far: is it the compiled one?"""
    out: dict[str, bool] = {}
    for name in MODULES:
        module = sys.modules.get(name)
        if module is not None:
            origin = getattr(module, "__file__", None) or ""
            out[name] = origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return out
