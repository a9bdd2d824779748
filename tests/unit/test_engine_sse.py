"""The engine SSE parser: events split anywhere across reads, several per read, CRLF, the end marker, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.engines.client import EngineClient, EngineError


class _Content:
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = list(parts)

    async def readany(self) -> bytes:
        return self.parts.pop(0) if self.parts else b""


class _Resp:
    def __init__(self, parts: list[bytes]) -> None:
        self.content = _Content(parts)


def _ev(text: str, ids: list[int], finish: str | None = None, sep: bytes = b"\n") -> bytes:
    obj = {"choices": [{"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(obj) + sep + sep


async def _collect(parts: list[bytes], kind: str = "completion") -> list[list[Any]]:
    return [[(d.text, d.tokens, d.finish_reason, d.usage) for d in b]
            async for b in EngineClient.delta_batches(_Resp(parts), kind)]  # type: ignore[arg-type]


async def test_several_events_per_read_come_as_one_batch() -> None:
    body = _ev(" a", [1]) + _ev(" b", [2, 3]) + _ev("", [], "length")
    batches = await _collect([body + b"data: [DONE]\n\n"])
    assert batches == [[(" a", 1, None, None), (" b", 2, None, None), ("", 0, "length", None)]]


async def test_events_split_at_every_byte_boundary_parse_the_same() -> None:
    body = _ev(" héllo", [7]) + _ev(" x", [8], sep=b"\r\n") + b"data: [DONE]\n\n"
    whole = [d for b in await _collect([body]) for d in b]
    for cut in range(1, len(body)):
        split = [d for b in await _collect([body[:cut], body[cut:]]) for d in b]
        assert split == whole, cut


async def test_stops_at_done_and_reads_usage() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    batches = await _collect([_ev(" a", [1]) + usage + b"data: [DONE]\n\n" + _ev(" ignored", [9])])
    assert batches == [[(" a", 1, None, None), ("", 0, None, {"prompt_tokens": 3, "completion_tokens": 1})]]


async def test_chat_deltas_and_an_unterminated_last_event() -> None:
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"token_ids":[4,5]}]}'
    assert await _collect([chunk], "chat") == [[("hi", 2, None, None)]]


async def test_malformed_chunk_and_engine_error_raise() -> None:
    with pytest.raises(EngineError):
        await _collect([b"data: {not json\n\n"])
    with pytest.raises(EngineError, match="boom"):
        await _collect([b'data: {"error":{"message":"boom"}}\n\n'])
