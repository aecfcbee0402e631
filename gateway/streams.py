"""Cutting a streamed response body into its messages as the bytes arrive.

Server-sent events (OpenAI, Anthropic) end each event with a blank line;
Ollama streams one JSON object per line. A splitter returns the complete
messages in what it was fed, each with its terminator, and keeps the rest for
the next call, so the relay forwards whole events and never waits for more than
the one being received.
"""

from __future__ import annotations


class SSESplitter:
    """Server-sent events: blocks ending with a blank line. CRLF is read as LF."""

    separator = b"\n\n"

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        sep = self.separator
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        elif data and not self.pending and data.find(sep) == len(data) - len(sep):
            return [data]  # the usual read: exactly one whole message
        buf = self.pending + data if self.pending else data
        end = buf.rfind(self.separator)
        if end < 0:
            self.pending = buf
            return []
        end += len(self.separator)
        self.pending = buf[end:]
        return [block + self.separator for block in buf[:end - len(self.separator)].split(
            self.separator)]

    def rest(self) -> bytes:
        """What was left unterminated when the stream ended."""
        rest, self.pending = self.pending, b""
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
