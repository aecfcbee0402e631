"""Receiver `webhook`: what it accepts, what it refuses, and how it pushes back."""

import asyncio
import gzip
import json

import msgspec

from tests.helpers import (
    FIXTURES,
    event_dicts,
    eventually,
    free_port,
    metric_value,
    post_json,
    post_raw,
    read_jsonl,
    running,
    webhook_to_file,
)


async def test_a_json_array_is_accepted_and_exported(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          event_dicts(0, 20))
        assert (status, body) == (200, {"accepted": 20, "rejected": []})
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 20
                                and read_jsonl(tmp_path / "data/out.jsonl"))
        assert [r["event_id"] for r in rows] == [f"evt-{i:08d}" for i in range(20)]


async def test_a_single_object_is_accepted(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          {"provider": "openai", "input_tokens": 3})
        assert (status, body["accepted"]) == (200, 1)


async def test_ndjson_gzip_body_is_accepted(tmp_path):
    port = free_port()
    lines = b"\n".join(msgspec.json.encode(e) for e in event_dicts(0, 5))
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_raw(
            f"http://127.0.0.1:{port}/v1/events", gzip.compress(lines),
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
        assert (status, body["accepted"]) == (200, 5)


async def test_otoroshi_webhook_batch_is_accepted(tmp_path):
    port = free_port()
    audit = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", [audit])
        assert (status, body["accepted"]) == (200, 1)
        rows = await eventually(lambda: read_jsonl(tmp_path / "data/out.jsonl"))
        assert rows[0]["source"] == "otoroshi"


async def test_otoroshi_events_that_are_not_llm_calls_are_skipped_and_counted(tmp_path):
    port = free_port()
    audit = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())
    others = [{"@type": "GatewayEvent", "@id": "g1"}, {"@type": "AlertEvent", "@id": "a1"}]
    async with running(webhook_to_file(port), tmp_path) as service:
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          [others[0], audit, others[1]])
        assert (status, body) == (200, {"accepted": 1, "rejected": [], "skipped": 2})
        assert metric_value(service.telemetry.registry,
                            "meterline_receiver_refused_events_total",
                            reason="not_llm_call") == 2
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", others)
        assert (status, body["accepted"]) == (200, 0)  # not the sender's mistake: no 400


