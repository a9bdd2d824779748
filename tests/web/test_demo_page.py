"""The demo page in a real headless Chromium against ``tokenflow serve --demo`` (two simulated engines).

What a person relies on: the answer appears at the rate they declared, the side panel follows the stream, the
gateway hears what was really read (and not what was scrolled past), the keyboard alone works, a phone-sized
screen works, and the burst shows both policies with the gateway's own figures.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from . import browser
from .conftest import get_json, until


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 15).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def ask(driver: Any, text: str, rate: str, max_tokens: int) -> str:
    """Send ``text`` with the keyboard (Enter) and return the new stream's id, once the gateway gave one."""
    Select(driver.find_element(By.ID, "rate")).select_by_value(rate)
    length = driver.find_element(By.ID, "max-tokens")
    length.clear()
    length.send_keys(str(max_tokens))
    before = driver.execute_script("return window.tokenflowDemo.streams.length")
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(text, Keys.ENTER)
    return WebDriverWait(driver, 15).until(lambda d: d.execute_script(
        "const s = window.tokenflowDemo.streams; return s.length > arguments[0] && s[s.length - 1].sid", before))


def chat_status(driver: Any) -> str:
    return driver.find_element(By.ID, "chat-status").text


def stream_state(url: str, sid: str) -> dict[str, Any] | None:
    status, body = get_json(f"{url}/v1/streams/{sid}")
    return body if status == 200 else None


def test_an_answer_streams_at_the_paced_rate_and_the_gateway_hears_what_was_read(driver, demo):
    open_page(driver, demo)
    assert browser.console_problems(driver) == []
    sid = ask(driver, "Hello", "fast-reading", 80)  # 15 tok/s

    # Gateway side, while it streams: the page's progress reports arrive and keep up with what is on screen.
    seen: list[tuple[int, int]] = []

    def reported_enough() -> bool:
        s = stream_state(demo, sid)
        if s is not None and s["reported_tokens"] is not None:
            seen.append((s["reported_tokens"], s["written_tokens"]))
        return s is None or (seen and seen[-1][0] >= 60)

    until(reported_enough, 20, "progress reports up to 60 tokens")
    reports = sorted({r for r, _ in seen})
    assert len(reports) >= 4 and reports[-1] >= 60, seen  # a report every 0.5 s at 15 tok/s: ~7 tokens apart
    assert all(r <= w for r, w in seen)  # never more than was sent
    assert all(w - r <= 15 for r, w in seen[2:]), seen  # what is on screen and in view: within ~1 s of what was sent

    WebDriverWait(driver, 20).until(lambda d: chat_status(d).startswith("Done"))
    trace = driver.execute_script("return window.tokenflowDemo.trace.filter(e => e.sid === arguments[0])", sid)
    counts = [e["n"] for e in trace]
    assert counts == list(range(1, 81))  # every token, in order, each in its own event
    # The rate at which tokens appear, from the page's own timestamps (the first leaves at once, then paced).
    t = [e["t"] / 1000 for e in trace]
    rate = (counts[-1] - counts[1]) / (t[-1] - t[1])
    assert 12.0 <= rate <= 18.0, f"tokens appeared at {rate:.2f}/s, declared 15"
    gaps = sorted(b - a for a, b in zip(t[1:], t[2:]))
    assert 0.8 / 15 <= gaps[len(gaps) // 2] <= 1.2 / 15, f"median gap {gaps[len(gaps) // 2]:.3f} s"
    answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant p")[-1].text
    assert answer.strip() == "".join(f" tok{i}" for i in range(80)).strip()

    # The side panel followed the stream: several updates, the declared rate, tokens counted.
    gauges = driver.find_element(By.ID, "gauges")
    assert int(gauges.get_attribute("data-updates")) >= 10
    g = {el.get_attribute("data-g"): el.text for el in gauges.find_elements(By.CSS_SELECTOR, "[data-g]")}
    assert g["declared"] == "15.0 tok/s" and g["effective"] == "15.0 tok/s"
    assert re.fullmatch(r"\d+ tokens?", g["buffer"]) and re.fullmatch(r"\d+\.\d s", g["tte"])
    assert g["engine"] in ("waiting", "running", "loading", "held", "parked", "done generating")
    assert re.match(r"80 generated · \d+ sent · \d+ on screen · \d+ read \(reported\)", g["tokens"]), g["tokens"]

    text = _metrics(demo)
    accepted = float(re.search(r'tokenflow_progress_reports_total\{outcome="accepted"\} ([0-9.]+)', text).group(1))
    assert accepted >= len(reports)
    assert 'tokenflow_progress_reports_total{outcome="rejected"}' not in text or \
        re.search(r'tokenflow_progress_reports_total\{outcome="rejected"\} 0\.0', text)

    path = browser.screenshot(driver, "demo-chat")
    assert browser.png_size(path) == tuple(driver.execute_script("return [innerWidth, innerHeight]"))
    assert browser.console_problems(driver) == []


def test_text_scrolled_out_of_view_is_not_reported_and_escape_stops_the_answer(driver, demo):
    open_page(driver, demo)
    driver.execute_script("document.getElementById('log').style.height = '100px'")  # a small window: 4 lines
    sid = ask(driver, "A long answer, please", "skimming", 1000)  # 20 tok/s, far longer than the log is tall
    until(lambda: (s := stream_state(demo, sid)) and (s["reported_tokens"] or 0) >= 100, 20, "reports up to 100")
    assert driver.execute_script(
        "const log = document.getElementById('log'); return log.scrollHeight > 2 * log.clientHeight")

    # The reader scrolls back to the top: what arrives now is not in view, so it is not reported as read.
    scrolled_at = driver.execute_script(
        "const log = document.getElementById('log'); log.scrollTop = 0;"
        "return window.tokenflowDemo.streams.at(-1).rendered")
    held: list[int] = []

    def sent_well_past() -> bool:
        s = stream_state(demo, sid)
        held.append(s["reported_tokens"])
        return s["written_tokens"] >= scrolled_at + 30

    until(sent_well_past, 10, "30 more tokens sent")
    assert max(held) <= scrolled_at, (held, scrolled_at)
    # Back at the end of the answer: reports catch up with the screen.
    driver.execute_script("const log = document.getElementById('log'); log.scrollTop = log.scrollHeight")
    until(lambda: stream_state(demo, sid)["reported_tokens"] >= scrolled_at + 30, 5, "reports after scrolling back")

    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    WebDriverWait(driver, 5).until(lambda d: chat_status(d) == "Stopped.")
    until(lambda: stream_state(demo, sid) is None, 5, "the gateway dropping the stopped stream")
    status, streams = get_json(f"{demo}/v1/streams")
    assert status == 200 and sid not in [s["id"] for s in streams["data"]]
    assert browser.console_problems(driver) == []


def test_keyboard_alone_chats_stops_and_runs_a_burst(driver, demo):
    open_page(driver, demo)
    keys = ActionChains(driver)

    def tab_to(element_id: str) -> None:
        for _ in range(25):
            if driver.execute_script("return document.activeElement.id") == element_id:
                return
            keys.send_keys(Keys.TAB).perform()
        raise AssertionError(f"Tab never reached #{element_id}")

    driver.execute_script("document.activeElement.blur()")
    tab_to("prompt")
    keys.send_keys("Hi there", Keys.ENTER).perform()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "stop").is_enabled())
    keys.send_keys(Keys.ESCAPE).perform()
    WebDriverWait(driver, 5).until(lambda d: chat_status(d) == "Stopped.")
    # Focus returns to the message box, ready for the next one.
    assert driver.execute_script("return document.activeElement.id") == "prompt"

    tab_to("burst-users")
    keys.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys("12").perform()
    tab_to("burst-tokens")
    keys.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys("40").perform()
    tab_to("burst-run")
    keys.send_keys(Keys.ENTER).perform()
    WebDriverWait(driver, 60).until(lambda d: "done" in d.find_element(By.ID, "burst-status").text)

    status, state = get_json(f"{demo}/demo/burst")
    assert status == 200 and state["status"] == "done" and state["users"] == 12
    assert [lane["policy"] for lane in state["lanes"]] == ["tokenflow", "fcfs"]
    lanes = driver.find_elements(By.CSS_SELECTOR, "#lanes .lane")
    assert len(lanes) == 2
    for lane, shown in zip(state["lanes"], lanes):
        assert lane["started"] == lane["finished"] == 12 and lane["errors"] == 0
        assert len(lane["rows"]) == 12 and all(r[0] is not None and r[2] == r[3] for r in lane["rows"])
        # The page shows the gateway's figures.
        assert shown.get_attribute("data-policy") == lane["policy"]
        assert shown.find_element(By.CLASS_NAME, "p50").text == _seconds(lane["ttft_p50_s"])
        assert shown.find_element(By.CLASS_NAME, "p99").text == _seconds(lane["ttft_p99_s"])
        assert shown.find_element(By.CLASS_NAME, "served").text == "12 of 12 started"
        canvas = shown.find_element(By.TAG_NAME, "canvas")
        assert canvas.size["height"] >= 12 * 2 and canvas.size["width"] > 100
    assert browser.console_problems(driver) == []


