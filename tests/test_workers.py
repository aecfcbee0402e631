"""Processors in worker processes: off the loop that serves clients, on every core, with
the guarantees of the single-process daemon (nothing acknowledged lost, counters whole)."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import msgspec
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc import LogsServiceStub
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

from meterline import config as config_mod
from meterline.config import MetricsConfig
from meterline.event import pack
from meterline.exporters.otlp.encode import to_json, to_logs_request, to_traces_request
from meterline.telemetry import Telemetry
from meterline.workers import Plan, ProcessorPool, ProcessorSpec
from tests.helpers import (
    FILE_OUT,
    event_dicts,
    eventually,
    free_port,
    long_prompts,
    make_event,
    metric_value,
    post_json,
    post_raw,
    read_jsonl,
    running,
    sent_until_taken,
    webhook_to_file,
)
from tests.helpers import pipeline as pipeline_of


def pipeline(port: int, workers: int = 2, region: str = "eu", **service: object) -> str:
    return webhook_to_file(
        port, processors={"labels": {"static": {"region": region}}, "redact": {}},
        file={"batch": {"max_size": 200, "timeout": "20ms"}},
        service={"workers": workers, **service})


def with_pii(start: int, count: int) -> list[dict]:
    return event_dicts(start, count, user_id="someone",
                       input_messages=[{"role": "user", "content": "write to ann@example.com"}])


async def test_processors_run_in_worker_processes_not_in_the_daemons_own(tmp_path):
    port = free_port()
    async with running(pipeline(port), tmp_path) as service:
        for running_processor in service.processors.values():
            running_processor.component.process = _must_not_run
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", with_pii(0, 5))
        assert (status, body["accepted"]) == (200, 5)
        out = tmp_path / "data" / "out.jsonl"
        rows = await eventually(lambda: read_jsonl(out))
        assert rows[0]["metadata"]["region"] == "eu"
        assert "ann@example.com" not in str(rows)
        pids = service.pool.pids()
        assert len(pids) == 2 and os.getpid() not in pids


def _must_not_run(events):
    raise AssertionError("a processor ran in the daemon's own process")


def _must_not_decode(*args, **kwargs):
    raise AssertionError("a body was decoded in the daemon's own process")


async def test_a_batch_for_pipelines_without_processors_is_not_sent_to_a_worker(tmp_path):
    async def _no_round_trip(pipelines, events):
        raise AssertionError("a batch no processor runs on went to a worker")

    async with running(webhook_to_file(free_port(), service={"workers": 2}),
                       tmp_path) as service:
        service.pool.process = _no_round_trip
        await service.entries["webhook"].consume([make_event(0)])
        rows = await eventually(lambda: read_jsonl(tmp_path / "data" / "out.jsonl"))
        assert [r["event_id"] for r in rows] == ["evt-00000000"]


async def test_workers_1_runs_the_processors_in_the_daemons_own_process(tmp_path):
    port = free_port()
    async with running(pipeline(port, workers=1), tmp_path) as service:
        assert service.pool is None
        status, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", with_pii(0, 3))
        assert status == 200
        rows = await eventually(lambda: read_jsonl(tmp_path / "data" / "out.jsonl"))
        assert "ann@example.com" not in str(rows)


async def test_counters_of_processors_in_workers_reach_the_daemons_metrics(tmp_path):
    port = free_port()
    async with running(pipeline(port), tmp_path) as service:
        await post_json(f"http://127.0.0.1:{port}/v1/events", with_pii(0, 7))
        registry = service.telemetry.registry
        assert metric_value(registry, "meterline_redact_redactions_total", detector="email") == 7
        assert metric_value(registry, "meterline_processor_incoming_events_total",
                            processor="redact", pipeline="p") == 7


async def test_a_reload_reaches_the_processors_in_the_workers(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/events"
    async with running(pipeline(port, region="eu"), tmp_path) as service:
        await post_json(url, with_pii(0, 2))
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("region: eu", "region: us"))
        assert await service.reload(str(path))
        await post_json(url, with_pii(2, 2))
        out = tmp_path / "data" / "out.jsonl"
        rows = await eventually(lambda: len(read_jsonl(out)) == 4 and read_jsonl(out))
        regions = {r["event_id"]: r["metadata"]["region"] for r in rows}
        assert regions == {"evt-00000000": "eu", "evt-00000001": "eu",
                           "evt-00000002": "us", "evt-00000003": "us"}


async def test_a_worker_killed_mid_stream_loses_no_acknowledged_event(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/events"
    async with running(pipeline(port), tmp_path) as service:
        acked: list[str] = []
        answers: list[int] = []
        senders = [asyncio.create_task(_send_batches(url, i * 10_000, 30, acked, answers))
                   for i in range(3)]
        await eventually(lambda: len(acked) >= 1000, timeout=30)
        await kill_a_worker_holding_work(service.pool)
        await asyncio.gather(*senders)
        assert len(acked) == 3 * 30 * 50  # every batch got in, retried where pushed back
        out = tmp_path / "data" / "out.jsonl"
        await eventually(lambda: len(read_jsonl(out)) >= len(acked), timeout=30)
        ids = [r["event_id"] for r in read_jsonl(out)]
        assert sorted(ids) == sorted(acked)  # each acknowledged event exactly once
        assert service.pool.restarts >= 1
        assert 429 in answers  # the batches the dead worker held were pushed back


async def kill_a_worker_holding_work(pool: ProcessorPool) -> None:
    """kill -9 a worker that was stopped first, so that it held batches when killed."""
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    await asyncio.sleep(0.5)
    os.kill(victim, signal.SIGKILL)


async def _send_batches(url: str, first: int, batches: int, acked: list[str],
                        answers: list[int]) -> None:
    """Post `batches` batches of 50, retrying each until it is acknowledged."""
    async with aiohttp.ClientSession() as session:
        for n in range(batches):
            items = with_pii(first + n * 50, 50)
            for _ in range(100):
                async with session.post(url, data=msgspec.json.encode(items), headers={
                        "Content-Type": "application/json"}) as r:
                    answers.append(r.status)
                    if r.status == 200:
                        acked.extend(e["event_id"] for e in items)
                        break
                await asyncio.sleep(0.05)


async def test_workers_exit_when_the_daemon_is_killed(tmp_path, daemon_factory):
    port = free_port()
    daemon = daemon_factory(pipeline(port).replace("admin: null",
                                                   'admin: {listen: "127.0.0.1:{admin}"}'))
    daemon.start()
    status, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", with_pii(0, 1))
    assert status == 200
    children = _children(daemon.proc.pid)
    assert len(children) >= 2
    daemon.kill()
    await eventually(lambda: not any(_alive(pid) for pid in children), timeout=10)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def load_error(tmp_path: Path, **service: object) -> str:
    """Why the pipeline with these `service` settings is refused."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline(free_port(), **service).replace("{data}", str(tmp_path)))
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(str(path))
    return str(e.value)


