"""The daemon's logs: JSON lines when asked, and never the content of prompts, even when
an item is refused and an exporter's error quotes what it was sent."""

import asyncio
import json
import logging
import warnings

import pytest
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


def test_scrub_masks_a_quoted_run_the_cut_splits_on_both_sides_of_it():
    quoted = "the quarterly figures for the board, strictly private!"  # 55 characters
    for at in (190, 355):  # across the end of what is kept first; the start of the rest
        text = logs.scrub("f" * at + quoted + "g" * (445 - at), [f"xx|{quoted}|yy"])
        head, tail = text.split("...")
        assert "<content>" in head + tail, text
        for piece in (quoted[:6], quoted[-6:]):
            assert piece not in text, text


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


@pytest.fixture
def configured():
    """`logs.configure` in this process, undone after the test (structlog's settings and
    the handler it puts on the root logger)."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield logs.configure  # writes to the test's captured stderr
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_a_console_traceback_keeps_its_lines_and_escapes_control_characters(capsys, configured):
    configured("info", "console")
    try:
        raise ValueError("bad value \x1b]8;;http://evil.example\x07click\x1b]8;;\x07")
    except ValueError:
        logs.get().exception("request failed")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):\n" in err
    assert "ValueError: bad value \\x1b]8;;http://evil.example\\x07click" in err
    assert "\x1b" not in err and "\x07" not in err


def test_a_console_traceback_cannot_begin_a_line_that_reads_as_a_record(capsys, configured):
    """An exception's message may quote traffic; a line break in it must not start a
    line at the first column, where every record starts with its timestamp."""
    configured("info", "console")
    forged = "2026-01-01T00:00:00.000000Z [info     ] login ok  user=admin"
    try:
        raise ValueError(f"bad value\n{forged}")
    except ValueError:
        logs.get().exception("request failed")
    record, *traceback = capsys.readouterr().err.splitlines()
    assert record.endswith("[error    ] request failed")
    assert traceback[0] == "  Traceback (most recent call last):"
    assert traceback[-2:] == ["  ValueError: bad value", f"  {forged}"]
    assert all(line.startswith("  ") for line in traceback)


SECRET = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56"  # an OpenAI key's shape
EMAIL = "jane.doe@acme-corp.com"


def test_a_librarys_records_are_json_lines_with_its_logger_and_traffic_masked(capsys,
                                                                             configured):
    configured("info", "json")
    logging.getLogger("asyncio").info("not written: a library's records start at WARNING")
    try:
        raise ValueError(f"cannot parse {EMAIL}")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception for %s", SECRET)
    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert (record["logger"], record["level"]) == ("asyncio", "error")
    assert record["event"] == "Task exception for <OPENAI_KEY>"
    assert record["exception"].endswith("ValueError: cannot parse <EMAIL>")
    assert "timestamp" in record and SECRET not in line and EMAIL not in line


def test_a_long_message_keeps_its_start_and_its_end():
    text = logs.bounded("Executing <Task pending name='Task-7' coro=" + "x" * 500
                        + "> took 0.006 seconds")
    assert text.startswith("Executing <Task pending name='Task-7'")
    assert text.endswith("> took 0.006 seconds")
    assert "..." in text and len(text) <= logs.MAX_TEXT_CHARS + 3


def test_a_key_where_a_librarys_message_is_cut_is_masked_whole(capsys, configured):
    configured("info", "json")
    cuts = range(190, 310, 7)  # the key across wherever the message is cut
    for before in cuts:
        logging.getLogger("aiohttp.server").warning(
            "bad request line: GET /v1/x?" + "p" * before + f"&token={SECRET}&to={EMAIL}"
            + " HTTP/1.1" + " " * 3 + "q" * 400)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(cuts)
    for line in lines:
        message = json.loads(line)["event"]
        assert "sk-proj" not in message and "jane.doe" not in message, message


def test_a_librarys_console_records_have_control_characters_escaped(capsys, configured):
    configured("info", "console")
    logging.getLogger("grpc._server").warning("bad name \x1b[2J\u202eevil")
    err = capsys.readouterr().err
    assert "'bad name \\x1b[2J\\u202eevil'" in err and "[grpc._server]" in err
    assert "\x1b" not in err and "\u202e" not in err


def test_python_warnings_are_log_records(capsys, configured):
    configured("info", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated option for {EMAIL}", UserWarning, stacklevel=1)
    record = json.loads(capsys.readouterr().err)
    assert (record["logger"], record["level"]) == ("py.warnings", "warning")
    assert "UserWarning: deprecated option for <EMAIL>" in record["event"]


async def test_a_refused_request_line_is_logged_once_as_json_without_what_it_quotes(
        daemon_factory):
    """aiohttp refuses a request line over its limit (400) and logs its first bytes, the
    query string with them: what a client put there (a key, an address) stays out of the
    log, the line is JSON, and a client sending them in a loop gets one line."""
    webhook = free_port()
    daemon = daemon_factory(f"""
    receivers:
      webhook: {{listen: "127.0.0.1:{webhook}"}}
    exporters:
      file: {{path: "{{data}}/out.jsonl"}}
    service:
      data_dir: {{data}}
      admin: {{listen: "127.0.0.1:{{admin}}"}}
      telemetry: {{logs: {{encoding: json}}}}
      pipelines:
        p: {{receivers: [webhook], exporters: [file]}}
    """)
    daemon.start()
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", webhook)
        writer.write(f"GET /v1/events?key={SECRET}&to={EMAIL}&pad={'a' * 9000} HTTP/1.1\r\n"
                     "Host: x\r\n\r\n".encode())
        assert (await reader.readline()).split()[1] == b"400"
        writer.close()
    await eventually(lambda: "Error handling request" in daemon.log.read_text())
    assert daemon.stop() == 0
    lines = daemon.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    refused = [r for r in records if r.get("logger") == f"meterline.http.127.0.0.1:{webhook}"]
    assert len(refused) == 1 and refused[0]["level"] == "warning"
    assert "key=<OPENAI_KEY>&to=<EMAIL>" in refused[0]["event"]
    assert not any(SECRET in line or EMAIL in line for line in lines)