def test_a_phone_sized_screen_stacks_the_panels_and_still_chats(driver, demo):
    driver.set_window_size(390, 844)
    try:
        open_page(driver, demo)
        width = driver.execute_script("return innerWidth")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scrolling
        rect = {name: driver.find_element(By.CSS_SELECTOR, sel).rect
                for name, sel in (("chat", ".chat"), ("gauges", ".gauges"), ("burst", ".burst"))}
        assert rect["chat"]["y"] + rect["chat"]["height"] <= rect["gauges"]["y"]
        assert rect["gauges"]["y"] + rect["gauges"]["height"] <= rect["burst"]["y"]
        assert all(r["x"] >= 0 and r["x"] + r["width"] <= width for r in rect.values())
        ask(driver, "Short one", "skimming", 12)
        WebDriverWait(driver, 15).until(lambda d: chat_status(d).startswith("Done"))
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.assistant p")[-1].text.endswith("tok11")
        path = browser.screenshot(driver, "demo-phone")
        assert browser.png_size(path)[0] == width
        assert browser.console_problems(driver) == []
    finally:
        driver.set_window_size(1280, 1000)


def _seconds(s: float) -> str:
    """As the page writes a time: JavaScript's toFixed rounds an exact tie (0.125) up, Python's format to even."""
    places = Decimal("0.01") if s < 10 else Decimal("0.1")
    return f"{Decimal(s).quantize(places, rounding=ROUND_HALF_UP)} s"


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()
