"""The admin server: health, readiness, self-telemetry, status and the live tap."""

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from meterline import admin as admin_server
from tests.helpers import (
    event_dicts,
    eventually,
    free_port,
    post_json,
    running,
    webhook_to_file,
)


def pipeline(port, admin, auth=""):
    admin_settings = {"listen": f"127.0.0.1:{admin}"}
    if auth:
        admin_settings["auth_token"] = auth
    return webhook_to_file(
        port, processors={"filter/no-anthropic": {"exclude": [{"provider": "anthropic"}]}},
        file={"filtering": {"exclude": [{"status_code": 500}]}},
        service={"admin": admin_settings})


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                        if not k.startswith("otel_scope"))))
            out[key] = s.value
    return out


async def get(url, **kw):
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.text()


async def test_health_and_readiness(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path):
        assert (await get(f"http://127.0.0.1:{admin}/healthz"))[0] == 200
        status, body = await get(f"http://127.0.0.1:{admin}/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})


async def test_metrics_count_what_each_component_did(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        await post_json(url, event_dicts(0, 6) + event_dicts(6, 3, provider="anthropic")
                        + event_dicts(9, 2, status_code=500) + [{"bad": 1}])

        async def scrape():
            return samples((await get(f"http://127.0.0.1:{admin}/metrics"))[1])

        for _ in range(100):
            m = await scrape()
            if m.get(("meterline_exporter_sent_events_total", (("exporter", "file"),))) == 6:
                break
            await asyncio.sleep(0.05)
        assert m[("meterline_receiver_accepted_events_total", (("receiver", "webhook"),))] == 11
        assert m[("meterline_receiver_refused_events_total",
                  (("reason", "undecodable"), ("receiver", "webhook")))] == 1
        assert m[("meterline_processor_dropped_events_total",
                  (("pipeline", "p"), ("processor", "filter/no-anthropic")))] == 3
        assert m[("meterline_exporter_filtered_events_total", (("exporter", "file"),))] == 2
        assert m[("meterline_exporter_sent_events_total", (("exporter", "file"),))] == 6
        assert m[("meterline_exporter_queue_size", (("exporter", "file"),))] == 0
        assert m[("meterline_exporter_queue_capacity_bytes", (("exporter", "file"),))] == 1 << 30


async def test_status_shows_pipelines_and_queues(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path):
        _, body = await get(f"http://127.0.0.1:{admin}/api/v1/status")
        data = json.loads(body)
        assert data["pipelines"]["p"]["exporters"] == ["file"]
        assert data["exporters"]["file"]["events"] == 0


async def test_api_requires_the_token_when_one_is_set(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin, "t0k"), tmp_path):
        assert (await get(f"http://127.0.0.1:{admin}/api/v1/status"))[0] == 401
        ok = await get(f"http://127.0.0.1:{admin}/api/v1/status",
                       headers={"Authorization": "Bearer t0k"})
        assert ok[0] == 200
        assert (await get(f"http://127.0.0.1:{admin}/healthz"))[0] == 200


async def test_tap_streams_live_events_matching_its_filter(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path) as service:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meterline", "tap", "--admin", f"http://127.0.0.1:{admin}",
            "--filter", '{"request_model": "gpt-4o"}', stdout=subprocess.PIPE)
        try:
            await eventually(lambda: service.taps.active)  # the tap is connected
            await post_json(f"http://127.0.0.1:{port}/v1/events",
                            event_dicts(0, 3) + event_dicts(3, 2, request_model="gpt-4o"))
            lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
                     for _ in range(2)]
            assert [e["event_id"] for e in lines] == ["evt-00000003", "evt-00000004"]
        finally:
            proc.terminate()
            await proc.wait()


async def test_tap_writes_control_characters_from_traffic_as_json_escapes(tmp_path):
    """JSON leaves C1 controls and bidirectional overrides as they are: `meterline tap`
    would hand a user id such as `\\u009b2J` (clear the screen) to the terminal."""
    port, admin = free_port(), free_port()
    hostile = "u\u009b2J\u009b3J\u202eevil"
    async with running(pipeline(port, admin), tmp_path) as service:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meterline", "tap", "--admin", f"http://127.0.0.1:{admin}",
            stdout=subprocess.PIPE)
        try:
            await eventually(lambda: service.taps.active)
            await post_json(f"http://127.0.0.1:{port}/v1/events",
                            event_dicts(0, 1, user_id=hostile))
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        finally:
            proc.terminate()
            await proc.wait()
    assert '"u\\u009b2J\\u009b3J\\u202eevil"' in line
    assert json.loads(line)["user_id"] == hostile


async def test_tap_ends_quietly_when_its_reader_goes_away(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path) as service:
        read, write = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meterline", "tap", "--admin", f"http://127.0.0.1:{admin}",
            stdout=write, stderr=subprocess.PIPE)
        os.close(write)
        try:
            await eventually(lambda: service.taps.active)
            await post_json(f"http://127.0.0.1:{port}/v1/events", event_dicts(0, 1))
            with os.fdopen(read) as reader:  # `| head -1`: one line, then gone
                assert json.loads(await asyncio.to_thread(reader.readline))["event_id"]
            await post_json(f"http://127.0.0.1:{port}/v1/events", event_dicts(1, 2))
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            assert await proc.stderr.read() == b""  # no traceback
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def test_tap_refuses_a_bad_filter(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path):
        status, body = await get(f"http://127.0.0.1:{admin}/api/v1/tap",
                                 params={"filter": '{"a": {"$bad": 1}}'})
        assert status == 400 and "unknown operator" in body


