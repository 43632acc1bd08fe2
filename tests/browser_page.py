"""The dashboard in a real browser, shared by the browser tests: Debian's chromium, headless,
driven by playwright (no downloaded browsers), and the page opened with what went wrong on it.

Needs the ``playwright`` Python package and ``/usr/bin/chromium`` (or ``XASFLOW_CHROMIUM``);
:data:`BROWSER_MARKS` skips a module with the install commands otherwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = os.environ.get("XASFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 20_000

#: A browser test module's ``pytestmark``: skipped, saying what to install, without a browser.
BROWSER_MARKS = [
    pytest.mark.skipif(
        sync_playwright is None,
        reason="the playwright package is missing: .venv/bin/pip install playwright "
        "(no `playwright install`: the system chromium is used)",
    ),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"no chromium at {CHROMIUM}: apt-get install -y chromium "
        "(or set XASFLOW_CHROMIUM to a chromium binary)",
    ),
]


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless chromium (the system one), closed on leaving."""
    assert sync_playwright is not None
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            b.close()


def open_page(
    browser: Any, base: str, routes: dict[str, Any] | None = None
) -> tuple[Any, list[str], list[str]]:
    """A new tab on the dashboard, loaded, with the URLs it requested and its problems: console
    errors, uncaught exceptions, requests that failed or were refused, and a script that came
    as anything but JavaScript (a browser will not run such an ES module). ``routes``: URL
    pattern -> playwright route handler, in place before the page loads."""
    page = browser.new_page(viewport={"width": 1600, "height": 1150})
    for pattern, handler in (routes or {}).items():
        page.route(pattern, handler)
    requests: list[str] = []
    problems: list[str] = []

    def answered(r: Any) -> None:
        if r.status >= 400:
            problems.append(f"{r.status} {r.url}")
        elif r.request.resource_type == "script":
            kind = r.headers.get("content-type", "")
            if not kind.startswith("text/javascript"):
                problems.append(f"{r.url} came as {kind!r}")

    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: problems.append(f"{r.url} failed: {r.failure}"))
    page.on("response", answered)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(base + "/", wait_until="load")
    # the modules ran: the entry's state object is there, the stream connected
    page.wait_for_function(
        "() => window.xasflow !== undefined && window.xasflow.messages > 0", timeout=TIMEOUT_MS
    )
    return page, requests, problems


def drawn(page: Any) -> None:
    """Wait until the page has drawn the state it holds (on the next animation frame)."""
    page.wait_for_function(
        "v => document.body.dataset.version === String(v)",
        arg=page.evaluate("window.xasflow.state.version"),
        timeout=TIMEOUT_MS,
    )
