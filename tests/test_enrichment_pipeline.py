"""End to end: webhook -> labels -> cost -> redact -> sample -> file."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    FIXTURES,
    eventually,
    free_port,
    metric_value,
    post_json,
    read_jsonl,
    running,
    webhook_to_file,
)


def pipeline(port: int, processors: str) -> str:
    """The webhook into the file exporter through `processors` (their YAML block)."""
    return webhook_to_file(port, processors=yaml.safe_load(textwrap.dedent(processors)))


DEFAULTS = """
      labels: {}
      cost: {}
      redact: {}
      sample: {}
"""


async def send_and_read(port: int, tmp_path: Path, items: list[object], expected: int
                        ) -> list[dict[str, object]]:
    status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", items)
    assert (status, body["accepted"]) == (200, len(items))
    out = tmp_path / "data" / "out.jsonl"
    return await eventually(lambda: len(read_jsonl(out)) >= expected and read_jsonl(out))


async def test_default_processors_price_and_redact_every_event(tmp_path: Path) -> None:
    port = free_port()
    otoroshi = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())
    litellm = json.loads((FIXTURES / "litellm-standard-logging-payload.json").read_text())
    own = {"event_id": "own-1", "provider": "anthropic", "request_model": "claude-sonnet-4-5",
           "input_tokens": 2000, "cache_read_tokens": 1500, "output_tokens": 100,
           "metadata": {"customer_id": "acme-42"},
           "input_messages": [{"role": "user", "content": "I'm jane.doe@acme-corp.com, "
                                                         "card 4111 1111 1111 1111"}]}
    async with running(pipeline(port, DEFAULTS), tmp_path) as service:
        rows = await send_and_read(port, tmp_path, [otoroshi, litellm, own], 3)
        registry = service.telemetry.registry
        # the message's address, and LiteLLM's user id alice@example.com
        assert metric_value(registry, "meterline_redact_redactions_total",
                            detector="email") == 2
    by_source = {r.get("source"): r for r in rows}
    assert by_source["litellm"]["user_id"].startswith("<EMAIL:")  # a stable pseudonym
    # Otoroshi's gpt-4o-mini call: 14 input, 39 output tokens at $0.15 / $0.60 per 1M
    oto = by_source["otoroshi"]
    assert oto["cost_usd"] == pytest.approx((14 * 0.15 + 39 * 0.60) / 1e6)
    assert oto["pricing_ref"] == "openai/gpt-4o-mini@bundled"
    # LiteLLM's gpt-4o call: 120 input tokens of which 64 cached, 35 output tokens,
    # at $2.50 / $1.25 cached / $10; the source's own figure is kept apart
    lite = by_source["litellm"]
    assert lite["cost_usd"] == pytest.approx((56 * 2.5 + 64 * 1.25 + 35 * 10) / 1e6)
    assert lite["actual_cost_usd"] == 0.0004125
    mine = next(r for r in rows if r["event_id"] == "own-1")
    assert mine["cost_input_usd"] == pytest.approx((500 * 3 + 1500 * 0.3) / 1e6)
    assert mine["input_messages"] == [
        {"role": "user", "content": "I'm <EMAIL>, card <CREDIT_CARD>"}]
    assert mine["redactions"] == {"email": 1, "credit_card": 1}
    assert mine["metadata"] == {"customer_id": "acme-42"}
    assert all(r.get("sample_weight", 1.0) == 1.0 for r in rows)


async def test_configured_processors_attribute_hash_and_sample_content(tmp_path: Path) -> None:
    port = free_port()
    processors = """
      labels:
        static: {environment: prod}
        api_keys: {keys: {ak_1: {name: checkout, team: payments}}}
      cost:
        prices: {self-hosted/llama-3-70b: {input: 0.2, output: 0.2}}
      redact:
        detectors: {email: hash}
        hash_key: "0123456789abcdef0123"
      sample:
        mode: content
        rate: 0.0
"""
    items = [{"event_id": f"e{i}", "provider": "self-hosted", "request_model": "llama-3-70b",
              "api_key_id": "ak_1", "input_tokens": 1000, "output_tokens": 1000,
              "input_messages": [{"role": "user", "content": "mail bob@corp.example.com"}]}
             for i in range(3)] + [
             {"event_id": "err", "provider": "self-hosted", "request_model": "llama-3-70b",
              "status_code": 500, "error_type": "server_error", "input_tokens": 10,
              "output_tokens": 0,
              "input_messages": [{"role": "user", "content": "mail bob@corp.example.com"}]}]
    async with running(pipeline(port, processors), tmp_path):
        rows = await send_and_read(port, tmp_path, items, 4)
    by_id = {r["event_id"]: r for r in rows}
    for i in range(3):
        r = by_id[f"e{i}"]
        assert (r["team"], r["api_key_name"]) == ("payments", "checkout")
        assert r["metadata"] == {"environment": "prod"}
        assert r["cost_usd"] == pytest.approx(2000 * 0.2 / 1e6)
        assert "input_messages" not in r  # sampled out of content, counted in redactions
        assert r["redactions"] == {"email": 1}
    error = by_id["err"]  # errors keep their content: the email is hashed, not stored
    content = error["input_messages"][0]["content"]
    assert content.startswith("mail <EMAIL:") and "bob@" not in content


async def test_ids_holding_pii_leave_as_pseudonyms_shaped_as_ids(tmp_path: Path) -> None:
    port = free_port()
    otoroshi = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())
    otoroshi["@id"] = "ops@acme-corp.com"  # becomes the event_id
    spans = [{"event_id": f"span-{i}", "provider": "openai", "request_model": "gpt-4o",
              "trace_id": "jane.doe@acme-corp.com"} for i in range(2)]
    async with running(pipeline(port, DEFAULTS), tmp_path):
        rows = await send_and_read(port, tmp_path, [otoroshi, *spans], 3)
    assert "@acme-corp.com" not in json.dumps(rows)
    oto = next(r for r in rows if r.get("source") == "otoroshi")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        oto["event_id"])
    traced = [r for r in rows if r["event_id"].startswith("span-")]
    assert re.fullmatch(r"[0-9a-f]{32}", traced[0]["trace_id"])
    assert traced[1]["trace_id"] == traced[0]["trace_id"]
    assert traced[0]["redactions"] == {"email": 1}
