"""A real browser for the dashboard's tests: Debian's chromium driven by Playwright.

The browser is the system's (`/usr/bin/chromium`, `apt-get install chromium`), never one that
`playwright install` downloads; a machine without it or without the `playwright` package skips
these tests with the reason. Screenshots go to docs/dashboard/, which docs/dashboard.md shows.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("MODELHOST_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).parent.parent / "docs" / "dashboard"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "needs the playwright package (pip install playwright; no browser download)"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        # --no-sandbox: the tests often run as root in a container, where chromium's
        # sandbox cannot start.
        browser = driver.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Page, name: str, full: bool = True) -> None:
    """Save what the page shows as docs/dashboard/<name>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full, animations="disabled")


needs_browser = pytest.mark.skipif(missing() is not None, reason=missing() or "")
