"""Server-sent events in OpenAI's chunk format, built from pre-encoded bytes.

Per stream, the constant part of every chunk is encoded once; a token's chunk is then
``prefix + json(text) + suffix``, with no per-token dict building. Every event carries an ``id:``
``<stream id>:<tokens so far>`` so a client can resume with ``Last-Event-ID``.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    __slots__ = ("_id_prefix", "_prefix", "_role_sent", "_suffix", "created", "kind", "model", "object_id", "sid")

    def __init__(self, kind: str, stream_id: str, model: str, created: int) -> None:
        self.kind = kind
        self.sid = stream_id
        self.object_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + stream_id
        self.model = model
        self.created = created
        head = orjson.dumps(
            {"id": self.object_id, "object": self._object(), "created": created, "model": model}
        )[:-1]  # drop the closing brace to append choices
        if kind == "chat":
            self._prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._prefix = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._suffix = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._id_prefix = b"id: " + stream_id.encode() + b":"
        self._role_sent = False

    def _object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def resumed(self, past_start: bool) -> None:
        """A client resumes this stream; past the first token it has had the assistant role already."""
        self._role_sent = past_start

    def event_id(self, index: int) -> bytes:
        return self._id_prefix + str(index).encode() + b"\n"

    def token(self, text: str, index: int) -> bytes:
        """The event for a text delta; ``index`` = tokens delivered once it is read."""
        if self.kind == "chat" and not self._role_sent:
            self._role_sent = True
            return self.event_id(index) + self._json({"delta": {"role": "assistant", "content": text}})
        return b"%b%d\n%b%b%b" % (self._id_prefix, index, self._prefix, orjson.dumps(text), self._suffix)

    def finish(self, reason: str, index: int) -> bytes:
        delta: dict[str, Any] = {"delta": {}} if self.kind == "chat" else {"text": ""}
        if self.kind == "chat" and not self._role_sent:
            self._role_sent = True
            delta = {"delta": {"role": "assistant", "content": ""}}
        return self.event_id(index) + self._json(delta, finish_reason=reason)

    def usage(self, prompt_tokens: int, completion_tokens: int, index: int) -> bytes:
        obj = {
            "id": self.object_id,
            "object": self._object(),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_dict(prompt_tokens, completion_tokens),
        }
        return self.event_id(index) + b"data: " + orjson.dumps(obj) + b"\n\n"

    def error(self, message: str, code: str) -> bytes:
        err = {"message": message, "type": "server_error", "param": None, "code": code}
        return b"data: " + orjson.dumps({"error": err}) + b"\n\n"

    def answer(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
               ) -> dict[str, Any]:
        """A non-streamed answer, whole: ``chat.completion`` or ``text_completion``."""
        chat = self.kind == "chat"
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {
            "index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {"id": self.object_id, "object": "chat.completion" if chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_dict(prompt_tokens, completion_tokens)}

    def _json(self, choice_body: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, **choice_body, "logprobs": None, "finish_reason": finish_reason}
        obj = {"id": self.object_id, "object": self._object(), "created": self.created, "model": self.model,
               "choices": [choice]}
        return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
