"""MCP servers behind the gateway (`protocol: mcp`): the JSON-RPC of Streamable HTTP, read
for the events while the bytes pass untouched.

The proxy forwards an MCP upstream's traffic as it forwards anything else (POST, the GET
stream, DELETE; `Mcp-Session-Id`, `MCP-Protocol-Version` and the other headers as sent),
byte for byte both ways: nothing here changes or holds back what the client or the
server receives. A `McpRecorder` only reads, after the fact:

- the answer, as it passes: each piece is relayed first (`Call.on_body`), then read when
  that read from the upstream was written to the client (`Call.on_flush`). A JSON body is
  kept (at most `max_body_mb`) and read at the end; an event stream is read event by
  event as it arrives, each event's data kept only until it ends (one larger than
  `max_body_mb` is skipped, never kept whole), and each JSON-RPC response in it noted
  with the time it arrived;
- the request body (at most `max_body_mb`: the gateway refuses larger ones), once the
  call is over (`events`), so that parsing it never delays the request either.

A call then becomes one event per JSON-RPC request or notification its body held (a
batch, several), each matched by id with its response; a body that held none (responses
to the server's own requests, GET, DELETE, a body that is not JSON-RPC) stays the one
event of the HTTP exchange. Sizes are the JSON text's as sent (`msgspec.Raw`: measured,
not decoded).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

import msgspec

from meterline import bounds
from meterline.event import Event, uuid7
from meterline.gateway.server import Request
from meterline.genai import MCP_TOOL_CALL, jsonrpc_error_type, mcp_operation

UNPARSEABLE: Final = "meterline.mcp.unparseable"  # attribute: "request" or "response"
BATCH_MAX: Final = 1000
"""Messages of a JSON-RPC batch recorded one event each; a larger batch (each message,
`{"method":"x"}`, 16 bytes, would be an event of a kilobyte) is relayed and recorded as
one event, unparseable, as a body of more than `bounds.CONTAINERS_MAX` objects is."""
_MAX_ERROR_MESSAGE: Final = 1024
_SESSION: Final = b"mcp-session-id"
_VERSION: Final = b"mcp-protocol-version"
_RESOURCE_METHODS: Final = frozenset({"resources/read", "resources/subscribe",
                                      "resources/unsubscribe"})
class _Message(msgspec.Struct):
    """A JSON-RPC message, loosely: any field may be missing or of the wrong type."""

    id: Any = msgspec.UNSET  # absent: a notification (null is an id, if a discouraged one)
    method: Any = None
    params: msgspec.Raw = msgspec.Raw()
    result: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


class _Params(msgspec.Struct):
    name: Any = None  # tools/call, prompts/get
    arguments: msgspec.Raw = msgspec.Raw()  # tools/call
    uri: Any = None  # resources/read...
    protocol_version: Any = msgspec.field(default=None, name="protocolVersion")  # initialize
    meta: Any = msgspec.field(default=None, name="_meta")


class _Result(msgspec.Struct):
    is_error: Any = msgspec.field(default=None, name="isError")  # tools/call
    content: msgspec.Raw = msgspec.Raw()  # read only when is_error
    protocol_version: Any = msgspec.field(default=None, name="protocolVersion")  # initialize


class _Content(msgspec.Struct):
    type: Any = None
    text: Any = None


class _Error(msgspec.Struct):
    code: Any = None
    message: Any = None


_messages = msgspec.json.Decoder(_Message | list[_Message])
_params = msgspec.json.Decoder(_Params)
_result = msgspec.json.Decoder(_Result)
_content = msgspec.json.Decoder(list[_Content])
_error = msgspec.json.Decoder(_Error)


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes | msgspec.Raw) -> Any:
    """`data` decoded, or None: not JSON, not of the shape, or nested too deeply."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None


class _Answer:
    """What a JSON-RPC response said, and when it arrived (None: with the body's end)."""

    __slots__ = ("code", "is_error", "message", "protocol_version", "size", "time")

    def __init__(self, message: _Message, time: float | None) -> None:
        self.time = time
        self.code: Any = None
        self.message: str | None = None
        self.is_error = False
        self.protocol_version: Any = None
        self.size: int | None = None  # of the result or the error (None: not read)
        if message.error:
            self.size = len(message.error)
            error = _decode(_error, message.error)
            if isinstance(error, _Error):
                self.code = error.code if isinstance(error.code, int) else None
                self.message = _text(error.message) or "JSON-RPC error"
            else:
                self.message = "JSON-RPC error"
            return
        self.size = len(message.result) or None
        result = _decode(_result, message.result) if message.result else None
        if isinstance(result, _Result):
            self.protocol_version = result.protocol_version
            if result.is_error is True:
                self.is_error = True
                self.message = _tool_error(result.content)


def _tool_error(content: msgspec.Raw) -> str:
    """The text a failed tool call answered (its first text part)."""
    parts = _decode(_content, content) if content else None
    for part in parts or ():
        if part.type == "text" and (text := _text(part.text)):
            return text
    return "the tool reported an error"


