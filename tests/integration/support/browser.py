"""A real browser for the integration tests: Debian's headless Chromium, driven by Selenium
through the system chromedriver (Debian package chromium-driver; scripts/test installs both).

Nothing is downloaded: the driver's path is given, so Selenium Manager never runs. Chromium runs
as root here, hence ``--no-sandbox``. Screenshots and other artifacts go to the directory named
by ``SIPPROXY_ARTIFACTS`` (CI can keep it), else to the test's own temporary directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CHROMEDRIVER", "CHROMIUM", "artifacts_dir", "browser_unavailable", "chromium",
           "resize"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: every wait of the driver is bounded by these (seconds)
PAGE_LOAD_TIMEOUT = 15
SCRIPT_TIMEOUT = 5


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extras: pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {package}; scripts/test installs it)"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium with a ``width`` x ``height`` viewport, quit on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        driver.set_script_timeout(SCRIPT_TIMEOUT)
        resize(driver, width, height)
        yield driver
    finally:
        driver.quit()


def resize(driver: Any, width: int, height: int) -> None:
    """Make the viewport (not the window with its frame) ``width`` x ``height``."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def artifacts_dir(tmp_path: Path, name: str) -> Path:
    """Where a test's artifacts go: ``$SIPPROXY_ARTIFACTS/name``, else ``tmp_path/artifacts``."""
    base = os.environ.get("SIPPROXY_ARTIFACTS")
    path = Path(base) / name if base else tmp_path / "artifacts"
    if path.exists() and base:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
