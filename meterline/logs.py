"""Structured logs: one line per noteworthy thing, JSON or console.

Never log the content of prompts or outputs: log counts, ids and reasons. Text that
comes from elsewhere (an exporter's error, which may quote what a server was sent; a
decoder's reason) goes through `bounded`, and an exporter's error through `scrub`
against the batch it was about, so that neither can carry a prompt into the logs.

Such text, and names from traffic (a model a client sent, a user id), may hold
characters a terminal acts on: ESC and C1 sequences (colours, a cleared screen, OSC 8
links), bidirectional overrides, line breaks. The console renderer writes a string
without spaces or quotes as it is, so `_inert` hands it any string that is not all
printable as an escaped, quoted form (`'gpt\\x9b2J'`). A traceback keeps its line
breaks, for a person to read, and has every other such character escaped; each of its
lines is indented, so that none starts where a record does (with its timestamp, at the
first column): an exception's message may quote traffic, and a line break in it would
otherwise begin a line that reads as a record of its own. JSON lines escape them all.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor


def configure(level: str = "info", encoding: str = "console") -> None:
    """The daemon's log, and the records of the libraries it runs in the same form."""
    last: list[Processor] = ([structlog.processors.JSONRenderer()] if encoding == "json"
                             else [_inert, structlog.dev.ConsoleRenderer(
                                 colors=sys.stderr.isatty())])
    stamp: list[Processor] = [structlog.processors.add_log_level,
                              structlog.processors.TimeStamper(fmt="iso", utc=True),
                              structlog.processors.format_exc_info]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamp, *last],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_libraries(level, [structlog.stdlib.add_logger_name, *stamp, _foreign], last)


def _route_libraries(level: str, chain: list[Processor], last: list[Processor]) -> None:
    """The libraries the daemon runs (aiohttp, asyncio, grpc, clickhouse-connect...) log
    through `logging`. With no handler there, Python writes their records to stderr as
    bare text: a line a JSON log's reader cannot parse, carrying in clear whatever the
    library quoted (aiohttp logs the start of a request line it refuses, query string
    and all). Their records, from WARNING up, are written as ours are, with the name of
    their logger, and their text masked (`_foreign`). Python's warnings go the same way."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last])
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER]:
        root.removeHandler(handler)  # configured again (a test)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))
    logging.captureWarnings(True)


_HANDLER = "meterline"
_MASKED_CHARS = 1 << 16  # of a library's message, masked at most (then cut: `bounded`)


def _foreign(_logger: object, _name: str, event_dict: EventDict) -> EventDict:
    """A library's message and traceback may quote traffic (a URL, a header, a value it
    could not parse): what the built-in detectors find in either is masked, as in a
    refused item's reason, and the message is cut to one bounded line."""
    from meterline.processors.redact.engine import masked  # compiled on first use

    # Masked before it is cut: a key cut in two at the cut would no longer read as one.
    # (A message past `_MASKED_CHARS` keeps only its two ends, far past what is kept.)
    message = str(event_dict.get("event", ""))
    if len(message) > _MASKED_CHARS:
        message = f"{message[:_MASKED_CHARS // 2]} {message[-_MASKED_CHARS // 2:]}"
    event_dict["event"] = bounded(masked([message])[0])
    if isinstance(event_dict.get("exception"), str):
        event_dict["exception"] = masked([event_dict["exception"]])[0]
    return event_dict


