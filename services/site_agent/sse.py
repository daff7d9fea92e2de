"""Server-sent events from bytes as they arrive: each event's data, whole events only.

Lines end with LF, CRLF or CR; a blank line ends an event; an event's `data:` lines are
joined with LF (one space after the colon dropped). Other fields (`event:`, `id:`, `retry:`)
and comments are ignored, and an event without data (a keep-alive) yields nothing. What comes
after the last blank line of a read waits for the next one.
"""

from __future__ import annotations

DONE = b"[DONE]"
"""The data of OpenAI's (and vLLM's) last event."""


class SSESplitter:
    """Splits an event stream read in arbitrary pieces into its events' data."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Return the data of every event that `data` completes, in order."""
        buffer = self._tail + data if self._tail else data
        if b"\r" in buffer:
            buffer = _lf_only(buffer)
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._tail = buffer
            return []
        self._tail = buffer[end + 2 :]
        events = []
        for block in buffer[:end].split(b"\n\n"):
            event = _event_data(block)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[bytes]:
        """Return the data of a last event that the stream ended without its blank line.

        Only whole lines count: a line cut off by a broken connection is dropped rather than
        passed on half-written.
        """
        tail, self._tail = self._tail, b""
        if tail.endswith(b"\r"):
            tail = tail[:-1] + b"\n"
        end = tail.rfind(b"\n")
        event = _event_data(tail[:end]) if end >= 0 else None
        return [] if event is None else [event]


def _lf_only(buffer: bytes) -> bytes:
    """Return `buffer` with CRLF and CR line ends made LF.

    A CR at the very end stays as it is: it may be the first half of a CRLF that the next
    read completes, and taken as a line end now it would make that LF a second one.
    """
    if buffer.endswith(b"\r"):
        return buffer[:-1].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + b"\r"
    return buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _event_data(block: bytes) -> bytes | None:
    """Return the data of one event's lines, None if it has no data line."""
    values = [
        line[6:] if line.startswith(b"data: ") else line[5:]
        for line in block.split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(values) if values else None