def _text(value: Any) -> str | None:
    return value[:_MAX_ERROR_MESSAGE] if isinstance(value, str) and value else None


def _key(value: Any) -> Any:
    """A JSON-RPC id as a dict key (ids other than strings and numbers are not matched)."""
    return value if isinstance(value, str | int | float) or value is None else msgspec.UNSET


def _id_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return value if isinstance(value, str) else str(value)


class _EventScanner:
    """The data of each server-sent event of a stream, as the bytes arrive. An event
    whose data grows past `limit` bytes is skipped as it arrives, never kept whole (`feed`
    gives None when it ends)."""

    __slots__ = ("continued", "data", "limit", "line", "partial", "size", "skipping")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.line: list[bytes] = []  # the start of a line not yet ended
        self.partial = 0  # ... its size
        self.data: list[bytes] = []  # the data lines of the event being received
        self.size = 0  # ... their size
        self.skipping = False  # the event is over the limit: read to its end, not kept
        self.continued = False  # (skipping) a line began and is not over: not blank

    def feed(self, chunk: bytes) -> list[bytes | None]:
        payloads: list[bytes | None] = []
        *lines, rest = chunk.split(b"\n")
        for piece in lines:
            if self.line:
                self.line.append(piece)
                piece, self.line, self.partial = b"".join(self.line), [], 0
            elif self.continued:  # the end of a line skipped
                self.continued = False
                continue
            if piece.endswith(b"\r"):
                piece = piece[:-1]
            if not piece:  # a blank line ends the event
                if self.skipping:
                    payloads.append(None)
                elif self.data:
                    payloads.append(b"\n".join(self.data))
                self.data, self.size, self.skipping = [], 0, False
            elif not self.skipping and piece.startswith(b"data:"):
                self.size += len(piece)
                if self.size > self.limit:
                    self._skip(continued=False)
                else:
                    self.data.append(piece[6:] if piece[5:6] == b" " else piece[5:])
        if rest:
            if self.skipping:
                self.continued = True
            else:
                self.line.append(rest)
                self.partial += len(rest)
                if self.size + self.partial > self.limit:
                    self._skip(continued=True)
        return payloads

    def _skip(self, continued: bool) -> None:
        self.skipping, self.continued = True, continued
        self.data, self.line, self.size, self.partial = [], [], 0, 0


