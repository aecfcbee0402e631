"""The daemon's logs: JSON lines when asked, and never the content of prompts, even when
an item is refused and an exporter's error quotes what it was sent."""

import json

import structlog
from aiohttp import web
from google.rpc.status_pb2 import Status

from meterline import logs
from meterline.event import Event
from tests.helpers import event_dicts, eventually, free_port, post_json, read_jsonl

MARKER = "zebra-canary 7f3a9c: the customer's secret prompt"


async def echoing_otlp_server(port):
    """An OTLP/HTTP server that refuses every request, quoting the prompt back."""

    async def refuse(request):
        await request.read()
        status = Status(code=3, message=f'span rejected: attribute "{MARKER}" too long')
        return web.Response(status=503, body=status.SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_json_logs_never_carry_prompt_content(daemon_factory, tmp_path):
    webhook, otlp = free_port(), free_port()
    server = await echoing_otlp_server(otlp)
    daemon = daemon_factory(f"""
    receivers:
      webhook: {{listen: "127.0.0.1:{webhook}"}}
    exporters:
      file:
        path: {{data}}/out.jsonl
        batch: {{timeout: 10ms}}
      otlp:
        endpoint: http://127.0.0.1:{otlp}
        protocol: http
        queue: {{type: memory}}
        batch: {{timeout: 10ms}}
        retry: {{initial_interval: 20ms, max_interval: 50ms, max_elapsed_time: 300ms}}
    service:
      data_dir: {{data}}
      admin: {{listen: "127.0.0.1:{{admin}}"}}
      telemetry: {{logs: {{level: debug, encoding: json}}}}
      pipelines:
        p: {{receivers: [webhook], exporters: [file, otlp]}}
    """)
    try:
        daemon.start()
        prompts = event_dicts(0, 3, input_messages=[{"role": "user", "content": MARKER}],
                              output_messages=[{"role": "assistant", "content": MARKER}])
        refused = {"colour": MARKER}
        status, body, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events",
                                          [*prompts, refused])
        assert (status, body["accepted"], len(body["rejected"])) == (200, 3, 1)
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 3)
        await eventually(lambda: "batch not delivered" in daemon.log.read_text())
        assert daemon.stop() == 0
    finally:
        await server.cleanup()
    lines = daemon.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    events = {r["event"] for r in records}
    assert {"items refused", "send failed, will retry", "batch not delivered"} <= events
    assert all(MARKER not in line and "zebra-canary" not in line for line in lines)


def test_scrub_masks_what_an_error_quotes_of_the_content_and_bounds_the_rest():
    event = Event(event_id="e", input_messages=[{"role": "user", "content": [
        {"type": "text", "text": f"please summarize:\n{MARKER}"}]}])
    text = logs.scrub(f"HTTP 400: bad row {MARKER!r} near column 3" + " x" * 500,
                      logs.contents([event]))
    assert "zebra" not in text and "<content>" in text
    assert text.startswith('HTTP 400: bad row "<content>" near column 3')
    assert len(text) <= logs.MAX_TEXT_CHARS + 3


def test_scrub_masks_a_quoted_run_wherever_it_starts_and_leaves_the_rest():
    quoted = "the secret plan for tomorrow"
    for offset in range(5):  # the run need not start on a probe
        text = logs.scrub("e" * offset + f": {quoted} :end", [f"xx|{quoted}|yy"])
        assert text == "e" * offset + ": <content> :end"
    assert logs.scrub("nothing shared here at all", ["z" * 100_000]) == (
        "nothing shared here at all")


async def test_console_logs_write_control_characters_from_traffic_escaped(daemon_factory, tmp_path):
    """A model name a client sent reaches a console log line (the cost processor's unpriced
    warning) without spaces, which the console renderer writes as it is: a C1 CSI (clear
    the screen) or a bidirectional override would act on the operator's terminal."""
    webhook = free_port()
    daemon = daemon_factory(f"""
    receivers:
      webhook: {{listen: "127.0.0.1:{webhook}"}}
    processors:
      cost: {{}}
    exporters:
      file: {{path: "{{data}}/out.jsonl", batch: {{timeout: 10ms}}}}
    service:
      data_dir: {{data}}
      admin: {{listen: "127.0.0.1:{{admin}}"}}
      telemetry: {{logs: {{encoding: console}}}}
      pipelines:
        p: {{receivers: [webhook], processors: [cost], exporters: [file]}}
    """)
    daemon.start()
    hostile = "home-grown\u009b2J\u009b3J\u202eevil"
    status, body, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events",
                                      event_dicts(0, 1, request_model=hostile))
    assert (status, body["accepted"]) == (200, 1)
    await eventually(lambda: "no price for this model" in daemon.log.read_text())
    assert daemon.stop() == 0
    line = next(line for line in daemon.log.read_text().splitlines()
                if "no price for this model" in line)
    assert "model='home-grown\\x9b2J\\x9b3J\\u202eevil'" in line
    assert not any(ch in line for ch in "\x9b\u202e\x1b")


def test_a_console_traceback_keeps_its_lines_and_escapes_control_characters(capsys):
    saved = structlog.get_config()
    logs.configure("info", "console")  # writes to this test's captured stderr
    try:
        raise ValueError("bad value \x1b]8;;http://evil.example\x07click\x1b]8;;\x07")
    except ValueError:
        logs.get().exception("request failed")
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):\n" in err
    assert "ValueError: bad value \\x1b]8;;http://evil.example\\x07click" in err
    assert "\x1b" not in err and "\x07" not in err


def test_a_console_traceback_cannot_begin_a_line_that_reads_as_a_record(capsys):
    """An exception's message may quote traffic; a line break in it must not start a
    line at the first column, where every record starts with its timestamp."""
    saved = structlog.get_config()
    logs.configure("info", "console")
    forged = "2026-01-01T00:00:00.000000Z [info     ] login ok  user=admin"
    try:
        raise ValueError(f"bad value\n{forged}")
    except ValueError:
        logs.get().exception("request failed")
    finally:
        structlog.configure(**saved)
    record, *traceback = capsys.readouterr().err.splitlines()
    assert record.endswith("[error    ] request failed")
    assert traceback[0] == "  Traceback (most recent call last):"
    assert traceback[-2:] == ["  ValueError: bad value", f"  {forged}"]
    assert all(line.startswith("  ") for line in traceback)
