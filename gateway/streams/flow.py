"""Flow control of a paced stream's engine connection (aiohttp's base_protocol.py, uvicorn's FlowControl).

A paced stream releases tokens at its reader's rate, so an engine faster than the reader fills the stream's
queue. Above the high watermark of tokens held unsent the engine connection is not read
(``transport.pause_reading``): what the engine sends meanwhile waits in the socket and arrives in one read
once the queue is down to the low watermark. The engine keeps generating (a socket buffers hundreds of
tokens); the gateway reads its connection 0.1-0.2 times per delivered token instead of once
(docs/benchmarks.md, "Gateway efficiency").
"""

from __future__ import annotations

from collections.abc import Callable

PauseSwitch = Callable[[bool], None]  # the engine reader's pause_reading(paused)


class ReadAhead:
    """Watermarks in tokens, from ``window_s`` seconds of the reader's tokens (high) and half of that (low)."""

    __slots__ = ("_switch", "high", "low", "paused", "pauses", "window_s")

    def __init__(self, window_s: float, rate: float) -> None:
        self.window_s = window_s
        self.high = self.low = 0.0
        self.set_rate(rate)
        self.paused = False
        self.pauses = 0  # statistics: how often reading was paused
        self._switch: PauseSwitch | None = None

    def set_rate(self, rate: float) -> None:
        """The reader's rate changed: so did the tokens that make ``window_s`` seconds of reading."""
        self.high = rate * self.window_s
        self.low = 0.5 * self.high

    def connect(self, switch: PauseSwitch | None) -> None:
        """The engine reader's switch (None once the engine stream ended or moved); it starts out reading."""
        self._switch = switch
        self.paused = False

    def on_queued(self, unsent: float) -> None:
        """``unsent`` tokens wait to be released: pause reading above the high watermark."""
        if unsent > self.high and not self.paused and self._switch is not None:
            self.paused = True
            self.pauses += 1
            self._switch(True)

    def on_released(self, unsent: float) -> None:
        """Tokens were released and ``unsent`` still wait: read again at or below the low watermark."""
        if self.paused and unsent <= self.low:
            self.resume()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self._switch is not None:
                self._switch(False)