def test_workers_below_1_are_refused_with_the_reason(tmp_path):
    assert "service.workers must be at least 1" in load_error(tmp_path, workers=0)


async def worker_niceness(service) -> list[int]:
    """The niceness of each worker, above the daemon's own (it is this test process)."""
    pids = await eventually(lambda: len(service.pool.pids()) == 2 and service.pool.pids())
    own = os.getpriority(os.PRIO_PROCESS, 0)
    return [os.getpriority(os.PRIO_PROCESS, pid) - own for pid in pids]


@pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) > 9, reason="already niced to the limit")
async def test_workers_run_10_below_the_daemons_priority_by_default(tmp_path):
    async with running(pipeline(free_port()), tmp_path) as service:
        assert await worker_niceness(service) == [10, 10]


async def test_worker_nice_0_runs_the_workers_at_the_daemons_priority(tmp_path):
    async with running(pipeline(free_port(), worker_nice=0), tmp_path) as service:
        assert await worker_niceness(service) == [0, 0]


def test_worker_nice_beyond_19_is_refused_with_the_reason(tmp_path):
    assert "service.worker_nice must be from 0 to 19" in load_error(tmp_path, worker_nice=20)


async def test_a_reload_that_changes_workers_keeps_the_running_pool_until_restart(tmp_path):
    port = free_port()
    async with running(pipeline(port, workers=2), tmp_path) as service:
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("workers: 2", "workers: 3"))
        assert await service.reload(str(path))
        assert service.pool.workers == 2 and len(service.pool.pids()) == 2
        status, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", with_pii(0, 2))
        assert status == 200


