"""Event bounds (meterline/bounds.py): an event out of bounds is refused alone with its
reason wherever events enter (webhook, file, Kafka, OTLP); the gateway's own events are
repaired, not lost; answers computed over a table written before never hold Infinity."""

import time
from datetime import UTC, datetime
from types import SimpleNamespace

import aiohttp
import grpc
import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request
from aiokafka.structs import ConsumerRecord
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

from meterline import bounds
from meterline.component import ExportBatch
from meterline.event import Event
from meterline.exporters.otlp.encode import to_traces_request
from meterline.extensions.finops import api
from meterline.extensions.finops.cli import render
from meterline.gateway.receiver import EventBuffer
from meterline.receivers import decoders as decoders_module
from meterline.receivers.decoders import DecodeError, TooManyItems, decode_body, decode_item
from meterline.receivers.decoders.otlp import decode_request
from meterline.receivers.kafka.messages import decode_values, pack_values
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.helpers import (
    event_dicts,
    eventually,
    free_port,
    make_event,
    post_json,
    post_raw,
    read_jsonl,
    running,
    webhook_to_file,
)
from tests.test_otlp_receiver import Ports, received, running_receiver

POISON = {"event_id": "x", "provider": "openai", "request_model": "gpt-4o-mini",
          "input_tokens": 1000, "sample_weight": 1e308}


def refusal(**fields):
    """The reason the decoders give for one meterline event with `fields`."""
    item = {**event_dicts(0, 1)[0], **fields}
    decoded = decode_body(msgspec.json.encode([item]))
    assert not decoded.events
    [(_, reason)] = decoded.rejected
    return reason


def accepted(**fields):
    decoded = decode_body(msgspec.json.encode([{**event_dicts(0, 1)[0], **fields}]))
    return decoded.events


# --- through the webhook ----------------------------------------------------------------
async def test_the_poison_weight_is_refused_naming_sample_weight_and_its_neighbour_kept(
        tmp_path):
    port = free_port()
    good = event_dicts(0, 1)[0]
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          [POISON, good])
        assert (status, body["accepted"]) == (200, 1)
        [rejected] = body["rejected"]
        assert rejected["index"] == 0 and "sample_weight" in rejected["reason"]
        rows = await eventually(lambda: read_jsonl(tmp_path / "data/out.jsonl"))
        assert [r["event_id"] for r in rows] == [good["event_id"]]


async def test_an_event_nested_deeper_than_the_bound_is_refused_alone(tmp_path):
    """Up to about 990 levels decode (Python's recursion limit, from where the decoder
    runs), but the main process, unpacking the processed batch on a deeper stack, could
    not: 985 levels were a 500 for the whole request. Past 100 an event is refused, its
    neighbour kept."""
    port = free_port()
    good = event_dicts(0, 1)[0]
    deep = msgspec.json.encode({**event_dicts(1, 1)[0], "params": {"p": "DEEP"}}).replace(
        b'"DEEP"', b"[" * 500 + b"]" * 500)  # (written out: the test's stack is deep)
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_raw(f"http://127.0.0.1:{port}/v1/events",
                                         b"[" + deep + b"," + msgspec.json.encode(good) + b"]",
                                         headers={"Content-Type": "application/json"})
        assert status == 200 and body.get("accepted") == 1, (status, body)
        [rejected] = body["rejected"]
        assert rejected["index"] == 0 and "nested deeper than 100 levels" in rejected["reason"]
        rows = await eventually(lambda: read_jsonl(tmp_path / "data/out.jsonl"))
        assert [r["event_id"] for r in rows] == [good["event_id"]]