class _Escaped:
    """A string the console renderer writes by its `repr`, as it does any other value:
    quoted, with every character that is not printable escaped."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)

    __str__ = __repr__  # the message column is written with `str`


def _inert(_logger: object, _name: str, event_dict: EventDict) -> EventDict:
    """Strings a terminal could act on made inert for the console (see the module's doc);
    `isprintable` is one pass in C, so a plain line costs next to nothing."""
    for key, value in event_dict.items():
        if key == "exception" and isinstance(value, str):
            event_dict[key] = _traceback(value)
        elif isinstance(value, str) and not value.isprintable():
            event_dict[key] = _Escaped(value)
    return event_dict


_TRACEBACK_INDENT = "  "


def _traceback(text: str) -> str:
    """`text`, an exception as `format_exc_info` wrote it, with each line indented and
    what is not printable in a line escaped: whatever its message holds, no line of it
    can pass for a record of the log."""
    return "\n".join(_TRACEBACK_INDENT + (line if line.isprintable() else repr(line)[1:-1])
                     for line in text.split("\n"))


def get(**bound: object) -> FilteringBoundLogger:
    return structlog.get_logger().bind(**bound)


class Sparse:
    """One log line per `interval` about something that may come in a flood (a refused
    connection, a failed queue write while the disk is full): each line says how many
    there were since the one before, so the log neither floods nor hides a count."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.total = 0  # occurrences since the start
        self._logged = 0  # ... of which a line has told
        self._next = 0.0

    def due(self) -> int | None:
        """Count one occurrence; when a line is due, how many it tells (this one with
        those left out since the last line), else None."""
        self.total += 1
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.interval
        told, self._logged = self.total - self._logged, self.total
        return told


MAX_TEXT_CHARS = 300
"""Foreign text in a log line (an error, a reason) is cut to this length."""
_WINDOW, _STEP = 12, 4  # probes: 12 characters at every 4th position


def bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` on one line and at most `limit` characters long (and the cut's "..."): its
    start and its end, where what went wrong often is (an exception's cause, a slow
    task's duration)."""
    text = " ".join(text.split())
    return "...".join(text[kept] for kept in _kept(len(text), limit))


def _kept(length: int, limit: int) -> list[slice]:
    """The parts of a one-line text of `length` characters that `bounded` keeps."""
    if length <= limit:
        return [slice(0, length)]
    head = limit * 2 // 3
    return [slice(0, head), slice(length - (limit - head), length)]


def scrub(text: str, contents: Iterable[str]) -> str:
    """`bounded(text)` with every run of 16 or more characters that also occurs in
    `contents` (the prompts and outputs of the batch an error is about) masked as
    `<content>`: an exporter's error may quote the payload it was refused for. A run the
    cut splits is found whole, so that no piece of it is left in clear at either side.

    Each search scans the whole batch (megabytes), so the text is probed, around what
    is kept only, at every `_STEP`-th position (any shared run of `_WINDOW + _STEP - 1` =
    15 characters holds a probe), and a probe found is widened to the whole shared run."""
    text = " ".join(text.split())
    blob = "\0".join(contents)
    parts = _kept(len(text), MAX_TEXT_CHARS)
    if len(text) < _WINDOW or not blob:
        return "...".join(text[part] for part in parts)
    masked = [False] * len(text)
    reach = _WINDOW + _STEP  # a run reaching into a kept part holds a probe this close
    for part in parts:
        first = max(0, part.start - reach)
        for probe in range(first, min(part.stop + reach, len(text)) - _WINDOW + 1, _STEP):
            start, end = probe, probe + _WINDOW
            if masked[start] or text[start:end] not in blob:
                continue
            while start > 0 and text[start - 1:end] in blob:
                start -= 1
            while end < len(text) and text[start:end + 1] in blob:
                end += 1
            masked[start:end] = [True] * (end - start)
    out: list[str] = []
    for part in parts:
        piece: list[str] = []
        for i in range(part.start, part.stop):
            if not masked[i]:
                piece.append(text[i])
            elif i == part.start or not masked[i - 1]:
                piece.append("<content>")
        out.append("".join(piece))
    return "...".join(out)


def contents(events: Iterable[Any]) -> Iterator[str]:
    """Every string inside the events' `input_messages` and `output_messages`."""
    for e in events:
        for messages in (e.input_messages, e.output_messages):
            if messages:
                yield from _strings(messages)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        # whitespace as `bounded` writes it, so that a quoted run still matches
        yield " ".join(value.split())
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