async def test_tap_quotes_a_long_bad_filter_cut_short(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path):
        for pattern in ({"a": {"$regex": "(" * 3000}}, {"a": {"$in": "z" * 5000}}):
            status, body = await get(f"http://127.0.0.1:{admin}/api/v1/tap",
                                     params={"filter": json.dumps(pattern)})
            assert status == 400
            error = json.loads(body)["error"]
            assert error.startswith("invalid filter: a.$") and len(error) < 400, error


async def test_tap_refuses_a_filter_nested_too_deeply_naming_the_limit(tmp_path):
    port, admin = free_port(), free_port()
    deep_and = {"provider": "openai"}
    for _ in range(300):  # parses, and would be compiled and matched by recursion
        deep_and = {"$and": [deep_and]}
    async with running(pipeline(port, admin), tmp_path):
        for text in ("[" * 1200 + "]" * 1200, json.dumps(deep_and)):  # deeper than json goes
            status, body = await get(f"http://127.0.0.1:{admin}/api/v1/tap",
                                     params={"filter": text})
            assert status == 400, body
            assert json.loads(body)["error"] == (
                "invalid filter: nested deeper than 32 levels of objects and lists" if
                text.startswith("[") else
                "invalid filter: pattern: nested deeper than 32 levels of objects and lists")


def serve_hello(service):
    """The file exporter serves `/api/v1/hello` (as a component with admin routes does)."""
    from aiohttp import web

    async def hello(_):
        return web.json_response({"hello": "from the exporter"})

    service.exporters["file"].component.exporter.admin_routes = lambda: {"hello": hello}


async def test_components_serve_their_own_admin_routes(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path) as service:
        serve_hello(service)
        status, body = await get(f"http://127.0.0.1:{admin}/api/v1/hello")
        assert (status, json.loads(body)) == (200, {"hello": "from the exporter"})
        assert (await get(f"http://127.0.0.1:{admin}/api/v1/nothing"))[0] == 404


async def test_a_wrong_method_on_an_admin_api_path_is_a_405_naming_the_one_it_takes(tmp_path):
    port, admin = free_port(), free_port()
    async with running(pipeline(port, admin), tmp_path) as service:
        serve_hello(service)
        asked = [("GET", "reload", "POST"), ("POST", "audit", "GET"),
                 ("POST", "status", "GET"), ("DELETE", "tap", "GET"),
                 ("PUT", "hello", "GET"), ("DELETE", "hello", "GET")]
        async with aiohttp.ClientSession() as s:
            for method, path, allowed in asked:
                url = f"http://127.0.0.1:{admin}/api/v1/{path}"
                async with s.request(method, url) as r:
                    body = await r.json()
                    assert r.status == 405, (method, path, r.status, body)
                    assert body["error"] == (f"/api/v1/{path} does not take {method}: "
                                             f"use {allowed}")
                    assert r.headers["Allow"] == allowed
            async with s.put(f"http://127.0.0.1:{admin}/api/v1/nothing") as r:
                assert r.status == 404


async def test_an_audit_limit_that_int_refuses_is_a_400_naming_it(tmp_path):
    port, admin = free_port(), free_port()
    body = webhook_to_file(port, service={"admin": {"listen": f"127.0.0.1:{admin}"}})
    async with running(body, tmp_path):
        for limit in ("²", "9" * 5000):  # (str.isdigit is true of both: int() was a 500)
            status, text = await get(f"http://127.0.0.1:{admin}/api/v1/audit",
                                     params={"limit": limit})
            assert status == 400
            assert json.loads(text)["error"].startswith("limit must be a whole number from 1 "
                                                        "to 2000")


async def test_taps_past_the_bound_are_refused_with_a_429_saying_so(tmp_path, monkeypatch):
    monkeypatch.setattr(admin_server, "MAX_TAPS", 2)
    port, admin = free_port(), free_port()
    body = webhook_to_file(port, service={"admin": {"listen": f"127.0.0.1:{admin}"}})
    url = f"http://127.0.0.1:{admin}/api/v1/tap"
    async with (running(body, tmp_path), aiohttp.ClientSession() as s,
                s.get(url) as first, s.get(url) as second):
        assert (first.status, second.status) == (200, 200)  # (streaming on)
        status, text = await get(url)
        assert status == 429
        assert json.loads(text)["error"] == "too many taps: at most 2 are open at once; close one"


async def test_a_head_of_the_tap_opens_no_tap(tmp_path, monkeypatch):
    monkeypatch.setattr(admin_server, "MAX_TAPS", 1)
    port, admin = free_port(), free_port()
    body = webhook_to_file(port, service={"admin": {"listen": f"127.0.0.1:{admin}"}})
    url = f"http://127.0.0.1:{admin}/api/v1/tap"
    async with running(body, tmp_path) as service, aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.head(url) as r:
                assert (r.status, r.headers["Content-Type"]) == (200, "application/x-ndjson")
        assert not service.taps.active
        async with s.get(url) as r:
            assert r.status == 200  # the one tap allowed is still free
