"""`meterline run --demo`: the default pipeline fills every exporter within seconds."""

import asyncio
import json
import re

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, Daemon, eventually, free_port, read_jsonl

DEFAULT_PORTS = ("8080", "8090", "4317", "4318", "9464", "8888")


def default_pipeline_on_free_ports(tmp_path):
    """The root pipeline.yaml, unchanged but for its ports (others may hold the defaults)."""
    ports = {p: str(free_port()) for p in DEFAULT_PORTS}
    text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports.get(m[1], m[1])}",
                  (ROOT / "pipeline.yaml").read_text())
    (tmp_path / "pipeline.yaml").write_text(text)
    return ports


async def fetch(url):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_the_demo_fills_every_exporter_of_the_default_pipeline(tmp_path):
    ports = default_pipeline_on_free_ports(tmp_path)
    daemon = Daemon(tmp_path / "pipeline.yaml", int(ports["8888"]), tmp_path)
    daemon.start(timeout=30, extra_args=["--demo"])
    try:
        # file: history from the webhook, live calls through the gateway
        def live_calls():
            rows = read_jsonl(tmp_path / "data" / "events.jsonl")
            live = [e for e in rows if e.get("source") == "gateway"]
            streamed = any(e.get("streaming") for e in live)  # streams end later
            # a quarter of the live calls go to Anthropic, drawn at random: wait for one
            # (fifteen calls hold none once in fifty runs)
            endpoints = {e["endpoint"] for e in live}
            return (len(live) >= 15 and streamed and "/v1/messages" in endpoints
                    and (rows, live))

        rows, live = await eventually(live_calls, timeout=30)
        assert any(e.get("source") == "meterline" for e in rows)  # the history
        assert {e["provider"] for e in rows} >= {"openai", "anthropic", "gcp.gemini"}
        assert {e["endpoint"] for e in live} >= {"/v1/chat/completions", "/v1/messages"}
        assert any(e.get("error_type") for e in rows)
        assert all(e["metadata"]["environment"] == "demo" for e in rows)
        assert any(e.get("team") for e in rows)  # the demo's API-key table, via labels
        # prometheus
        _, text = await fetch(f"http://127.0.0.1:{ports['9464']}/metrics")
        requests = [s for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "llm_gateway_requests_total"]
        assert sum(s.value for s in requests) > 0
        # clickhouse, through the analytics API
        for _ in range(100):
            _, body = await fetch(f"http://127.0.0.1:{ports['8888']}/api/v1/analytics/usage"
                                  "?range=30d")
            if json.loads(body)["totals"]["requests"] > 0:
                break
            await asyncio.sleep(0.2)
        assert json.loads(body)["totals"]["requests"] > 0
    finally:
        assert daemon.stop() == 0


def test_the_demo_needs_a_gateway_receiver(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
receivers: {{webhook: {{listen: "127.0.0.1:{free_port()}"}}}}
exporters: {{debug: {{}}}}
service:
  data_dir: {tmp_path / "data"}
  admin: null
  pipelines: {{p: {{receivers: [webhook], exporters: [debug]}}}}
""")
    result = subprocess.run([sys.executable, "-m", "meterline", "run", "--demo", "-c",
                             str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "the demo drives the gateway receiver" in result.stderr