async def test_each_refused_item_gets_its_reason_and_the_rest_is_accepted(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        items = [*event_dicts(0, 2), {"what": "ever"}, 42]
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", items)
        assert status == 200
        assert body["accepted"] == 2
        assert [r["index"] for r in body["rejected"]] == [2, 3]
        assert "matches no decoder" in body["rejected"][0]["reason"]


async def test_a_body_with_nothing_acceptable_is_a_400(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", [{"x": 1}])
        assert status == 400 and body["accepted"] == 0


async def valid_batch_still_arrives(url, tmp_path):
    """After a refused request: the next good batch is accepted and exported whole."""
    status, body, _ = await post_json(url, event_dicts(500, 3))
    assert (status, body["accepted"]) == (200, 3)
    rows = await eventually(lambda: read_jsonl(tmp_path / "data/out.jsonl"))
    assert [r["event_id"] for r in rows] == [f"evt-{i:08d}" for i in range(500, 503)]


async def test_malformed_json_is_a_400_that_says_where_and_disturbs_nothing(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        status, body, _ = await post_raw(url, b'[{"a": 1},',
                                         headers={"Content-Type": "application/json"})
        assert status == 400 and "malformed JSON" in body["error"]
        await valid_batch_still_arrives(url, tmp_path)


async def test_a_wrong_content_type_is_a_415_and_disturbs_nothing(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        status, body, _ = await post_raw(url, b"a=b")
        assert status == 415 and "application/json" in body["error"]
        await valid_batch_still_arrives(url, tmp_path)


async def test_an_oversized_body_is_a_413_and_the_next_request_works(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port, {"max_body_mb": 0.01}), tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        status, body, _ = await post_json(url, event_dicts(0, 200))
        assert status == 413 and "max_body_mb" in body["error"]
        status, _, _ = await post_json(url, event_dicts(0, 1))
        assert status == 200


async def test_a_gzip_bomb_is_stopped_by_the_body_limit(tmp_path):
    port = free_port()
    bomb = gzip.compress(b"[" + b" " * (20 << 20) + b"]")
    async with running(webhook_to_file(port, {"max_body_mb": 1}), tmp_path):
        status, _, _ = await post_raw(f"http://127.0.0.1:{port}/v1/events", bomb, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert status == 413


async def test_bearer_token_is_required_when_configured(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port, {"auth_token": "s3cret"}), tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        status, _, _ = await post_json(url, event_dicts(0, 1))
        assert status == 401
        status, _, _ = await post_json(url, event_dicts(0, 1),
                                       headers={"Authorization": "Bearer s3cret"})
        assert status == 200


async def test_a_full_queue_answers_429_and_loses_nothing(tmp_path):
    port = free_port()
    # The exporter cannot write (its directory is a file) until we fix it, so the
    # small queue fills and the webhook must push back.
    blocker = tmp_path / "blocked"
    blocker.write_text("not a directory")
    body = webhook_to_file(port, file={
        "path": str(blocker / "out.jsonl"), "queue": {"max_size_mb": 0.02},
        "retry": {"initial_interval": "20ms", "max_interval": "50ms"}})
    accepted: list[str] = []
    async with running(body, tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        refused = 0
        for i in range(40):
            items = event_dicts(i * 10, 10)
            status, _, headers = await post_json(url, items)
            if status == 200:
                accepted += [e["event_id"] for e in items]
            else:
                assert status == 429 and headers["Retry-After"] == "1"
                refused += 1
        assert refused > 0 and accepted
        blocker.unlink()
        blocker.mkdir()
        await eventually(lambda: len(read_jsonl(blocker / "out.jsonl")) >= len(accepted))
        exported = [r["event_id"] for r in read_jsonl(blocker / "out.jsonl")]
        assert set(accepted) == set(exported)


async def test_concurrent_posts_all_land(tmp_path):
    port = free_port()
    async with running(webhook_to_file(port), tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        results = await asyncio.gather(*(post_json(url, event_dicts(i * 50, 50))
                                         for i in range(20)))
        assert all(status == 200 for status, _, _ in results)
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 1000)


async def test_json_nested_too_deeply_is_a_400_that_says_so(tmp_path):
    port = free_port()
    deep = b"[" * 10_000 + b"]" * 10_000
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_raw(f"http://127.0.0.1:{port}/v1/events", deep,
                                         headers={"Content-Type": "application/json"})
        assert status == 400 and "nested too deeply" in body["error"]


async def test_an_ndjson_line_nested_too_deeply_is_refused_alone(tmp_path):
    port = free_port()
    good = msgspec.json.encode(event_dicts(0, 1)[0])
    deep = b'{"event_id": "x", "metadata": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_raw(f"http://127.0.0.1:{port}/v1/events",
                                         good + b"\n" + deep + b"\n",
                                         headers={"Content-Type": "application/x-ndjson"})
        assert (status, body["accepted"]) == (200, 1)
        assert "line 2: JSON nested too deeply" in str(body["rejected"])


async def test_an_item_with_an_integer_beyond_64_bits_is_refused_alone(tmp_path):
    port = free_port()
    items = event_dicts(0, 3)
    items[1]["input_tokens"] = 2**70
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", items)
        assert (status, body["accepted"]) == (200, 2)
        assert body["rejected"] == [{"index": 1, "reason": "an integer is out of range "
                                                           "(more than 64 bits)"}]
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 2
                                and read_jsonl(tmp_path / "data/out.jsonl"))
        assert {r["event_id"] for r in rows} == {items[0]["event_id"], items[2]["event_id"]}


async def test_a_guardrail_outcome_of_an_unknown_action_is_refused_alone(tmp_path):
    port = free_port()
    items = event_dicts(0, 2)
    items[0]["guardrails"] = [{"rule": "pii", "stage": "input", "action": "Block"}]
    items[1]["guardrails"] = [{"rule": "pii", "stage": "input", "action": "block"}]
    async with running(webhook_to_file(port), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", items)
    assert (status, body["accepted"]) == (200, 1)
    [refused] = body["rejected"]
    assert refused["index"] == 0
    assert refused["reason"] == ("invalid meterline event: Invalid enum value 'Block' - at "
                                 "`$.guardrails[0].action`")
