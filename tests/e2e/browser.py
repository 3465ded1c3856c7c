"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for the dashboard's browser test and its
screenshots. Playwright's own browser download is not used: it cannot run on these machines (no network)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling Google's hosts, which this network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def missing() -> str | None:
    """Why the browser test cannot run here (None: it can); `make install` installs both."""
    if shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} not found: run `make install` (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright not installed: run `make install` (pip install -e '.[test]')"
    return None


def chart_points(url: str, screenshot: Path, min_charts: int, timeout_s: float = 60.0,
                 size: tuple[int, int] = (1500, 1900)) -> tuple[dict[str, int], str]:
    """Opens the dashboard, waits until `min_charts` chart cards hold data (their data-points attribute), saves a
    full-page screenshot and returns each card's data-points and the page's text."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": size[0], "height": size[1]})
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function(
                "n => [...document.querySelectorAll('[data-points]')].filter(c => +c.dataset.points > 0).length >= n",
                arg=min_charts, timeout=timeout_s * 1000)
            page.wait_for_timeout(1500)  # one more refresh: the tables and the heat map are drawn too
            points = page.evaluate(
                "() => Object.fromEntries([...document.querySelectorAll('[data-points]')]"
                ".map(c => [c.id, +c.dataset.points]))")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return points, text
