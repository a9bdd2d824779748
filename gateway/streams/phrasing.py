"""Where a streamed answer may be cut for speech: whole words, and phrases ending at a clause or sentence.

A speech synthesizer needs whole words (half a word is mispronounced) and sounds right with whole phrases
(intonation runs to the comma or the full stop). :class:`PhraseBuilder` groups an answer's deltas, in order,
into such phrases. It cuts only between deltas, so every phrase carries a whole number of tokens, and it
knows a cut between two deltas is a word boundary only once the second one shows it (tokenizers put the space
at the start of the next token: ``"Hello"`` ``","`` ``" world"``). Pure code: no I/O, no clock.

Rules, in order:

* a **clause ends** where text ending in ``, ; :`` or ``. ! ?`` (or their CJK forms, optionally followed by
  closing quotes or brackets) meets whitespace, and at every line break: the phrase ends there;
* a phrase that reached ``max_words`` words ends at the next word boundary;
* a phrase of ``max_tokens`` tokens with no word boundary at all (a long URL, unspaced text) ends anyway.

Text in scripts written without spaces (CJK) has a word boundary around every such character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Clause and sentence punctuation, then optional closing quotes / brackets, at the end of the text so far.
_CLAUSE_END = re.compile(r"[,;:.!?\u2026\u3001\u3002\uff0c\uff1b\uff1a\uff01\uff1f][\"')\]\u201d\u2019\u300d\u300f]*$")
_CJK_PUNCT_END = re.compile(r"[\u3001\u3002\uff0c\uff1b\uff1a\uff01\uff1f][\u201d\u2019\u300d\u300f]*$")


def _cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF


def boundary(before: str, after: str) -> int:
    """What lies between text ``before`` and the text ``after`` that follows it: 0 inside a word, 1 a word
    boundary, 2 the end of a clause or sentence."""
    if after.startswith("\n") or before.endswith("\n") or _CJK_PUNCT_END.search(before):
        return 2
    if before[-1:].isspace() or after[:1].isspace():
        return 2 if _CLAUSE_END.search(before.rstrip()) else 1
    if not before or not after:  # an empty delta tells nothing
        return 0
    return 1 if _cjk(before[-1]) or _cjk(after[0]) else 0


@dataclass(frozen=True, slots=True)
class Phrase:
    text: str
    start: int  # tokens of the answer before it
    end: int  # tokens of the answer through its last one
    clause: bool  # it ends a clause or sentence (else: cut at a word because it grew long, or flushed)


class PhraseBuilder:
    """Groups deltas into phrases; see the module's rules. ``start`` is the first token of what it holds."""

    __slots__ = ("_cuts", "_ends", "_texts", "_words", "max_tokens", "max_words", "start")

    def __init__(self, max_words: int = 8, max_tokens: int = 32, start: int = 0) -> None:
        if max_words < 1 or max_tokens < 1:
            raise ValueError("max_words and max_tokens must be >= 1")
        self.max_words = max_words
        self.max_tokens = max_tokens
        self.start = start  # tokens before the first held delta
        self._texts: list[str] = []  # held deltas
        self._ends: list[int] = []  # token count through each held delta
        self._cuts: list[int] = []  # word boundaries: i means "between held deltas i-1 and i"
        self._words = 1  # words in the held text so far

    @property
    def held_tokens(self) -> int:
        return self._ends[-1] - self.start if self._ends else 0

    def add(self, text: str, end: int) -> list[Phrase]:
        """The next delta (its text, and the answer's token count through it); returns the phrases it completed."""
        out: list[Phrase] = []
        if self._texts:
            kind = boundary(self._texts[-1], text)
            if kind == 2:
                out.append(self._take(len(self._texts), clause=True))
            elif kind == 1:
                if self._words >= self.max_words:
                    out.append(self._take(len(self._texts), clause=False))
                else:
                    self._cuts.append(len(self._texts))
                    self._words += 1
        self._texts.append(text)
        self._ends.append(end)
        if self.held_tokens >= self.max_tokens and len(self._texts) > 1:
            # Too long with no clause end: cut at its last word boundary, or anywhere if it has none.
            out.append(self._take(self._cuts[-1] if self._cuts else len(self._texts) - 1, clause=False))
        return out

    def flush_words(self) -> Phrase | None:
        """The held text up to its last known word boundary (the last word may go on in the next delta), or
        None when no boundary is known yet."""
        if not self._cuts:
            return None
        return self._take(self._cuts[-1], clause=False)

    def finish(self) -> Phrase | None:
        """The answer ended: everything held, or None when nothing is."""
        if not self._texts:
            return None
        return self._take(len(self._texts), clause=True)

    def _take(self, n: int, clause: bool) -> Phrase:
        """The first ``n`` held deltas as a phrase; the rest stay held."""
        phrase = Phrase("".join(self._texts[:n]), self.start, self._ends[n - 1], clause)
        self.start = self._ends[n - 1]
        del self._texts[:n], self._ends[:n]
        self._cuts = [c - n for c in self._cuts if c > n]
        self._words = len(self._cuts) + 1
        return phrase
