"""Synchronous sends to a client's socket, for the pacing clock and the engine reader.

A released event normally wakes the stream's writer task, which then writes it: a task step, a future and
a few coroutine frames per event. When the socket takes data at once (its buffer below aiohttp's own drain
limit), the releaser can write the event itself instead: the writer task then only starts the stream, ends
it and waits out backpressure. Order is kept because a direct send happens only while nothing waits for the
writer task (``Stream._release``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .drain import DrainTracker
    from .stream import Stream

# Bytes buffered in the transport above which the writer task takes over (aiohttp's StreamWriter drains there).
LIMIT = 0x10000


def direct_sender(stream: "Stream", writer: Any, transport: Any, drain: "DrainTracker | None",
                  seq: int | None) -> Callable[[bytes, int], bool] | None:
    """A send function for ``stream``'s current client writer, or None when the writer cannot take one.

    ``writer`` is aiohttp's payload writer after the response headers went out; only chunked HTTP/1.1
    responses qualify (the framing is aiohttp's own ``_write_chunked_payload``, which also counts the bytes
    the drain ledger reads).
    """
    send = getattr(writer, "_write_chunked_payload", None)
    if send is None or not getattr(writer, "chunked", False) or transport is None:
        return None
    if getattr(writer, "_headers_buf", None):
        return None  # headers not sent yet: the writer task must go first
    on_write = drain.on_write if drain is not None else None

    def direct(data: bytes, tokens: int) -> bool:
        if (transport.is_closing() or transport.get_write_buffer_size() > LIMIT or stream.lost
                or (seq is not None and seq != stream.attach_seq)):
            return False
        send(data)
        if on_write is not None:
            on_write(tokens)
        return True

    return direct
