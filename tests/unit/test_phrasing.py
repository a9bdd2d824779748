"""Where speech may be cut: word and clause boundaries between deltas, and phrases built from them."""

from __future__ import annotations

import pytest

from gateway.streams.phrasing import Phrase, PhraseBuilder, boundary


@pytest.mark.parametrize("before, after, kind", [
    ("Hel", "lo", 0),           # inside a word
    ("don", "'t", 0),
    ("well", "-known", 0),
    ("3,", "000", 0),           # a comma inside a number is no clause end
    (" Hello", " world", 1),    # the space that starts the next token
    ("Hello ", "world", 1),
    (" world", ",", 0),         # punctuation sticks to its word
    (",", " and", 2),           # ... and ends the clause once the next word shows
    (" end.", " Next", 2),
    (" it?\"", " she", 2),      # closing quotes after the sentence end
    (" (see", " below)", 1),
    (" one", "\n", 2),          # a line break
    ("\n", "Two", 2),
    ("你", "好", 1),             # CJK: every character is a word
    ("好。", "我", 2),           # and its full stop ends a clause without any space
    ("", "x", 0),               # no text: nothing known
    ("", " x", 1),              # but a space starts a word
])
def test_boundary_between_two_deltas(before, after, kind):
    assert boundary(before, after) == kind


def feed(b: PhraseBuilder, deltas: list[str]) -> list[Phrase]:
    out = []
    for i, text in enumerate(deltas, start=1):
        out += b.add(text, i)
    return out


def test_phrases_end_at_clauses_and_carry_their_token_counts():
    b = PhraseBuilder(max_words=8)
    out = feed(b, ["Well", ",", " the", " cat", " sat", ".", " Then", " it", " left"])
    assert out == [Phrase("Well,", 0, 2, True), Phrase(" the cat sat.", 2, 6, True)]
    assert b.held_tokens == 3 and b.start == 6
    assert b.finish() == Phrase(" Then it left", 6, 9, True)
    assert b.finish() is None


def test_a_long_phrase_is_cut_at_a_word_once_it_has_max_words():
    b = PhraseBuilder(max_words=3)
    out = feed(b, [" tok0", " tok1", " tok2", " tok3", " tok4", " tok5", " to", "k6"])
    assert [p.text for p in out] == [" tok0 tok1 tok2", " tok3 tok4 tok5"]
    assert all(not p.clause for p in out)
    assert b.finish() == Phrase(" tok6", 6, 8, True)  # the word in two tokens stays whole


def test_flush_gives_the_whole_words_and_keeps_a_word_that_may_go_on():
    b = PhraseBuilder(max_words=8)
    feed(b, [" Hel", "lo", " wor"])  # " wor" may continue
    assert b.flush_words() == Phrase(" Hello", 0, 2, False)
    assert b.flush_words() is None  # " wor": no boundary known after it
    assert b.add("ld", 4) == [] and b.add("!", 5) == []
    assert b.add(" Bye", 6) == [Phrase(" world!", 2, 5, True)]


def test_text_without_any_boundary_is_cut_at_max_tokens():
    b = PhraseBuilder(max_words=8, max_tokens=4)
    out = feed(b, ["https", "://", "exa", "mple", ".com", "/x"])
    assert out == [Phrase("https://exa", 0, 3, False)]  # cut before the delta that made it too long
    assert b.start == 3 and b.held_tokens == 3


def test_multi_token_deltas_count_their_tokens():
    b = PhraseBuilder()
    assert b.add(" Hi", 2) == [] and b.add(",", 3) == []
    assert b.add(" you", 5) == [Phrase(" Hi,", 0, 3, True)]
    assert b.finish() == Phrase(" you", 3, 5, True)


def test_builder_limits_are_checked():
    with pytest.raises(ValueError):
        PhraseBuilder(max_words=0)
