"""Fuzzing the daemon's HTTP surfaces that the decoder and OTLP fuzz tests do not reach: the
admin server (its own paths, the FinOps extension's reports and billing import, the
dashboard's static files) and the Prometheus scrape endpoint. Whatever the query or the
body, the answer is never a 5xx: a bad parameter is a 400 whose reason names it, and the
daemon still answers `/healthz` afterwards.

One daemon for the module, on embedded chDB holding a few events (webhook -> clickhouse)."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.dashboard import STATIC
from meterline.extensions.finops.api import REPORTS
from tests import clickhouse_data as data
from tests.fuzz_helpers import NUMERIC_STRINGS, TEXT, daemon_in_thread, fuzz, within
from tests.helpers import free_port, metric_value

PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
exporters:
  clickhouse: {{endpoint: "chdb://{{data}}/clickhouse", batch: {{timeout: 20ms}}}}
  prometheus: {{listen: "127.0.0.1:{prometheus}"}}
service:
  workers: 1
  shutdown_timeout: 200ms
  memory_limiter: null
  data_dir: "{{data}}"
  admin: {{listen: "127.0.0.1:{admin}"}}
  pipelines:
    p: {{receivers: [webhook], exporters: [clickhouse, prometheus]}}
extensions:
  finops: {{}}
"""


@dataclass(frozen=True)
class Ports:
    admin: int
    prometheus: int


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    @property
    def error(self) -> str:
        return str(msgspec.json.decode(self.body)["error"])


