"""Cutting a streamed response body into its messages as the bytes arrive.

Server-sent events (OpenAI, Anthropic) end each event with a blank line;
Ollama streams one JSON object per line. A splitter returns the complete
messages in what it was fed, each with its terminator, and keeps the rest for
the next call, so the relay forwards whole events and never waits for more than
the one being received.
"""

from __future__ import annotations

from typing import Final

MESSAGE_MAX: Final = 16 << 20
"""Bytes of one stream message held to be read whole. A longer one (no provider sends
one; a broken or hostile upstream might, a stream that never ends a message) is relayed
as it comes, unread (`Unread`): neither held in memory nor copied at every read."""


class Unread(bytes):
    """Bytes of a stream message longer than the splitter's limit: for the client as they
    are, not a message to read."""


class SSESplitter:
    """Server-sent events: blocks ending with a blank line. CRLF is read as LF."""

    separator = b"\n\n"

    def __init__(self, limit: int = MESSAGE_MAX) -> None:
        self.limit = limit
        self.pending = bytearray()  # the message begun (grows in place: no copy per read)
        self.skipping = False  # inside a message longer than `limit`: relayed unread
        self.last = b""  # the last byte relayed unread (a separator may span two reads)

    def feed(self, data: bytes) -> list[bytes]:
        sep = self.separator
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        elif (data and not self.pending and not self.skipping
              and data.find(sep) == len(data) - len(sep)):
            return [data]  # the usual read: exactly one whole message
        out: list[bytes] = []
        if self.skipping:
            probe = self.last + data
            if (end := probe.find(sep)) < 0:
                self.last = probe[1 - len(sep):] if len(sep) > 1 else b""
                return [Unread(data)] if data else []
            end += len(sep) - len(self.last)
            out.append(Unread(data[:end]))
            data, self.skipping, self.last = data[end:], False, b""
        searched = max(0, len(self.pending) - len(sep) + 1)  # (only the new bytes, and
        self.pending += data                                 # a separator they complete)
        if (end := self.pending.rfind(sep, searched)) >= 0:
            out += [bytes(block) + sep for block in self.pending[:end].split(sep)]
            del self.pending[:end + len(sep)]
        if len(self.pending) > self.limit:
            out.append(Unread(self.pending))
            self.last = bytes(self.pending[1 - len(sep):]) if len(sep) > 1 else b""
            self.pending, self.skipping = bytearray(), True
        return out

    def rest(self) -> bytes:
        """What was left unterminated when the stream ended."""
        rest, self.pending = bytes(self.pending), bytearray()
        return rest

    @staticmethod
    def payload(block: bytes) -> bytes | None:
        """The `data` of an event (its data lines joined), or None if it has none."""
        if block.startswith(b"data: ") and block.count(b"\n") <= 2:
            return block[6:].rstrip(b"\n")
        lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n")
                 if line.startswith(b"data:")]
        return b"\n".join(lines) if lines else None


class LineSplitter(SSESplitter):
    """Newline-delimited JSON: one message per line."""

    separator = b"\n"

    @staticmethod
    def payload(block: bytes) -> bytes | None:
        line = block.strip()
        return line or None