def nested(levels: int) -> list:
    """Lists `levels` deep."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


# --- one bound each -----------------------------------------------------------------------
def test_negative_tokens_are_refused():
    assert "Expected `int` >= 0 - at `$.input_tokens`" in refusal(input_tokens=-1)


def test_tokens_of_2_63_minus_1_are_refused():
    assert "$.output_tokens" in refusal(output_tokens=2**63 - 1)


def test_a_context_of_ten_million_tokens_is_accepted():
    assert accepted(input_tokens=10_000_000)


def test_status_70000_is_refused():
    assert "Expected `int` <= 599 - at `$.status_code`" in refusal(status_code=70000)


def test_status_499_of_a_call_the_client_cancelled_is_accepted():
    assert accepted(status_code=499)


def test_a_negative_timestamp_is_refused():
    assert "$.timestamp" in refusal(timestamp=-1)


def test_a_timestamp_two_days_ahead_is_refused():
    assert "$.timestamp" in refusal(timestamp=time.time_ns() + 2 * 86_400 * 10**9)


def test_an_empty_event_id_is_refused():
    assert "Expected `str` of length >= 1 - at `$.event_id`" in refusal(event_id="")


def test_a_1_mb_event_id_is_refused():
    reason = refusal(event_id="x" * (1 << 20))
    assert "Expected `str` of length <= 256 - at `$.event_id`" in reason


def test_a_nul_in_user_id_is_refused():
    assert "control characters" in refusal(user_id="alice\x00")
    assert "$.user_id" in refusal(user_id="alice\x00")


def test_a_control_character_in_a_metadata_key_is_refused():
    assert "`key` in `$.metadata`" in refusal(metadata={"customer\x1b": "acme"})


def test_a_newline_in_a_metadata_value_is_refused():
    assert "$.metadata" in refusal(metadata={"customer": "acme\n"})


def test_more_metadata_entries_than_the_bound_are_refused():
    metadata = {f"k{i}": "v" for i in range(bounds.METADATA_ENTRIES + 1)}
    assert "$.metadata" in refusal(metadata=metadata)


def test_a_control_character_in_a_tag_is_refused():
    assert "$.tags[1]" in refusal(tags=["prod", "User-Agent\x00"])


def test_more_tags_than_the_bound_are_refused():
    assert "$.tags" in refusal(tags=[f"t{i}" for i in range(bounds.LIST_ITEMS + 1)])


def test_a_tag_longer_than_a_name_is_refused():
    assert "$.tags[0]" in refusal(tags=["x" * (bounds.NAME_CHARS + 1)])


def test_an_error_message_and_message_content_may_hold_newlines_and_tabs():
    assert accepted(error_message="Traceback:\n\tline 1\r\n",
                    input_messages=[{"role": "user", "content": "a\n\tb\x00"}])


def test_a_backslash_in_a_name_is_accepted():
    assert accepted(user_id="DOMAIN\\alice", request_model="a\\nb")


def test_a_duration_beyond_thirty_days_is_refused():
    assert "Expected `float` <= 2592000000.0 - at `$.duration_ms`" in refusal(duration_ms=1e300)


def test_a_negative_cost_is_refused():
    assert "$.cost_usd" in refusal(cost_usd=-0.01)


def test_a_weight_of_zero_is_refused():
    assert "Expected `float` > 0.0 - at `$.sample_weight`" in refusal(sample_weight=0)


def test_a_thousand_attempts_and_one_are_refused():
    assert "$.attempts" in refusal(attempts=1001)


def test_a_ratelimit_beyond_the_bound_is_refused():
    assert "$.ratelimit_tokens_limit" in refusal(ratelimit_tokens_limit=10**13)


@pytest.mark.parametrize("field", ["params", "attributes"])
def test_free_content_nested_deeper_than_100_levels_is_refused_naming_the_field(field):
    assert refusal(**{field: {"x": nested(100)}}) == (  # the map is a level of its own
        f"out of bounds: nested deeper than 100 levels of objects and lists - at `$.{field}`")
    assert accepted(**{field: {"x": nested(99)}})


def test_messages_nested_deeper_than_100_levels_are_refused():
    content = [{"type": "text", "text": nested(98)}]  # 1 + 1 + 1 + 98 levels
    assert "at `$.input_messages`" in refusal(
        input_messages=[{"role": "user", "content": content}])


def test_each_bad_item_of_a_batch_is_refused_alone_with_its_own_reason():
    items = event_dicts(0, 4)
    items[1]["input_tokens"] = -5
    items[3]["status_code"] = 70000
    decoded = decode_body(msgspec.json.encode(items))
    assert [e.event_id for e in decoded.events] == [items[0]["event_id"], items[2]["event_id"]]
    assert [(i, "input_tokens" in r, "status_code" in r) for i, r in decoded.rejected] == [
        (1, True, False), (3, False, True)]


def test_ndjson_items_are_checked_too():
    lines = [msgspec.json.encode(e) for e in event_dicts(0, 2)]
    lines.append(msgspec.json.encode({**event_dicts(2, 1)[0], "user_id": "a\x01"}))
    decoded = decode_body(b"\n".join(lines), ndjson=True)
    assert len(decoded.events) == 2 and [i for i, _ in decoded.rejected] == [2]


def test_an_item_read_from_a_file_is_checked():
    with pytest.raises(DecodeError, match="sample_weight"):
        decode_item(POISON)


def kafka_batch(*values):
    """A polled batch of messages with these values, as the receiver hands it over."""
    return pack_values([ConsumerRecord("t", 0, n, 0, 0, None, v, None, 0, len(v), ())
                        for n, v in enumerate(values)])


def test_a_kafka_message_out_of_bounds_is_poison_alone_when_its_batch_is_all_meterline_json():
    good = [msgspec.json.encode(e) for e in event_dicts(0, 2)]
    decoded = decode_values(kafka_batch(good[0], msgspec.json.encode(POISON), good[1]), "json")
    assert [e.event_id for e in decoded.events] == ["evt-00000000", "evt-00000001"]
    [(index, reason)] = decoded.rejected
    assert index == 1 and "sample_weight" in reason


def test_a_kafka_message_nested_too_deep_is_poison_alone():
    good = msgspec.json.encode(event_dicts(0, 1)[0])
    decoded = decode_values(kafka_batch(b"[" * 100_000 + b"]" * 100_000, good), "json")
    assert len(decoded.events) == 1
    [(index, reason)] = decoded.rejected
    assert index == 0 and "nested too deeply" in reason


# --- items per body --------------------------------------------------------------------
def test_a_body_of_more_items_than_the_bound_is_refused_whole_before_any_is_decoded(
        monkeypatch):
    def decoding(_):
        raise AssertionError("an item was decoded")

    monkeypatch.setattr("meterline.receivers.decoders.list_from_json", decoding)
    monkeypatch.setattr("meterline.receivers.decoders._raw", msgspec.json.Decoder(None))
    bomb = b"[" + b",".join([b"{}"] * (bounds.ITEMS_MAX + 1)) + b"]"
    with pytest.raises(TooManyItems, match=f"{bounds.ITEMS_MAX + 1} items in one body: "
                                           f"at most {bounds.ITEMS_MAX}"):
        decode_body(bomb)


def test_a_body_of_as_many_items_as_the_bound_is_decoded(monkeypatch):
    monkeypatch.setattr(bounds, "ITEMS_MAX", 500)
    items = [{"provider": "openai", "input_tokens": 1}] * 500
    assert len(decode_body(msgspec.json.encode(items)).events) == 500
    with pytest.raises(TooManyItems):
        decode_body(msgspec.json.encode([*items, 1]))  # whatever the items are


def test_an_ndjson_body_of_more_lines_than_the_bound_is_refused_whole(monkeypatch):
    monkeypatch.setattr(bounds, "ITEMS_MAX", 500)
    line = b'{"provider": "openai", "input_tokens": 1}\n'
    assert len(decode_body(line * 500, ndjson=True).events) == 500  # the last newline ends
    with pytest.raises(TooManyItems, match="501 lines in one body: at most 500"):
        decode_body(line * 500 + b"{}", ndjson=True)
    with pytest.raises(TooManyItems):  # JSON documents one per line, sent as JSON
        decode_body(b"{}\n" * 501)


async def test_the_webhook_answers_413_to_a_body_of_millions_of_tiny_items_and_goes_on(
        tmp_path):
    # 4 MB, within max_body_mb and not compressed (a gzip of it is refused by its
    # compression ratio already): two million items, each refused with its reason
    port = free_port()
    bomb = b"[" + b",".join([b"0"] * 2_000_000) + b"]"
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_raw(f"http://127.0.0.1:{port}/v1/events", bomb,
                                         headers={"Content-Type": "application/json"})
        assert status == 413
        assert body["error"] == (f"2000000 items in one body: at most {bounds.ITEMS_MAX} "
                                 "(send smaller batches)")
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          event_dicts(0, 2))
        assert (status, body["accepted"]) == (200, 2)


def test_a_kafka_message_of_several_items_is_not_decoded_with_its_batch(monkeypatch):
    # joined with its neighbours, `{},{},...` would read as that many events
    decoded_counts = []
    real = decoders_module.list_from_json
    monkeypatch.setattr("meterline.receivers.kafka.messages.list_from_json",
                        lambda body: decoded_counts.append(len(real(body))) or real(body))
    good = [msgspec.json.encode(e) for e in event_dicts(0, 2)]
    decoded = decode_values(kafka_batch(good[0], b",".join([b"{}"] * 1000), good[1]), "json")
    assert decoded_counts == []
    assert [e.event_id for e in decoded.events] == ["evt-00000000", "evt-00000001"]
    [(index, reason)] = decoded.rejected
    assert index == 1 and "malformed JSON" in reason


def test_a_body_of_more_json_containers_than_the_bound_is_refused_before_it_is_parsed(
        monkeypatch):
    monkeypatch.setattr(bounds, "CONTAINERS_MAX", 1000)
    def event(messages: int) -> dict:
        return {"provider": "openai", "input_messages": [{}] * messages}
    assert len(decode_body(msgspec.json.encode([event(997)])).events) == 1  # 1000 of them
    with pytest.raises(TooManyItems, match="more than 1,000 JSON objects and arrays"):
        decode_body(msgspec.json.encode([event(998)]))  # one event, nested: not items


def test_a_kafka_message_of_more_json_containers_than_the_bound_is_poison_alone(monkeypatch):
    monkeypatch.setattr(bounds, "CONTAINERS_MAX", 1000)
    good = [msgspec.json.encode(e) for e in event_dicts(0, 2)]
    big = msgspec.json.encode({"provider": "openai", "input_messages": [{}] * 1000})
    decoded = decode_values(kafka_batch(good[0], big, good[1]), "json")
    assert [e.event_id for e in decoded.events] == ["evt-00000000", "evt-00000001"]
    [(index, reason)] = decoded.rejected
    assert index == 1 and "more than 1,000 JSON objects and arrays" in reason


def empty_spans(count: int, resources: int = 1) -> bytes:
    """An OTLP trace request of `count` empty spans (two bytes each on the wire), spread
    over `resources` resources."""
    request = ExportTraceServiceRequest()
    for n in range(resources):
        spans = request.resource_spans.add().scope_spans.add().spans
        for _ in range(count // resources + (n < count % resources)):
            spans.add()
    return request.SerializeToString()


def test_an_otlp_request_of_more_items_than_the_bound_is_refused_before_it_is_parsed(
        monkeypatch):
    monkeypatch.setattr(bounds, "ITEMS_MAX", 500)
    decoded = decode_request("traces", False, empty_spans(500, resources=3))
    assert decoded.skipped == 500  # (not LLM calls) as many as the bound: parsed
    with pytest.raises(TooManyItems, match="more than 500 items in one request"):
        decode_request("traces", False, empty_spans(501, resources=3))


def test_an_otlp_json_request_of_more_items_than_the_bound_is_refused(monkeypatch):
    monkeypatch.setattr(bounds, "ITEMS_MAX", 500)
    for name in ("scopeSpans", "scope_spans"):  # either JSON name of a field
        def body(count: int, scopes: str = name) -> bytes:
            return msgspec.json.encode({"resourceSpans": [{scopes: [{"spans": [{}] * count}]}]})
        assert decode_request("traces", True, body(500)).skipped == 500
        with pytest.raises(TooManyItems, match="more than 500 items in one request"):
            decode_request("traces", True, body(501))


def test_an_otlp_json_request_of_more_json_containers_than_the_bound_is_refused(monkeypatch):
    monkeypatch.setattr(bounds, "CONTAINERS_MAX", 1000)
    span = {"name": "s", "attributes": [{}] * 1000}  # one span: within ITEMS_MAX
    body = msgspec.json.encode({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]})
    with pytest.raises(TooManyItems, match="more than 1,000 JSON objects and arrays"):
        decode_request("traces", True, body)


async def test_the_otlp_receiver_answers_413_and_invalid_argument_to_too_many_spans(tmp_path):
    ports = Ports()
    bomb = empty_spans(bounds.ITEMS_MAX + 1)  # 200 KB
    async with running_receiver(ports, tmp_path), aiohttp.ClientSession() as session, \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        async with session.post(f"http://127.0.0.1:{ports.http}/v1/traces", data=bomb,
                                headers={"Content-Type": "application/x-protobuf"}) as response:
            assert response.status == 413
            assert RpcStatus.FromString(await response.read()).message == (
                f"more than {bounds.ITEMS_MAX} items in one request (send smaller batches)")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await TraceServiceStub(channel).Export(ExportTraceServiceRequest.FromString(bomb))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith(f"more than {bounds.ITEMS_MAX} items")
        answer = await TraceServiceStub(channel).Export(to_traces_request([make_event(1)]))
        assert not answer.partial_success.rejected_spans


def test_a_numeric_field_without_a_bound_fails_loudly():
    with pytest.raises(TypeError, match="needs a bound"):
        bounds._checked_type("retries", int, 0, True)


# --- the gateway's own events -------------------------------------------------------------
def test_the_gateway_repairs_hostile_upstream_numbers_and_keeps_the_call():
    events = [make_event(0, input_tokens=2**70, output_tokens=-4, status_code=999,
                         sample_weight=float("inf")), make_event(1)]
    bounds.repair(events)
    assert bounds.refused(events) == {}
    assert (events[0].input_tokens, events[0].output_tokens, events[0].status_code,
            events[0].sample_weight) == (None, None, None, 1.0)
    assert events[0].event_id == "evt-00000000" and events[1] == make_event(1)


def test_the_gateway_drops_messages_nested_too_deeply_and_keeps_the_call():
    events = [make_event(0, input_messages=[{"role": "user", "content": nested(200)}])]
    bounds.repair(events)
    assert bounds.refused(events) == {}
    assert (events[0].event_id, events[0].input_messages) == ("evt-00000000", None)


async def test_the_gateway_buffer_hands_over_its_events_repaired():
    got = []

    class Consumer:
        async def consume(self, batch):
            got.extend(batch)

    config = SimpleNamespace(buffer_size=10, batch_size=10, flush_interval=1)
    buffer = EventBuffer(config, Consumer(), None, None)
    buffer.add(make_event(0, input_tokens=10**12, user_id="a\x00"))
    assert await buffer._flush()
    [event] = got
    assert (event.event_id, event.input_tokens, event.user_id) == ("evt-00000000", None, None)


# --- OTLP -----------------------------------------------------------------------------------
async def test_an_otlp_span_with_out_of_range_tokens_is_rejected_in_the_partial_success(
        tmp_path):
    ports = Ports()
    request = to_traces_request([make_event(1), make_event(2)])
    bad = request.resource_spans[0].scope_spans[0].spans[1]
    next(a for a in bad.attributes if a.key == "gen_ai.usage.input_tokens").value.int_value = \
        2**40
    async with running_receiver(ports, tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        answer = await TraceServiceStub(channel).Export(request)
        assert answer.partial_success.rejected_spans == 1
        assert "out of bounds (gen_ai.usage.input_tokens)" in (
            answer.partial_success.error_message)
        [got] = await received(tmp_path, 1)
        assert got["event_id"] == "evt-00000001"


# --- answers over a table written before --------------------------------------------------
async def test_the_analytics_api_answers_null_not_infinity_for_an_infinite_weight(tmp_path):
    async with clickhouse_exporters(tmp_path) as make:
        exporter = await make("ch")
        now = time.time_ns()
        await exporter.export(ExportBatch("b", [make_event(0, timestamp=now,
                                                           sample_weight=float("inf"))]))
        extension = finops_of(exporter)
        handler = api.routes(extension)["analytics/providers"]
        response = await handler(make_mocked_request(
            "GET", "/api/v1/analytics/providers?range=24h"))
        await extension.shutdown()
        assert response.status == 200
        assert b"Infinity" not in response.body and b"NaN" not in response.body
        msgspec.json.decode(response.body)  # strict JSON


def test_finops_output_shows_no_inf():
    answer = {"by": "model", "since": str(datetime.now(UTC)), "until": str(datetime.now(UTC)),
              "rows": [{"model": "gpt-4o-mini", "requests": float("inf"),
                        "cost_usd": float("nan")}],
              "total": {"requests": float("inf"), "cost_usd": float("nan")}}
    for fmt in ("table", "json", "csv"):
        text = render(answer, "spend", fmt)
        assert "inf" not in text.lower().replace("info", "") and "nan" not in text.lower()


def test_checked_events_are_the_events_as_they_were():
    events = [make_event(i) for i in range(3)]
    assert bounds.refused(events) == {} and events == [make_event(i) for i in range(3)]
    assert isinstance(events[0], Event)