def request(port: int, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Answer:
    """One request on a connection of its own, the answer's head and up to 64 KB of it (a
    tap streams on: closing the connection ends it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        if response.getheader("Content-Type", "").startswith("application/x-ndjson"):
            return Answer(response.status, b"")
        return Answer(response.status, response.read(64 << 10))
    finally:
        conn.close()


def answered(port: int, method: str, target: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Answer:
    """The answer to a hostile request: no 5xx, in little time, and the daemon still up."""
    answer = within(10, request, port, method, target, body, headers)
    assert answer.status < 500, (target, answer)
    assert request(port, "GET", "/healthz").status == 200
    return answer


def query(path: str, params: dict[str, str]) -> str:
    return f"{path}?{urllib.parse.urlencode(params)}" if params else path


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    webhook, prometheus, admin = free_port(), free_port(), free_port()
    body = PIPELINE.format(webhook=webhook, prometheus=prometheus, admin=admin)
    events = data.dataset(datetime.now(UTC), count=30)
    with daemon_in_thread(body, tmp_path_factory.mktemp("fuzz-http")) as (thread, service):
        sent = request(webhook, "POST", "/v1/events", msgspec.json.encode(events),
                       {"Content-Type": "application/json"})
        assert sent.status == 200, sent

        async def stored() -> None:
            while metric_value(service.telemetry.registry, "meterline_exporter_sent_events_total",
                               exporter="clickhouse") < len(events):
                await asyncio.sleep(0.02)

        thread.run(stored(), timeout=30)
        yield Ports(admin, prometheus)


# --- the FinOps reports' query parameters ------------------------------------------------
PARAMETERS = ["range", "since", "until", "by", "group_by", "top", "limit", "provider",
              "granularity", "model_id", "user_id"]
_HOSTILE = st.sampled_from([
    "", " ", "0", "-1", "1", "10000", "10001", str(10**12), "9" * 5000, "²", "٣", "\uff11\uff10",
    "1e3", "NaN", "24h", "1h", "0h", "99999d", "416d", "49673d", "٣d", "9" * 4400 + "d",
    "1970-01-01", "1970-01-02", "2106-01-01", "1969-12-31T23:59:59Z",
    "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01", "2025-01-01T00:00:00+14:00",
    "day", "hour", "tag", "agent", "session", "trace", "tool", "status", "api_key", "model",
    "metadata.customer", "metadata.", "metadata.a'b", "metadata." + "k" * 200,
    "hourly", "daily", "weekly", "all", "'; DROP TABLE llm_usage; --", "' OR 1=1 --", "\\",
    "`", "{t}", "{first}", "%00", "\x00"])
_TIMES = st.datetimes(timezones=st.timezones()).map(datetime.isoformat)
# (the hand-picked values most often: `|` draws each of its branches as often)
_VALUES = st.one_of(_HOSTILE, _HOSTILE, _HOSTILE, TEXT, NUMERIC_STRINGS,
                    st.integers().map(str), _TIMES)


@fuzz(40)
@given(st.sampled_from([*sorted(REPORTS), "budgets"]),
       st.dictionaries(st.sampled_from(PARAMETERS) | st.text(max_size=6), _VALUES,
                       max_size=3))
def test_a_report_answers_any_query_without_a_5xx_and_names_a_bad_parameter(
        ports: Ports, path: str, params: dict[str, str]) -> None:
    answer = answered(ports.admin, "GET", query(f"/api/v1/{path}", params))
    if answer.status == 400:  # (a window's own limits name it: "ask for a shorter window")
        assert any(name in answer.error for name in [*params, "window"]), (params, answer)


@pytest.mark.parametrize("name", ["range", "since", "until", "by", "group_by", "top",
                                  "limit", "granularity"])
def test_a_refused_parameter_is_quoted_cut_short(ports: Ports, name: str) -> None:
    long = "x" * 5000  # (a query string may hold 8 KB: the answer need not send it back)
    errors = [answer.error for path in [*sorted(REPORTS), "audit"]
              if (answer := answered(ports.admin, "GET",
                                     query(f"/api/v1/{path}", {name: long}))).status == 400]
    assert errors, name
    assert all(len(e) < 400 and name in e and "5,000 characters" in e for e in errors), errors


# --- the admin server's own paths --------------------------------------------------------
_FILTERS = (st.sampled_from(["", "{}", "[]", "null", "1", "[1]", '{"provider": "openai"}',
                             '{"provider": {"$regex": "(a+)+$"}}', '{"x": {"$bogus": 1}}',
                             "[" * 2000, '{"provider": 1e400}', "NaN", "%ff"])
            | st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                           lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(TEXT, c, max_size=3), max_leaves=8).map(json.dumps))


@fuzz(20)
@given(st.sampled_from(["audit", "tap", "status", "reload"]),
       st.sampled_from(["limit", "filter"]), _VALUES | _FILTERS)
def test_the_admin_servers_own_paths_answer_any_query_without_a_5xx(
        ports: Ports, path: str, name: str, value: str) -> None:
    method = "POST" if path == "reload" else "GET"
    answer = answered(ports.admin, method, query(f"/api/v1/{path}", {name: value}))
    if answer.status == 400:
        assert name in answer.error


# --- the dashboard's static files --------------------------------------------------------
# what a static path may answer: the start of one of the files
SERVED = {p.read_bytes()[:64 << 10] for p in STATIC.rglob("*") if p.is_file()}
_SEGMENTS = st.sampled_from(["..", ".", "%2e%2e", "%2f", "vendor", "dashboard.js", "x" * 300,
                             "%00", "index.html", "", "~", "%c0%af", "pipeline.yaml"]) | TEXT


@fuzz(30)
@given(st.lists(_SEGMENTS, min_size=1, max_size=4).map("/".join))
def test_a_static_path_serves_one_of_the_dashboards_files_or_none(ports: Ports,
                                                                  path: str) -> None:
    target = "/static/" + urllib.parse.quote(path, safe="/%~")
    answer = answered(ports.admin, "GET", target)
    if answer.status == 200:
        assert answer.body in SERVED


# --- bodies: the billing import ------------------------------------------------------------
def _encoded(body: bytes, encoding: str) -> tuple[bytes, dict[str, str]]:
    coded = {"gzip": gzip.compress, "deflate": zlib.compress, "gzip-cut":
             lambda b: gzip.compress(b)[:-6], "gzip-bomb": lambda _: gzip.compress(
                 b" " * (64 << 20), 9)}.get(encoding, lambda b: b)(body)
    name = encoding.split("-")[0]
    return coded, {"Content-Type": "application/json"} | (
        {"Content-Encoding": name} if name else {})


_LINE = {"line_id": "f-1", "day": "2025-11-03", "provider": "openai", "amount": 1.0,
         "currency": "USD", "format": "openai"}
_IMPORTS = (st.binary(max_size=64) | st.just(json.dumps({"lines": [_LINE]}).encode())
            | st.dictionaries(st.sampled_from([*_LINE, "x"]), _VALUES, max_size=6).map(
                lambda line: json.dumps({"lines": [line]}).encode()))


@fuzz(20)
@given(_IMPORTS, st.sampled_from(["", "gzip", "deflate", "zstd", "br", "gzip-cut",
                                  "gzip-bomb", "gzip, gzip"]))
def test_the_billing_import_answers_any_body_and_encoding_without_a_5xx(
        ports: Ports, body: bytes, encoding: str) -> None:
    coded, headers = _encoded(body, encoding)
    answered(ports.admin, "POST", "/api/v1/billing/import", coded, headers)


# --- the Prometheus scrape ----------------------------------------------------------------
_HEADER = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@fuzz(15)
@given(_HEADER | st.sampled_from(["application/openmetrics-text; version=9", ";;;,,,",
                                  "text/plain;q=abc", "application/vnd.google.protobuf"]),
       st.sampled_from(["", "gzip", "br", "*", "gzip;q=0", "identity;q=0"]))
def test_a_scrape_answers_any_accept_header_without_a_5xx(ports: Ports, accept: str,
                                                          encoding: str) -> None:
    headers = {"Accept": accept, "Accept-Encoding": encoding}
    assert within(10, request, ports.prometheus, "GET", "/metrics", None,
                  headers).status < 500