async def test_the_daemon_takes_events_again_after_each_of_its_children_is_killed(
        tmp_path, daemon_factory):
    """kill -9 of any process of the daemon but the main one (its workers): the next batches
    are pushed back at worst, then accepted."""
    port = free_port()
    daemon = daemon_factory(pipeline(port).replace("admin: null",
                                                   'admin: {listen: "127.0.0.1:{admin}"}'))
    daemon.start()
    url = f"http://127.0.0.1:{port}/v1/events"
    assert (await post_json(url, with_pii(0, 1)))[0] == 200
    children = _children(daemon.proc.pid)
    assert len(children) == 2  # the workers (multiprocessing's resource tracker is not run)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    acked: list[str] = []
    await _send_batches(url, 100, 5, acked, [])
    assert len(acked) == 250
    out = tmp_path / "data" / "out.jsonl"
    await eventually(lambda: len(read_jsonl(out)) == 251, timeout=20)
    assert daemon.stop() == 0


MAIN_WITH_LISTENERS = """
import asyncio, sys
from pathlib import Path

import aiohttp  # noqa: F401  (what the daemon's CLI imports: its listeners)

from meterline.config import MetricsConfig
from meterline.telemetry import Telemetry
from meterline.workers import Plan, ProcessorPool, ProcessorSpec


async def main():
    pool = ProcessorPool(1, 0, "warning", "console", Telemetry(MetricsConfig()))
    pool.configure(Plan({"usage": [ProcessorSpec("labels", "labels", {})]}, sys.argv[1]))
    await pool.start()
    try:
        [pid] = pool.pids()
        print("/aiohttp/" in Path(f"/proc/{pid}/maps").read_text())
    finally:
        await pool.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_worker_does_not_import_the_daemons_main_module(tmp_path):
    """A worker imports what its processors need, not the program that started it (the
    `meterline` command: the CLI, with aiohttp's and gRPC's listeners, 13 MB of each
    worker's memory when `multiprocessing`'s spawn imported it again there)."""
    script = tmp_path / "daemon_main.py"
    script.write_text(MAIN_WITH_LISTENERS)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=True)
    assert run.stdout.strip() == "False", run.stderr[-2000:]


async def started_pool(tmp_path: Path, specs: list[ProcessorSpec]) -> ProcessorPool:
    pool = ProcessorPool(2, 0, "warning", "console", Telemetry(MetricsConfig()))
    pool.configure(Plan({"usage": specs}, str(tmp_path), 2))
    await pool.start()
    return pool


async def test_a_batch_of_megabytes_crosses_to_a_worker_and_back_whole(tmp_path):
    pool = await started_pool(tmp_path, [ProcessorSpec("labels", "labels", {})])
    try:
        events = long_prompts(40, 200_000, 0)  # 8 MB: many times a pipe's room
        [result] = await pool.process(["usage"], events)
        assert result.packed == pack(events)
        assert result.counts == [("labels", 40, 40)]
    finally:
        await pool.shutdown()


async def test_an_error_in_a_worker_reaches_the_caller_and_the_worker_serves_on(tmp_path):
    pool = await started_pool(tmp_path, [])
    try:
        pool.configure(Plan({"usage": [ProcessorSpec("x", "no-such-processor", {})]},
                            str(tmp_path), 2))
        with pytest.raises(KeyError, match="no-such-processor"):
            await pool.process(["usage"], long_prompts(1, 10, 0))
        pool.configure(Plan({"usage": [ProcessorSpec("labels", "labels", {})]},
                            str(tmp_path), 2))
        for _ in range(4):  # every worker, given the new plan
            [result] = await pool.process(["usage"], long_prompts(1, 10, 0))
            assert result.counts == [("labels", 1, 1)]
        assert pool.restarts == 0
    finally:
        await pool.shutdown()


async def test_a_body_a_worker_cannot_decode_leaves_its_plan_built_not_sent_again(
        tmp_path, monkeypatch):
    from meterline import workers
    from meterline.receivers.decoders import DecodeError, decode_body

    pool = await started_pool(tmp_path, [ProcessorSpec("labels", "labels", {})])
    with_plan = []
    send = workers._Handle.send

    def spied(handle, generation, plan, *rest):
        with_plan.append(handle.generation != generation)  # (else it is not sent)
        return send(handle, generation, plan, *rest)

    monkeypatch.setattr(workers._Handle, "send", spied)
    try:
        for _ in range(4):
            with pytest.raises(DecodeError, match="malformed JSON"):
                await pool.process_encoded(["usage"], decode_body, b'[{"provider": ')
        for _ in range(4):
            await pool.process(["usage"], long_prompts(1, 10, 0))
        assert with_plan == [False] * 8
    finally:
        await pool.shutdown()


async def test_batches_in_flight_together_are_each_answered_with_their_own_result(tmp_path):
    pool = await started_pool(tmp_path, [])
    try:
        batches = [long_prompts(n + 1, 1000 * (n + 1), 100 * n) for n in range(12)]
        results = await asyncio.gather(*(pool.process(["usage"], b) for b in batches))
        assert [r.packed for [r] in results] == [pack(b) for b in batches]
    finally:
        await pool.shutdown()


# --- webhook bodies decoded in the workers ----------------------------------------------
async def test_a_webhook_body_is_decoded_in_a_worker_not_on_the_daemons_loop(
        tmp_path, monkeypatch):
    from meterline.receivers import decoders

    monkeypatch.setattr(decoders, "list_from_json", _must_not_decode)
    monkeypatch.setattr(decoders, "_decode_item", _must_not_decode)
    port = free_port()
    async with running(pipeline(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", with_pii(0, 5))
        assert (status, body["accepted"]) == (200, 5)
        rows = await eventually(lambda: read_jsonl(tmp_path / "data" / "out.jsonl"))
        assert [r["event_id"] for r in rows] == [f"evt-0000000{i}" for i in range(5)]


async def test_items_a_worker_refuses_are_answered_by_index_with_their_reasons(tmp_path):
    port = free_port()
    items = [*with_pii(0, 1), {**with_pii(1, 1)[0], "input_tokens": -5},
             {"what": "nothing we know"}, {"@type": "GatewayEvent", "@id": "g1"},
             *with_pii(2, 1)]
    async with running(pipeline(port), tmp_path) as service:
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", items)
        assert (status, body["accepted"], body["skipped"]) == (200, 2, 1)
        assert [r["index"] for r in body["rejected"]] == [1, 2]
        assert "input_tokens" in body["rejected"][0]["reason"]
        assert "matches no decoder" in body["rejected"][1]["reason"]
        registry = service.telemetry.registry
        assert metric_value(registry, "meterline_receiver_refused_events_total",
                            reason="undecodable") == 2
        assert metric_value(registry, "meterline_receiver_refused_events_total",
                            reason="not_llm_call") == 1
        assert metric_value(registry, "meterline_receiver_accepted_events_total",
                            receiver="webhook") == 2
        rows = await eventually(lambda: read_jsonl(tmp_path / "data" / "out.jsonl"))
        assert [r["event_id"] for r in rows] == ["evt-00000000", "evt-00000002"]


async def test_a_body_a_worker_cannot_decode_is_answered_400_and_the_worker_serves_on(
        tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/events"
    async with running(pipeline(port), tmp_path) as service:
        for _ in range(4):  # (each worker gets some)
            status, body, _ = await post_raw(url, b'[{"provider": "openai",',
                                             headers={"Content-Type": "application/json"})
            assert status == 400 and "malformed JSON" in body["error"]
        status, body, _ = await post_json(url, with_pii(0, 3))
        assert (status, body["accepted"]) == (200, 3)
        assert service.pool.restarts == 0
        assert metric_value(service.telemetry.registry, "meterline_receiver_refused_events_total",
                            reason="undecodable") == 4


async def test_an_ndjson_body_is_decoded_in_a_worker_line_by_line(tmp_path):
    port = free_port()
    lines = b"\n".join(msgspec.json.encode(e) for e in with_pii(0, 3)) + b"\n{oops\n"
    async with running(pipeline(port), tmp_path):
        status, body, _ = await post_raw(f"http://127.0.0.1:{port}/v1/events", lines,
                                         headers={"Content-Type": "application/x-ndjson"})
        assert (status, body["accepted"]) == (200, 3)
        assert [r["index"] for r in body["rejected"]] == [3]
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "data" / "out.jsonl")) == 3)
        assert rows


# --- OTLP requests decoded in the workers -----------------------------------------------
def otlp_pipeline(grpc_port: int, file: dict | None = None) -> str:
    return pipeline_of({"otlp": {"grpc": f"127.0.0.1:{grpc_port}", "http": None}},
                       {"labels": {"static": {"region": "eu"}}, "redact": {}},
                       {"file": {**FILE_OUT, "batch": {"timeout": "20ms"}, **(file or {})}},
                       {"workers": 2})


async def test_an_otlp_request_is_decoded_in_a_worker_not_on_the_daemons_loop(
        tmp_path, monkeypatch):
    from meterline.receivers.decoders import otlp

    monkeypatch.setattr(otlp, "parse_request", _must_not_decode)
    monkeypatch.setattr(otlp, "_span_event", _must_not_decode)
    port = free_port()
    async with running(otlp_pipeline(port), tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await TraceServiceStub(channel).Export(to_traces_request(
            [make_event(i, user_id="ann@example.com") for i in range(3)]))
        assert answer.partial_success.rejected_spans == 0
        rows = await eventually(lambda: len(r := read_jsonl(tmp_path / "data" / "out.jsonl"))
                                == 3 and r)
    assert [r["metadata"]["region"] for r in rows] == ["eu"] * 3
    assert "ann@example.com" not in str(rows)


async def test_otlp_json_over_http_is_decoded_in_a_worker(tmp_path, monkeypatch):
    from meterline.receivers.decoders import otlp

    monkeypatch.setattr(otlp, "parse_json", _must_not_decode)
    grpc_port, http_port = free_port(), free_port()
    body = pipeline_of({"otlp": {"grpc": f"127.0.0.1:{grpc_port}",
                                 "http": f"127.0.0.1:{http_port}"}},
                       {"labels": {"static": {"region": "eu"}}}, None, {"workers": 2})
    async with running(body, tmp_path):
        status, answer, _ = await post_raw(
            f"http://127.0.0.1:{http_port}/v1/traces",
            to_json(to_traces_request([make_event(1), make_event(2)])),
            headers={"Content-Type": "application/json"})
        assert (status, answer) == (200, {"partialSuccess": {}})  # nothing rejected
        rows = await eventually(lambda: len(r := read_jsonl(tmp_path / "data" / "out.jsonl"))
                                == 2 and r)
    assert [r["metadata"]["region"] for r in rows] == ["eu", "eu"]


async def test_a_call_sent_as_span_and_log_record_to_two_workers_is_processed_once(tmp_path):
    port = free_port()
    calls = [make_event(i, trace_id=f"{i:032x}", span_id=f"{i + 1:016x}") for i in range(6)]
    async with running(otlp_pipeline(port), tmp_path) as service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        traces, logs = TraceServiceStub(channel), LogsServiceStub(channel)
        await asyncio.gather(*(send(to_request([call])) for call in calls
                               for send, to_request in ((traces.Export, to_traces_request),
                                                        (logs.Export, to_logs_request))))
        rows = await eventually(lambda: len(r := read_jsonl(tmp_path / "data" / "out.jsonl"))
                                >= 6 and r)
        registry = service.telemetry.registry
        duplicates = metric_value(registry, "meterline_receiver_refused_events_total",
                                  reason="duplicate")
        into_labels = metric_value(registry, "meterline_processor_incoming_events_total",
                                   processor="labels")
    assert sorted(r["event_id"] for r in rows) == sorted(c.event_id for c in calls)
    assert (duplicates, into_labels) == (6, 6)  # no processor saw the second copy


async def test_otlp_calls_pushed_back_after_a_worker_decoded_them_are_taken_when_sent_again(
        tmp_path):
    port = free_port()
    blocker = tmp_path / "blocked"
    blocker.write_text("not a directory")
    file = {"path": str(blocker / "out.jsonl"), "queue": {"type": "memory", "max_events": 1},
            "retry": {"initial_interval": "20ms", "max_interval": "50ms"}}
    async with running(otlp_pipeline(port, file), tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = TraceServiceStub(channel)
        await stub.Export(to_traces_request([make_event(1)]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Export(to_traces_request([make_event(2)]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        blocker.unlink()  # the exporter can write: the queue drains
        await sent_until_taken(lambda: stub.Export(to_traces_request([make_event(2)])),
                               grpc.aio.AioRpcError)  # as the SDK's exporter does
        rows = await eventually(lambda: len(r := read_jsonl(blocker / "out.jsonl")) == 2 and r)
    assert [r["event_id"] for r in rows] == ["evt-00000001", "evt-00000002"]


async def test_otlp_calls_for_pipelines_without_processors_go_to_a_worker_once(tmp_path):
    port = free_port()
    body = pipeline_of({"otlp": {"grpc": f"127.0.0.1:{port}", "http": None}}, None,
                       {"file": {**FILE_OUT, "batch": {"timeout": "20ms"}}}, {"workers": 2})
    async with running(body, tmp_path) as service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async def _no_second_trip(*args):
            raise AssertionError("events no processor runs on went to a worker again")

        service.pool.process_encoded = _no_second_trip
        await TraceServiceStub(channel).Export(to_traces_request([make_event(1)]))
        await LogsServiceStub(channel).Export(to_logs_request([make_event(1)]))
        rows = await eventually(lambda: read_jsonl(tmp_path / "data" / "out.jsonl"))
    assert [r["event_id"] for r in rows] == ["evt-00000001"]


async def test_an_otlp_request_a_worker_cannot_parse_is_invalid_argument_and_it_serves_on(
        tmp_path):
    port = free_port()
    async with running(otlp_pipeline(port), tmp_path) as service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        for _ in range(4):  # (each worker gets some)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await export(b"\x0a\xff\xff\xff\x0f")  # a length past the end
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a protobuf ExportTraceServiceRequest" in refused.value.details()
        await TraceServiceStub(channel).Export(to_traces_request([make_event(1)]))
        assert await eventually(lambda: read_jsonl(tmp_path / "data" / "out.jsonl"))
        assert service.pool.restarts == 0


async def test_a_worker_killed_mid_export_loses_no_acknowledged_otlp_call(tmp_path):
    port = free_port()
    async with running(otlp_pipeline(port), tmp_path) as service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub, acked, refusals = TraceServiceStub(channel), [], []

        async def export(first: int) -> None:
            for n in range(20):
                calls = [make_event(first + n * 25 + i) for i in range(25)]
                for _ in range(100):
                    try:
                        await stub.Export(to_traces_request(calls))
                    except grpc.aio.AioRpcError as e:
                        refusals.append(e.code())
                        await asyncio.sleep(0.05)
                        continue
                    acked.extend(c.event_id for c in calls)
                    break

        senders = [asyncio.create_task(export(i * 10_000)) for i in range(3)]
        await eventually(lambda: len(acked) >= 200, timeout=30)
        await kill_a_worker_holding_work(service.pool)
        await asyncio.gather(*senders)
        assert len(acked) == 3 * 20 * 25  # every request got in, retried where refused
        out = tmp_path / "data" / "out.jsonl"
        await eventually(lambda: len(read_jsonl(out)) >= len(acked), timeout=30)
        ids = [r["event_id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(acked)  # each acknowledged call exactly once
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in refusals  # those the dead worker held
