"""The build: the message, transaction and proxy core layers compiled with mypyc when they can
be, pure Python otherwise.

``sipproxy/uri.py``, ``headers.py`` and ``message.py`` are compiled into C extensions (the
proxy's CPU per call -28 % in process, -14 % in bench/cps: bench/README.md), ``transaction.py``
with them (-9 % more in process), and the proxy core (``sipproxy/proxy/``, ``context.py``,
``dialogs.py``, ``pipeline.py``), when mypyc (``mypy`` and its ``mypy-zope`` plugin, build
requirements in pyproject.toml) and a C compiler are available.
Without them, with ``SIPPROXY_PURE_PYTHON=1`` in the environment, or when compiling fails for any
reason, the install goes on with the pure-Python modules: a failed compile is a warning, never
a failed install. The ``.py`` files are installed either way; ``sipproxy/compiled.py`` decides
at import which build is loaded.

Everything else (metadata, packages, dependencies) is in setup.cfg.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
#: the compiled modules, in the order mypyc is given them (sipproxy/compiled.py has the same
#: list and file name: tests/test_compiled.py checks)
COMPILED = (
    "sipproxy/uri.py", "sipproxy/headers.py", "sipproxy/message.py", "sipproxy/transaction.py",
    "sipproxy/context.py", "sipproxy/dialogs.py", "sipproxy/pipeline.py",
    "sipproxy/proxy/addresses.py", "sipproxy/proxy/record_route.py", "sipproxy/proxy/routing.py",
    "sipproxy/proxy/responses.py", "sipproxy/proxy/dialog_glue.py", "sipproxy/proxy/forking.py",
    "sipproxy/proxy/core.py",
)
#: written beside the compiled modules: the SHA-256 of each source they were compiled from
#: (sipproxy/compiled.py reads it to refuse a stale build)
MANIFEST = "mypyc-sources.json"


def _warn(text: str) -> None:
    print(f"sipproxy: {text}; installing the pure-Python modules", file=sys.stderr)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mypyc_extensions() -> list[Any]:
    """The extensions mypyc generates C for, or none (pure Python) when it cannot."""
    if os.environ.get("SIPPROXY_PURE_PYTHON", "") not in ("", "0"):
        _warn("SIPPROXY_PURE_PYTHON is set")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc (mypy) is not installed")
        return []
    try:
        import mypy_zope  # noqa: F401  (the plugin below)
    except ImportError:
        _warn("mypy-zope is not installed")
        return []
    # The project's mypy configuration (file list, strictness) is for checking, not compiling;
    # only its zope plugin is needed: transaction.py calls twisted's zope interfaces
    # (IReactorTime, ITransportSender), whose methods mypy alone reads without ``self``.
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mypyc.ini"
        config.write_text("[mypy]\nplugins = mypy_zope:plugin\n")
        try:
            return mypycify(
                [f"--config-file={config}", "--ignore-missing-imports",
                 "--follow-imports=silent", *COMPILED],
                group_name="sipproxy",
                opt_level="3",
                multi_file=True,
            )
        except (Exception, SystemExit) as e:  # mypyc exits on a type error
            _warn(f"mypyc could not compile ({type(e).__name__}: {e})")
            return []


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python when the C compiler fails (or is missing), and
    writes the source digests beside what it built. The C files of one extension (mypyc
    writes one per module) are compiled in parallel, one per CPU."""

    def build_extension(self, ext: Any) -> None:
        compile_one = self.compiler.compile

        def compile_all(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                done = pool.map(lambda source: compile_one([source], *args, **kwargs), sources)
                return [obj for objects in done for obj in objects]

        self.compiler.compile = compile_all
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_one

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as e:  # CCompilerError, DistutilsExecError, OSError ...
            _warn(f"compiling failed ({type(e).__name__}: {e})")
            self._remove_outputs()
            return
        package_dir = ROOT / "sipproxy" if self.inplace else Path(self.build_lib) / "sipproxy"
        package_dir.mkdir(parents=True, exist_ok=True)
        digests = {path: _digest(ROOT / path) for path in COMPILED}
        (package_dir / MANIFEST).write_text(json.dumps(digests, indent=1) + "\n")

    def _remove_outputs(self) -> None:
        """Half a build (a shared library without its modules, or the reverse) is no build."""
        for ext in self.extensions:
            filename = self.get_ext_filename(ext.name)
            (Path(self.build_lib) / filename).unlink(missing_ok=True)
            (ROOT / filename).unlink(missing_ok=True)
        (ROOT / "sipproxy" / MANIFEST).unlink(missing_ok=True)
        self.extensions = []

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


setup(ext_modules=mypyc_extensions(), cmdclass={"build_ext": OptionalBuildExt})
