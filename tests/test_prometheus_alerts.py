"""deploy/prometheus/alerts.yml: valid, passing its promtool unit tests, and written only
against metrics the `prometheus` exporter produces. Skipped when promtool is absent."""

import re
import shutil
import subprocess

import pytest
import yaml

from meterline.exporters.prometheus.exporter import PrometheusConfig, PrometheusExporter
from tests.helpers import ROOT, make_context

RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="needs promtool (apt-get install prometheus)")

# Gauges that are not events, republished from the self-telemetry: the gateway's live
# figures and the FinOps budgets (created by those components on `context.meter`).
REPUBLISHED = {"llm_gateway_requests_inflight", "llm_gateway_active_requests",
               "llm_gateway_endpoint_healthy", "llm_gateway_budget_spend_usd",
               "llm_gateway_budget_limit_usd", "llm_gateway_budget_utilization_ratio",
               "llm_gateway_budget_threshold_reached_ratio"}


def promtool(*args):
    return subprocess.run([PROMTOOL, *args], cwd=RULES, capture_output=True, text=True,
                          timeout=120)


@needs_promtool
def test_the_rules_pass_promtool_check():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_rules_pass_their_unit_tests():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(tmp_path):
    """The sample names of every family the exporter shows by default."""
    names = set(REPUBLISHED)
    exporter = PrometheusExporter(PrometheusConfig(), make_context(tmp_path))
    for metric in exporter.store.exposed:
        if metric.kind == "counter":
            names.add(f"{metric.name}_total")
        elif metric.kind == "histogram":
            names.update(f"{metric.name}_{part}" for part in ("bucket", "sum", "count"))
        else:
            names.add(metric.name)
    return names


def test_the_rules_use_only_metrics_the_exporter_produces(tmp_path):
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    expressions = " ".join(rule["expr"] for group in groups for rule in group["rules"])
    used = set(re.findall(r"(?<![:\w])llm_gateway_\w+", expressions))
    exported = exported_names(tmp_path)
    assert used and used <= exported, used - exported

