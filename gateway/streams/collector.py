"""A non-streaming request: the engine's text gathered and returned whole when the generation ends.

Nothing is paced or sent before the end, but the reader model still runs (produced = the engine's tokens), so
the policy sees the request like any other. The engine reader hands it the same token log the session store
gets for a streamed answer (:class:`~gateway.pump.TokenSink`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import ENDED, StreamBase, StreamSpec
from .tokens import Delta, Final

if TYPE_CHECKING:
    from ..api.sse import ChunkEncoder


class Collector(StreamBase):
    __slots__ = ("_clock", "parts")

    def __init__(self, spec: StreamSpec, encoder: ChunkEncoder, *, clock: Callable[[], float]) -> None:
        """``spec.pacing`` is ``none``: nothing is paced."""
        super().__init__(spec, encoder)
        self._clock = clock
        self.parts: list[str] = []

    # --- TokenSink (the engine reader's) ---
    def extend(self, sid: str, deltas: list[Delta]) -> None:
        now = self._clock()
        for end, text, _ in deltas:
            n = end - self.generated
            if n > 0:
                self.generated = end
                self.reader.on_tokens(n, now)
            self.parts.append(text)

    def append(self, sid: str, delta: Delta) -> None:
        self.extend(sid, [delta])

    def finish(self, sid: str, final: Final) -> None:
        if final.error is not None:
            self.error = final.error
        else:
            self.finish_reason = final.reason
            self.prompt_tokens = final.prompt_tokens
        self.reader.finished = True
        self.upstream = ENDED

    def answer(self) -> dict[str, Any]:
        """The whole answer in OpenAI's format (``chat.completion`` or ``text_completion``)."""
        return self.encoder.answer("".join(self.parts), self.finish_reason, self.prompt_tokens, self.generated)