class McpRecorder:
    """Reads one call to an MCP upstream for its events (see the module's docstring)."""

    __slots__ = ("answers", "body", "body_size", "limit", "pending", "request", "scanner",
                 "session", "status", "streaming", "unparseable", "unread", "version")

    def __init__(self, request: Request, limit: int) -> None:
        self.request = request
        self.limit = limit  # bytes of a JSON body or of one stream event read, at most
        self.pending: list[bytes] = []  # relayed, not read yet
        self.scanner: _EventScanner | None = None  # an event stream being read
        self.body: list[bytes] | None = None  # a JSON body being kept
        self.body_size = 0
        self.answers: dict[Any, _Answer] = {}  # by JSON-RPC id
        self.unparseable: str | None = None
        self.unread: float | None = None  # when a stream event too large to read ended
        self.streaming: bool | None = None
        self.status = 0  # of the response
        self.session = _header(request.headers.get(_SESSION))
        self.version = _header(request.headers.get(_VERSION))

    # --- the answer, as it passes --------------------------------------------------
    def respond(self, status: int, headers: list[tuple[bytes, bytes]], ctype: bytes) -> None:
        """The response head: the session it names, how its body reads."""
        self.status = status
        for name, value in headers:
            if name.lower() == _SESSION:
                self.session = _header(value)
        if ctype.startswith(b"text/event-stream"):
            self.streaming = True
            if status < 300:
                self.scanner = _EventScanner(self.limit)
        elif ctype.startswith(b"application/json"):
            self.streaming = False
            if status < 300:
                self.body = []

    def feed(self, data: bytes) -> None:
        """A piece of the body, relayed already: kept until `scan`."""
        if self.scanner is not None or self.body is not None:
            self.pending.append(data)

    def scan(self, now: float | None) -> None:
        """Read what was relayed since the last call (after it was written out)."""
        pending, self.pending = self.pending, []
        if self.scanner is not None:
            for data in pending:
                for payload in self.scanner.feed(data):
                    if payload is not None:
                        self._read(payload, now)
                    else:  # relayed, too large to be read
                        self.unparseable, self.unread = "response", now
        elif self.body is not None:
            for data in pending:
                self.body_size += len(data)
                self.body.append(data)
            if self.body_size > self.limit:
                self.body, self.unparseable = None, "response"

    def _read(self, payload: bytes, now: float | None) -> None:
        if not payload.strip():  # (an event without data: a priming event, a keep-alive)
            return
        messages = _decode(_messages, payload)
        if messages is None:
            self.unparseable = "response"
            return
        for message in messages if isinstance(messages, list) else (messages,):
            if message.method is None and (key := _key(message.id)) is not msgspec.UNSET:
                self.answers[key] = _Answer(message, now)

    # --- the events ------------------------------------------------------------------
    def events(self, event: Event, sent: float | None, scrub: Callable[[str], str]) -> list[Event]:
        """The call's events, from its own (`event`, finished: status, timings, errors)."""
        self.scan(None)  # (what a call cut short left unread)
        if self.body:
            self._read(b"".join(self.body), None)
            self.body = None
        if self.streaming is not None:
            event.streaming = self.streaming
        event.mcp_session_id = self.session
        messages = self._requests()
        if self.unparseable is not None:
            _set(event, UNPARSEABLE, self.unparseable)
        if not messages:
            _set(event, "http.request.method", self.request.method.decode("latin-1"))
            return [event]
        events = [event]
        for _ in messages[1:]:  # a batch: one event each, each its own span
            events.append(msgspec.structs.replace(
                event, event_id=uuid7(), span_id=os.urandom(8).hex(),
                attributes=dict(event.attributes) if event.attributes else None))
        requests = [m for m in messages if m.id is not msgspec.UNSET]
        if (len(requests) == 1 and self.unread is not None
                and (key := _key(requests[0].id)) not in self.answers):
            # one request, and a stream event too large to read: its answer, unread
            self.answers[key] = _Answer(_Message(), self.unread)
        for each, message in zip(events, messages, strict=True):
            self._fill(each, message, sent, scrub)
        return events

    def _requests(self) -> list[_Message]:
        """The requests and notifications of the request body (the messages naming a
        method); [] when it held none, is not JSON-RPC or is too large a batch to record
        message by message (`BATCH_MAX`, `bounds.CONTAINERS_MAX`)."""
        body = self.request.body
        if self.request.method != b"POST" or not body.strip():
            return []
        messages = None if bounds.too_many_containers(body) else _decode(_messages, body)
        if messages is None or (isinstance(messages, list) and len(messages) > BATCH_MAX):
            self.unparseable = "request"
            return []
        return [m for m in (messages if isinstance(messages, list) else (messages,))
                if isinstance(m.method, str)]

    def _fill(self, event: Event, message: _Message, sent: float | None,
              scrub: Callable[[str], str]) -> None:
        method: str = message.method
        event.mcp_method = method
        event.operation = mcp_operation(method)
        params = _decode(_params, message.params) if message.params else None
        version = self.version
        if message.params:  # the size of the arguments (tools/call), else of the params
            event.request_bytes = len(message.params)
        if isinstance(params, _Params):
            self._read_params(event, method, params)
            if method == MCP_TOOL_CALL:
                event.request_bytes = len(params.arguments) or None
            elif method == "initialize":
                version = params.protocol_version
        if message.id is not msgspec.UNSET:  # a request, not a notification
            self._answered(event, message, sent, scrub)
            answer = self.answers.get(_key(message.id))
            if answer is not None and method == "initialize" and answer.protocol_version:
                version = answer.protocol_version
        if isinstance(version, str) and version:
            _set(event, "mcp.protocol.version", version)

    def _read_params(self, event: Event, method: str, params: _Params) -> None:
        if method == MCP_TOOL_CALL:
            event.tool_name = params.name if isinstance(params.name, str) else None
        elif method == "prompts/get" and isinstance(params.name, str):
            _set(event, "gen_ai.prompt.name", params.name)
        elif method in _RESOURCE_METHODS and isinstance(params.uri, str):
            _set(event, "mcp.resource.uri", params.uri)
        traceparent = params.meta.get("traceparent") if isinstance(params.meta, dict) else None
        parts = traceparent.split("-") if isinstance(traceparent, str) else ()
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            event.trace_id, event.parent_span_id = parts[1], parts[2]  # the MCP client's span

    def _answered(self, event: Event, message: _Message, sent: float | None,
                  scrub: Callable[[str], str]) -> None:
        """What the request's response said, and when it came."""
        request_id = _id_text(message.id)
        if request_id is not None:
            _set(event, "jsonrpc.request.id", request_id)
            if message.method == MCP_TOOL_CALL:
                event.tool_call_id = request_id
        answer = self.answers.get(_key(message.id))
        if answer is None:
            return
        event.response_bytes = answer.size
        if answer.time is not None:  # (else: the body's end, the event's own timings)
            event.duration_ms = (answer.time - self.request.started) * 1000
            if sent is not None:
                event.provider_duration_ms = max(0.0, answer.time - sent) * 1000
                event.overhead_ms = max(0.0, event.duration_ms - event.provider_duration_ms)
            # relayed whole, then the stream was cut (clients close it once they have their
            # answer): the request is over, as it was answered
            event.status_code, event.error_type, event.error_message = self.status, None, None
        if answer.message is None:
            return
        if answer.is_error:
            event.error_type = "tool_error"
        else:
            event.error_type = jsonrpc_error_type(answer.code)
            if answer.code is not None:
                _set(event, "rpc.response.status_code", str(answer.code))
        event.error_message = scrub(answer.message)


def _set(event: Event, key: str, value: Any) -> None:
    if event.attributes is None:
        event.attributes = {}
    event.attributes[key] = value


def _header(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value else None
