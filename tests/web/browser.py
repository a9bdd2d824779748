"""A real headless Chromium for the page tests: Debian's chromium with its matching chromium-driver.

Nothing is downloaded at run time: the browser and the driver are the system's (scripts/install-test-deps.sh),
named explicitly so Selenium never looks for others.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("TOKENFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TOKENFLOW_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"

# The page polls GET /v1/streams/{id} and posts progress while a stream lives; the gateway forgets the stream
# right after its last event, so a poll in flight at that moment is answered 404 (the page then stops polling).
# Chromium logs every 4xx of fetch() as a console error: only that one is expected, and only at a stream's end.
_END_RACE = re.compile(r"/v1/streams/[0-9a-f]+(/progress)? - Failed to load resource: .*status of 404")


def start(width: int = 1280, height: int = 1000) -> webdriver.Chrome:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(path)):
            raise RuntimeError(f"{path} is missing: run scripts/install-test-deps.sh "
                               "(Debian chromium, chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def console_problems(driver: webdriver.Chrome) -> list[dict]:
    """Console entries at warning level or above since the last call, but the expected end-of-stream 404."""
    return [e for e in driver.get_log("browser")
            if e["level"] in ("SEVERE", "WARNING") and not _END_RACE.search(e["message"])]


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    return path


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])
