"""Synchronous sends to a client's socket, for the pacing clock and the engine reader.

A released event normally wakes the stream's writer task, which then writes it: a task step, a future and
a few coroutine frames per event. When the socket takes data at once (its buffer below aiohttp's own drain
limit), the releaser can write the event itself instead: the writer task then only starts the stream, ends
it and waits out backpressure. Order is kept because a direct send happens only while nothing waits for the
writer task (``Stream._release``).

The HTTP/1.1 chunk is framed here, in one bytes object and one ``transport.write`` (aiohttp's own chunk
writer builds three pieces and joins them), and the writer's byte count (``output_size``, which the drain
ledger reads) is kept in step by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import Upstream

if TYPE_CHECKING:
    from .drain import DrainTracker
    from .stream import Stream

MOVED = Upstream.MOVED

# Bytes buffered in the transport above which the writer task takes over (aiohttp's StreamWriter drains there).
LIMIT = 0x10000


def direct_sender(stream: Stream, writer: Any, transport: Any, drain: DrainTracker | None,
                  seq: int | None) -> Callable[[bytes, int], bool] | None:
    """A send function for ``stream``'s current client writer, or None when the writer cannot take one.

    ``writer`` is aiohttp's payload writer after the response headers went out; only chunked HTTP/1.1
    responses without compression or write callbacks qualify.
    """
    if (transport is None or not getattr(writer, "chunked", False) or not hasattr(writer, "output_size")
            or getattr(writer, "_compress", None) is not None or getattr(writer, "_on_chunk_sent", None) is not None
            or getattr(writer, "on_body_write", None) is not None):
        return None
    if getattr(writer, "_headers_buf", None):
        return None  # headers not sent yet: the writer task must go first
    write = transport.write
    buffered = transport.get_write_buffer_size
    closing = transport.is_closing
    on_write = drain.on_write if drain is not None else None

    def direct(data: bytes, tokens: int) -> bool:
        if (stream.upstream is MOVED or (seq is not None and seq != stream.attach_seq) or closing()
                or buffered() > LIMIT):
            return False
        framed = b"%x\r\n%b\r\n" % (len(data), data)
        total = writer.output_size + len(framed)
        writer.output_size = total
        write(framed)
        if on_write is not None:
            on_write(tokens, total)
        return True

    return direct
