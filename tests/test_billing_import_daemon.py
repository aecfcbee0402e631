"""`meterline billing import` while the daemon runs: the lines go through the daemon's admin
API (`POST /api/v1/billing/import`), which stores them with the daemon's own engine (chDB
allows one process per data directory); with the daemon stopped, the command opens
ClickHouse itself."""

import asyncio
import gzip
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from meterline.extensions.finops import api
from meterline.extensions.finops.api import MAX_IMPORT_BYTES
from tests.helpers import free_port, post_json, post_raw, running

FIXTURES = Path(__file__).parent / "fixtures" / "billing"
CUR = FIXTURES / "aws_cur.csv"  # 3 Bedrock lines, 2025-11-03 and -04: 1.8 + 4.5 + 0.48 USD
TOKEN = "admin-secret"

PIPELINE = """
receivers:
  webhook: {{listen: 127.0.0.1:{port}}}
exporters:
  clickhouse: {{endpoint: "chdb://{{data}}/clickhouse"}}
service:
  data_dir: {{data}}
  admin: {{listen: "127.0.0.1:{admin}", auth_token: admin-secret}}
  pipelines:
    p: {{receivers: [webhook], exporters: [clickhouse]}}
extensions:
  finops: {{}}
"""


def meterline(config, *args):
    return subprocess.run([sys.executable, "-m", "meterline", *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=120)


def billed(config):
    """The billed USD of `meterline finops reconcile` over the fixture's days."""
    result = meterline(config, "finops", "reconcile", "--since", "2025-11-03", "--until",
                       "2025-11-05", "--format", "json")
    assert result.returncode == 0, result.stderr
    return round(json.loads(result.stdout)["total"]["billed_cost_usd"], 6)


def test_billing_import_while_the_daemon_runs_goes_through_its_admin_api(daemon_factory):
    daemon = daemon_factory(PIPELINE.format(port=free_port(), admin="{admin}"))
    daemon.start()
    result = meterline(daemon.config, "billing", "import", str(CUR))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"{CUR}: aws-cur, 3 billing lines, 2025-11-03 to "
                                             "2025-11-04 (3 stored in all)")
    assert "billing lines imported" in daemon.log.read_text()  # stored by the daemon
    assert billed(daemon.config) == 6.78  # read back from the running daemon
    assert daemon.stop() == 0
    assert billed(daemon.config) == 6.78  # and stored in its data directory


def test_billing_import_with_the_daemon_stopped_opens_clickhouse_itself(daemon_factory):
    daemon = daemon_factory(PIPELINE.format(port=free_port(), admin="{admin}"))
    result = meterline(daemon.config, "billing", "import", str(CUR))  # nobody on admin
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith("(3 stored in all)")
    daemon.start()
    assert billed(daemon.config) == 6.78  # the daemon reads what was stored without it
    assert daemon.stop() == 0


# --- the API itself, on a daemon run in-process ------------------------------------------
in_module_loop = pytest.mark.asyncio(loop_scope="module")


def line(**changes):
    return {"line_id": "l-1", "day": "2025-11-03", "provider": "openai", "model": "gpt-4o",
            "amount": 1.25, "currency": "USD", "amount_usd": 1.25, "format": "openai",
            "source": "test"} | changes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def admin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("billing_api")
    port = free_port()
    async with running(PIPELINE.format(port=free_port(), admin=port), tmp):
        yield f"http://127.0.0.1:{port}/api/v1/billing/import"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@in_module_loop
async def test_the_import_api_stores_each_line_once(admin):
    lines = [line(line_id="once-1"), line(line_id="once-2", model="gpt-4o-mini")]
    status, body, _ = await post_json(admin, {"lines": lines}, headers=AUTH)
    assert status == 200, body
    assert body["received"] == 2
    status, again, _ = await post_json(admin, {"lines": lines}, headers=AUTH)
    assert (status, again["stored"]) == (200, body["stored"])


@in_module_loop
async def test_the_import_api_requires_the_admin_token(admin):
    status, body, _ = await post_json(admin, {"lines": [line()]})
    assert status == 401, body


@in_module_loop
async def test_the_import_api_refuses_a_malformed_line_naming_it(admin):
    status, body, _ = await post_json(admin, {"lines": [line(), line(amount="1.2x")]},
                                      headers=AUTH)
    assert status == 400
    assert "Expected `float`, got `str`" in body["error"]
    assert "$.lines[1].amount" in body["error"]


@in_module_loop
async def test_the_import_api_refuses_a_currency_that_is_no_iso_code(admin):
    status, body, _ = await post_json(admin, {"lines": [line(currency="usd")]}, headers=AUTH)
    assert status == 400
    assert body["error"].startswith("lines[0].currency: expected an upper case ISO 4217")


@in_module_loop
async def test_the_import_api_refuses_a_body_over_its_bound(admin):
    big = b'{"lines": [' + b" " * MAX_IMPORT_BYTES + b"]}"
    status, body, _ = await post_raw(admin, big, headers={**AUTH,
                                                          "Content-Type": "application/json"})
    assert status == 413
    assert "body larger than the import's bound (16 MB)" in body["error"]


@in_module_loop
async def test_the_import_api_takes_a_gzip_body(admin):
    body = gzip.compress(json.dumps({"lines": [line(line_id="gzipped")]}).encode())
    status, answer, _ = await post_raw(admin, body, headers={
        **AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert (status, answer["received"]) == (200, 1)


@in_module_loop
@pytest.mark.parametrize(("body", "encoding", "reason"), [
    (b"not gzip", "gzip", "body does not decode per its Content-Encoding"),
    (gzip.compress(b'{"lines": []}')[:-6], "gzip", "truncated body"),
    (b'{"lines": []}', "br", "unsupported Content-Encoding 'br'"),
])
async def test_the_import_api_refuses_a_body_that_does_not_decode_saying_why(
        admin, body, encoding, reason):
    status, answer, _ = await post_raw(admin, body, headers={
        **AUTH, "Content-Type": "application/json", "Content-Encoding": encoding})
    assert status in (400, 415)  # (aiohttp's own decoding of the body answered 500)
    assert reason in answer["error"]


@in_module_loop
async def test_the_import_api_refuses_a_compression_bomb_before_decoding_it_all(admin):
    bomb = gzip.compress(b" " * (4 << 20), 9)  # 4 MB in 4 KB
    status, answer, _ = await post_raw(admin, bomb, headers={
        **AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 413
    assert "a compression bomb?" in answer["error"]


@in_module_loop
async def test_the_import_api_refuses_a_body_too_slow_to_arrive_naming_its_limit(
        admin, monkeypatch):
    monkeypatch.setattr(api, "_BODY_TIMEOUT", 0.2)

    async def trickle():
        yield b'{"lines": ['
        await asyncio.sleep(2)
        yield b"]}"

    async with aiohttp.ClientSession() as s, s.post(admin, data=trickle(), headers={
            **AUTH, "Content-Type": "application/json"}) as r:
        assert r.status == 408
        assert (await r.json())["error"] == ("body not received within 0.2s "
                                             "(the import's time limit)")


@in_module_loop
async def test_the_import_path_takes_no_get(admin):
    async with aiohttp.ClientSession() as s, s.get(admin, headers=AUTH) as r:
        assert r.status == 405
