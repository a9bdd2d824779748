"""What a stream's engine produced, as the session store keeps it: the token log's entries and its end.

A :data:`Delta` is one engine event's text for one stream: ``(end, text, ids)``, the stream's token count after
it, its text and its token ids when the engine gave them. A plain tuple: one is made per event on the hot path,
and the store serialises it as a JSON array. :class:`Final` says how the generation ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

Delta = tuple[int, str, "list[int] | None"]


def tokens_in(deltas: Sequence[Delta]) -> int:
    """The token count after the last of ``deltas`` (0 for none)."""
    return deltas[-1][0] if deltas else 0


@dataclass(slots=True)
class Final:
    """How a stream ended."""

    reason: str | None
    prompt_tokens: int
    error: tuple[str, str] | None = None  # (message, code)

    def to_json(self) -> bytes:
        return orjson.dumps([self.reason, self.prompt_tokens, self.error])

    @classmethod
    def from_json(cls, raw: bytes | str) -> Final:
        reason, prompt, err = orjson.loads(raw)
        return cls(reason, int(prompt), (str(err[0]), str(err[1])) if err else None)
