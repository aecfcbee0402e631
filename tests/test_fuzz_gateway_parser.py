"""Fuzzing the gateway's request parser (gateway/server.py `ClientConnection`) and its
routing (gateway/proxy.py) over a real socket: whatever bytes a client sends, the answer
is well-formed HTTP, either forwarded from the upstream or a refusal of the gateway's own
for a reason it names; never a 500 of its own, and it keeps serving afterwards."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import httptools
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.gateway.fakeupstream import FakeUpstream
from tests.fuzz_helpers import LoopThread, fuzz
from tests.gateway_helpers import gateway, openai_upstream

# What the gateway answers itself: a malformed or refused request, a timeout, a body or a
# head over the limits, CONNECT/upgrades; and what an upstream failure becomes.
OWN = {400, 405, 408, 413, 414, 431, 501, 502, 503, 504}


@pytest.fixture(scope="module")
def proxy() -> Any:
    thread = LoopThread()
    upstream = FakeUpstream()
    thread.run(upstream.start())
    context = gateway({"openai": openai_upstream(upstream.url)}, read_timeout="300ms",
                      keepalive_timeout="1s", max_body_mb=0.0625)
    running = thread.run(context.__aenter__())
    try:
        yield running
    finally:
        thread.run(context.__aexit__(None, None, None))
        thread.run(upstream.stop())
        thread.close()


def _mostly(usual: list[bytes], odd: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of `usual` most of the time, one of `odd` about once in five (most examples must
    get past the parser to exercise the routing and the proxy)."""
    return st.sampled_from(usual * (4 * len(odd) // len(usual) + 1) + odd)


METHODS = _mostly([b"POST", b"POST", b"GET", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"],
                  [b"TRACE", b"CONNECT", b"PRI", b"BREW", b"post", b"G\x00T", b""])
TARGETS = st.sampled_from([
    b"/v1/chat/completions", b"/openai/v1/chat/completions", b"/v1/embeddings", b"/v1/models",
    b"/v1/../../../etc/passwd", b"/v1/%2e%2e/admin", b"/v1/./x", b"/v1\\..\\x",
    b"http://evil.example/v1/chat/completions", b"evil.example:443", b"*", b"", b"/?a=b",
    b"/openai", b"/v1/chat/completions?x=%00", b"/" + b"a" * 9000, b"/v1/%ff%fe"])
HEADER_NAMES = _mostly([
    b"Host", b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"Authorization",
    b"Connection", b"Expect", b"Upgrade", b"X-Meterline-Metadata", b"traceparent",
    b"Forwarded", b"X-Forwarded-Host", b"X-Original-URL", b"x-api-key", b"X-A"],
    [b"Bad Name", b"", b"X\x00"])
HEADER_VALUES = st.sampled_from([
    b"application/json", b"chunked", b"gzip, chunked", b"close", b"keep-alive", b"100-continue",
    b"websocket", b"Bearer sk-test", b"-1", b"99999999999999999999", b"5", b"0",
    b'{"team": "a"}', b'{"team": "a\\r\\nb"}', b"[" * 3000, b"00-" + b"a" * 32 + b"-" + b"b" * 16
    + b"-01", b"a\rb", b"x" * 70_000, b""]) | st.binary(max_size=30)
BODIES = st.sampled_from([
    b"", b"{}", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "gpt-4o-mini", "stream": true, "messages": []}', b"[" * 5000, b"null",
    b'{"model": 1e400, "messages": 5}', b'{"input": ' + b"9" * 5000 + b"}",
    b"x" * 70_000]) | st.binary(max_size=100)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method, target, body = draw(METHODS), draw(TARGETS), draw(BODIES)
    version = draw(_mostly([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.1 x",
                                                                     b""]))
    headers = [(b"Host", b"gw")] if draw(st.booleans()) else []
    headers += draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4))
    if draw(st.integers(0, 9)) == 0:  # many headers
        headers += [(b"X-%d" % i, b"v") for i in range(draw(st.integers(90, 400)))]
    framing = draw(st.sampled_from(["length"] * 4 + ["chunked", "none", "wrong-length"]))
    if framing == "none" and draw(st.sampled_from([True] * 4 + [False])):
        body = b""  # (else the body is read as the next request: mostly a 400)
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "wrong-length":
        headers.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(-5, 5)))))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        size = draw(st.sampled_from([b"%x" % len(body), b"zz", b"ffffffffffffffffff", b"-1"]))
        body = size + b"\r\n" + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    head = b"%s %s %s\r\n" % (method, target, version)
    head += b"".join(b"%s: %s\r\n" % h for h in headers)
    return head + b"\r\n" + body


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """What a client sends on one connection: requests (pipelined), random bytes, or both."""
    garbage = st.binary(min_size=1, max_size=100)
    parts = draw(st.lists(st.sampled_from([True] * 5 + [False]).flatmap(
        lambda usual: requests() if usual else garbage), min_size=1, max_size=3))
    return b"".join(parts)


_SENTINEL = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"


class _Responses:
    """httptools callbacks: the responses found in what the gateway wrote."""

    def __init__(self) -> None:
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))
        self.headers, self.body = {}, b""


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):  # (refused and closed while we still sent)
            s.sendall(data + _SENTINEL)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    found = _Responses()
    parser = httptools.HttpResponseParser(found)
    found.parser = parser  # type: ignore[attr-defined]
    parser.feed_data(data)  # raises on anything that is not HTTP
    return found.done


@fuzz(60)
@given(streams())
def test_any_bytes_get_well_formed_answers_forwarded_or_refused_for_a_named_reason(
        proxy: Any, data: bytes) -> None:
    received = exchange(proxy.proxy.port, data)
    answers = responses(received)
    assert answers, f"no complete response to {data[:200]!r}: {received[:300]!r}"
    for status, headers, body in answers:
        if b"server" in headers:  # forwarded: the fake upstream's own answer
            continue
        assert status in OWN, (status, body[:300], data[:300])
        message = msgspec.json.decode(body)["error"]["message"]
        assert isinstance(message, str) and message.strip()
    bugs = [e for e in proxy.events if (e.error_message or "").startswith("internal gateway")]
    assert not bugs, bugs
    # and the gateway still serves a normal request
    ok = responses(exchange(proxy.proxy.port, b""))
    assert [status for status, _, _ in ok] == [200], ok
