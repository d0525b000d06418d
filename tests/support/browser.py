"""Debian's chromium under Playwright, as the browser tests launch it (no network of its own)."""

from __future__ import annotations

import shutil
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def launch_chromium(driver: Any) -> Any:
    """A headless chromium from ``playwright.sync_playwright()``'s driver."""
    return driver.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
