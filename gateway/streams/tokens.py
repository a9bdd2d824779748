"""What a stream's engine produced, as the session store keeps it: the token log's entries and its end.

A :data:`Delta` is one engine event's text for one stream: ``(end, text, ids)``, the stream's token count after
it, its text and its token ids when the engine gave them. A plain tuple: one is made per event on the hot path,
and the store serialises it as a JSON array. What is kept for the life of a stream is a :class:`TokenLog`, which
holds the same in a few bytes per delta. :class:`Final` says how the generation ended.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import orjson

Delta = tuple[int, str, "list[int] | None"]


def tokens_in(deltas: Sequence[Delta]) -> int:
    """The token count after the last of ``deltas`` (0 for none)."""
    if isinstance(deltas, TokenLog):
        return deltas.tokens
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


class TokenLog(Sequence[Delta]):
    """A stream's token log, compact: what a list of :data:`Delta` holds, at about ``len(text) + 8`` bytes per
    delta rather than ~170 (a tuple, its text object, an int and a list slot each).

    Texts are kept UTF-8 encoded in one growing buffer with the end offset of each; token counts in an array.
    (Texts come from JSON parsed by orjson, which admits no lone surrogates, so every one encodes.)
    Token ids get their own arrays only once a delta carries them (engines give them only when asked). It reads
    as a sequence of ``(end, text, ids)`` tuples, made on access: the hot path only appends, and readers (a
    resumed client's replay, a continuation, a takeover's write) walk it rarely. :meth:`since` replays from a
    token count without decoding what comes before.
    """

    __slots__ = ("_ends", "_id_offs", "_ids", "_offs", "_text")

    def __init__(self, deltas: Iterable[Delta] = ()) -> None:
        self._text = bytearray()
        self._offs = array("I")  # byte offset in _text after each delta
        self._ends = array("I")  # token count after each delta
        self._ids: array[int] | None = None  # every id given so far, once one delta had ids
        self._id_offs: array[int] | None = None  # per delta: offset in _ids after it; -1 - offset when it had none
        self.extend(deltas)

    def add(self, end: int, text: str, ids: list[int] | None = None) -> None:
        """Append the delta ``(end, text, ids)`` (without making its tuple: the hot path's call)."""
        buf = self._text
        buf += text.encode()
        self._offs.append(len(buf))
        self._ends.append(end)
        if ids is not None or self._id_offs is not None:
            self._add_ids(ids)

    def append(self, delta: Delta) -> None:
        self.add(*delta)

    def extend(self, deltas: Iterable[Delta]) -> None:
        buf = self._text
        for end, text, ids in deltas:
            buf += text.encode()
            self._offs.append(len(buf))
            self._ends.append(end)
            if ids is not None or self._id_offs is not None:
                self._add_ids(ids)

    def _add_ids(self, ids: list[int] | None) -> None:
        if self._id_offs is None:  # the first delta with ids: those before had none
            self._ids, self._id_offs = array("q"), array("q", [-1] * (len(self._ends) - 1))
        assert self._ids is not None
        if ids is None:
            self._id_offs.append(-1 - len(self._ids))
        else:
            self._ids.extend(ids)
            self._id_offs.append(len(self._ids))

    @property
    def tokens(self) -> int:
        """The token count after the last delta (0 for none)."""
        return self._ends[-1] if self._ends else 0

    def __len__(self) -> int:
        return len(self._ends)

    def _delta(self, i: int) -> Delta:
        offs = self._offs
        text = self._text[offs[i - 1] if i else 0:offs[i]].decode()
        ids: list[int] | None = None
        id_offs, all_ids = self._id_offs, self._ids
        if id_offs is not None and all_ids is not None:
            hi = id_offs[i]
            if hi >= 0:
                lo = id_offs[i - 1] if i else 0
                if lo < 0:
                    lo = -1 - lo
                ids = all_ids[lo:hi].tolist()
        return (self._ends[i], text, ids)

    @overload
    def __getitem__(self, i: int) -> Delta: ...

    @overload
    def __getitem__(self, i: slice) -> list[Delta]: ...

    def __getitem__(self, i: int | slice) -> Delta | list[Delta]:
        if isinstance(i, slice):
            return [self._delta(j) for j in range(*i.indices(len(self._ends)))]
        n = len(self._ends)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("token log index out of range")
        return self._delta(i)

    def __iter__(self) -> Iterator[Delta]:
        for i in range(len(self._ends)):
            yield self._delta(i)

    def since(self, after: int) -> Iterator[tuple[int, Delta]]:
        """``(tokens before it, delta)`` for each delta that ends after token ``after``, in order."""
        ends = self._ends
        i = bisect_right(ends, after)
        prev = ends[i - 1] if i else 0
        for j in range(i, len(ends)):
            yield prev, self._delta(j)
            prev = ends[j]

    def text(self) -> str:
        """All the text so far."""
        return self._text.decode()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenLog | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"TokenLog({list(self)!r})"
