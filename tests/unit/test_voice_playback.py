"""The voice example's playback clock: when phrases play, what has been heard, where the silences are."""

from __future__ import annotations

import pytest

from examples.voice.playback import PlaybackClock
from examples.voice.tts import SynthesisError, parse_wav, wav_bytes


def test_phrases_play_back_to_back_and_a_late_one_leaves_a_silence():
    c = PlaybackClock()
    c.add("one two", 0, 2, received=0.0, ready=0.1, duration=1.0)
    c.add(" three", 2, 3, received=0.5, ready=0.6, duration=0.5)  # ready long before the first ends: no gap
    c.add(" four", 3, 4, received=1.9, ready=2.0, duration=0.5)  # the second ended at 1.6: 0.4 s of silence
    assert [p.start for p in c.phrases] == [0.1, 1.1, 2.0]
    assert c.gaps() == [0.0, pytest.approx(0.4)]
    assert c.end == pytest.approx(2.5) and c.audio_s == pytest.approx(2.0)
    assert c.speech_rate() == pytest.approx(4 / 2.0)


def test_playback_starts_once_enough_audio_is_ready_or_the_answer_ended():
    c = PlaybackClock(start_buffer_s=1.0)
    c.add("hi", 0, 1, received=0.0, ready=0.1, duration=0.4)  # a first word alone: not yet
    assert c.phrases == [] and c.heard(5.0) == 0
    c.add(" there you are", 1, 4, received=0.2, ready=0.5, duration=1.2)
    assert [p.start for p in c.phrases] == [0.5, pytest.approx(0.9)] and c.gaps() == [0.0]
    short = PlaybackClock(start_buffer_s=1.0)
    short.add("ok", 0, 1, received=0.0, ready=0.1, duration=0.3)
    short.finish(0.2)  # the answer ended: play what there is
    assert [p.start for p in short.phrases] == [0.2]


def test_heard_counts_the_share_of_the_phrase_playing():
    c = PlaybackClock()
    c.add("a b c d", 0, 4, received=0.0, ready=0.0, duration=2.0)
    c.add(" e f", 4, 6, received=0.0, ready=0.0, duration=1.0)
    assert [c.heard(t) for t in (0.0, 0.49, 0.5, 1.99, 2.0, 2.5, 3.0, 9.0)] == [0, 0, 1, 3, 4, 5, 6, 6]
    assert c.speech_rate_between(0.0, 2.0) == pytest.approx(2.0)
    assert c.speech_rate_between(2.0, 3.0) == pytest.approx(2.0)


def test_wav_round_trip_and_a_streamed_header():
    pcm = b"\x01\x00\x02\x00" * 100
    clip = parse_wav(wav_bytes(pcm, 16000))
    assert clip.pcm == pcm and clip.sample_rate == 16000 and clip.duration == pytest.approx(200 / 16000)
    streamed = bytearray(wav_bytes(pcm, 16000))
    streamed[40:44] = b"\xf0\xff\xff\x7f"  # written to a pipe: the data length is unknown, the data runs to the end
    assert parse_wav(bytes(streamed)).pcm == pcm
    with pytest.raises(SynthesisError):
        parse_wav(b"not audio")


def test_the_speech_rate_leaves_silences_out():
    c = PlaybackClock()
    c.add("a b", 0, 2, received=0.0, ready=0.0, duration=1.0)
    c.add(" c d", 2, 4, received=3.0, ready=3.0, duration=1.0)  # two seconds of silence before it
    assert c.speech_rate_between(0.0, 4.0) == pytest.approx(2.0)


async def test_syntheses_wait_their_turn_in_deadline_order():
    import asyncio

    from examples.voice.tts import DeadlineSlots

    slots = DeadlineSlots(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(name: str, deadline: float, hold: bool = False) -> None:
        async with slots.take(deadline):
            order.append(name)
            if hold:
                await gate.wait()

    first = asyncio.ensure_future(job("first", 9.0, hold=True))
    await asyncio.sleep(0)
    late, soon, cancelled = (asyncio.ensure_future(job(n, d)) for n, d in (("late", 5.0), ("soon", 1.0), ("gone", 0.5)))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.set()
    await asyncio.gather(first, late, soon, cancelled, return_exceptions=True)
    assert order == ["first", "soon", "late"] and slots.free == 1


def test_an_underrun_is_put_down_to_late_text_or_late_synthesis():
    from examples.voice.burst import underrun_causes
    from examples.voice.pipeline import LEAD_S, VoiceResult

    v = VoiceResult()
    c = v.clock
    c.add("a", 0, 1, received=0.0, ready=0.0, duration=1.0)  # plays until 1.0
    c.add(" b", 1, 2, received=0.9, ready=1.3, duration=1.0)  # text came 0.1 s before it was needed: the gateway's
    c.add(" c", 2, 3, received=2.3 - LEAD_S - 0.5, ready=2.6, duration=1.0)  # text in hand, synthesis late
    c.add(" d", 3, 4, received=3.0, ready=3.0, duration=1.0)  # on time
    assert underrun_causes(v) == (1, 1)
