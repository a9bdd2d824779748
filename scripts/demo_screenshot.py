#!/usr/bin/env python3
"""The README's picture of the demo page: `tokenflow serve --demo`, one answer streamed, one burst, a screenshot.

    .venv/bin/python scripts/demo_screenshot.py docs/img/demo.png [--users 100]

Headless Chromium (Debian's, as in tests/web); the PNG is reduced to a palette so it stays small in git.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.http import spawn_gateway  # noqa: E402
from gateway.web import DEMO_ENGINES  # noqa: E402
from tests.web import browser  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args()
    with spawn_gateway("tokenflow", profile="sim-small", tick_s=0.25, engines=DEMO_ENGINES, args=("--demo",)) as url:
        d = browser.start(args.width, args.height)
        try:
            d.get(url + "/")
            WebDriverWait(d, 15).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
            users = d.find_element(By.ID, "burst-users")
            users.clear()
            users.send_keys(str(args.users))
            d.find_element(By.ID, "burst-run").click()
            prompt = d.find_element(By.ID, "prompt")
            prompt.send_keys(Keys.ENTER)
            WebDriverWait(d, 120).until(lambda d: "done" in d.find_element(By.ID, "burst-status").text)
            d.execute_script("document.activeElement.blur()")
            # The whole page in the picture: grow the window until the viewport holds it.
            inner = d.execute_script("return innerHeight")
            full = d.execute_script("return document.documentElement.scrollHeight")
            d.set_window_size(args.width, args.height + full - inner)
            time.sleep(1.0)  # a few more polls of the gauges and the lanes after the resize: the picture only
            d.save_screenshot(str(args.out))
        finally:
            d.quit()
    Image.open(args.out).convert("RGB").quantize(colors=64, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
