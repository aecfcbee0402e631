"""Billing import (billing/formats.py, store.py): each provider's export from its sample file
in tests/fixtures/billing/, lines stored once, and files refused whole."""

import json
import subprocess
import sys
from datetime import date

import pytest

from meterline.exporters.clickhouse.schema import Schema
from meterline.extensions.finops.billing import store
from meterline.extensions.finops.billing.formats import read_file
from meterline.extensions.finops.billing.lines import BillingError
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "billing"
D3, D4 = date(2025, 11, 3), date(2025, 11, 4)

# (day, provider, model, amount, currency) of each sample file's lines, by hand from the file
EXPECTED = {
    "openai_costs.json": ("openai", [
        (D3, "openai", "gpt-4o", 1.25, "USD"), (D3, "openai", "gpt-4o", 3.75, "USD"),
        (D3, "openai", "gpt-4o-mini", 0.1, "USD"), (D4, "openai", "gpt-4o", 2.0, "USD")]),
    "anthropic_cost_report.json": ("anthropic", [  # amounts in cents in the file
        (D3, "anthropic", "claude-sonnet-4", 4.125, "USD"),
        (D3, "anthropic", "claude-sonnet-4", 12.375, "USD"),
        (D4, "anthropic", "claude-3-5-haiku", 0.80125, "USD")]),
    "aws_cur.csv": ("aws-cur", [
        (D3, "aws.bedrock", "claude-3-5-sonnet", 4.5, "USD"),
        (D3, "aws.bedrock", "nova-lite", 0.48, "USD"),
        (D4, "aws.bedrock", "claude-3-5-haiku", 1.8, "USD")]),
    "gcp_billing.csv": ("gcp", [
        (D3, "gcp.vertex_ai", "gemini-2.5-flash", 0.9, "USD"),
        (D3, "gcp.vertex_ai", "gemini-2.5-flash", 2.5, "USD"),
        (D4, "gcp.gemini", "gemini-2.0-flash", 0.15, "USD")]),
    "azure_cost.csv": ("azure", [
        (D3, "azure.ai.openai", "gpt-4o", 3.75, "USD"),
        (D3, "azure.ai.openai", "gpt-4o", 5.0, "USD"),
        (D4, "azure.ai.openai", "gpt-4o-mini", 0.6, "USD")]),
}
EXPECTED["aws_cur.parquet"] = EXPECTED["aws_cur.csv"]
EXPECTED["gcp_billing.jsonl"] = EXPECTED["gcp_billing.csv"]


def summary(lines):
    return [(x.day, x.provider, x.model, round(x.amount, 6), x.currency) for x in lines]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_gives_the_expected_lines_from_its_sample_file(name):
    fmt, lines = read_file(FIXTURES / name)
    assert (fmt, summary(lines)) == EXPECTED[name]
    assert all(x.amount_usd == x.amount and x.source == str(FIXTURES / name) for x in lines)
    assert len({x.line_id for x in lines}) == len(lines)


def test_the_same_rows_as_csv_or_json_or_parquet_have_the_same_line_ids():
    def ids(name):
        return [x.line_id for x in read_file(FIXTURES / name)[1]]

    assert ids("gcp_billing.csv") == ids("gcp_billing.jsonl")
    assert ids("aws_cur.csv") == ids("aws_cur.parquet")


def test_a_format_named_is_checked_against_the_file():
    with pytest.raises(BillingError, match=r"openai_costs.json: JSON pages of a cost API, but "
                                           "--format aws-cur expects CSV or Parquet"):
        read_file(FIXTURES / "openai_costs.json", "aws-cur")
    fmt, lines = read_file(FIXTURES / "azure_cost.csv", "azure")
    assert (fmt, len(lines)) == ("azure", 3)


@pytest.mark.parametrize(("content", "expected"), [
    ("name,age\nann,3\n", r"bad\.csv: line 1: columns age, name\.\.\. are none of the formats; "
                          r"expected an OpenAI costs page"),
    ("just some text", r"bad\.csv: line 1: expected a CSV header naming the columns"),
    ('{"object": "page", "data": [{"start_time": 1762128000, "results": [\n'
     '{"amount": {"value": 1, "currency": "usd"}},\n'
     '{"amount": {"value": "a lot", "currency": "usd"}}]}]}',
     r"bad\.csv: data\[0\]\.results\[1\]: amount\.value: expected a number, got 'a lot'"),
    ('{"object": "page", "data": [\n  {"start_time": 1762128000, "results": [}\n]}',
     r"bad\.csv: line 2: not valid JSON \(Expecting value\)"),
    ('{"data": [{"starting_at": "yesterday", "results": []}]}',
     r"bad\.csv: data\[0\]: starting_at: expected a date or time such as 2025-11-03T00:00:00Z, "
     r"got 'yesterday'"),
    ("line_item_product_code,line_item_usage_start_date,line_item_unblended_cost,"
     "line_item_usage_type\nAmazonBedrock,2025-11-03T00:00:00Z,1.5,USE1-NovaLite-input-tokens\n"
     "AmazonBedrock,2025-11-03T00:00:00Z,,USE1-NovaLite-output-tokens\n",
     r"bad\.csv: line 3: expected line_item_unblended_cost \(a column of the aws-cur format\)"),
    ("MeterCategory,MeterName,Date,CostInBillingCurrency,BillingCurrency\n"
     "Azure OpenAI,gpt-4o-0806-Inp-glbl Tokens,11/03/2025,1.5,USD\n"
     "Azure OpenAI,gpt-4o-0806-Outp-glbl Tokens,11/03/2025,2.5\n",
     r"bad\.csv: line 3: expected 5 columns as in the header, got 4"),
    ("[" * 5000 + "]" * 5000, r"bad\.csv: nested too deeply; expected an OpenAI costs page"),
    ('{"service": {"description": "x"}, "cost": ' + '{"a": ' * 990 + "1" + "}" * 991,
     r"bad\.csv: nested too deeply; expected an OpenAI costs page"),
])
def test_a_file_of_no_format_or_malformed_is_refused_naming_the_file_the_line_and_why(
        tmp_path, content, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(BillingError, match=expected):
        read_file(path)


OPENAI = ("--format openai expects an OpenAI costs page (JSON with object 'page' and data[] "
          "of buckets)")


@pytest.mark.parametrize(("fmt", "content", "expected"), [
    ("openai", '{"object": "page", "data": [\n  {"start_time": 1762128000, "results": [}\n]}',
     f"line 2: not valid JSON (Expecting value); {OPENAI}"),
    ("openai", "just some text", f"line 1: not valid JSON (Expecting value); {OPENAI}"),
    ("azure", "just some text", "line 1: expected a CSV header naming the columns; --format "
     "azure expects an Azure cost export (CSV with MeterCategory and CostInBillingCurrency)"),
])
def test_a_bad_file_of_the_format_named_is_refused_with_that_formats_expectation_only(
        tmp_path, fmt, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BillingError) as refused:
        read_file(path, fmt)
    assert str(refused.value) == f"{path}: {expected}"


@pytest.fixture
async def client(tmp_path):
    async with clickhouse_exporters(tmp_path) as make:
        extension = finops_of(await make())
        reader = await extension.connect()  # its client (chDB: one engine a process)
        yield reader.client
        await extension.shutdown()


async def test_importing_the_same_file_twice_stores_each_line_once(client):
    schema = Schema()
    _, lines = read_file(FIXTURES / "openai_costs.json")
    store.insert(client, schema, lines)
    store.insert(client, schema, read_file(FIXTURES / "openai_costs.json")[1])
    assert store.count(client, schema) == len(lines) == 4
    [cell] = [c for c in store.cells(client, schema, D3, D4) if c["model"] == "gpt-4o"]
    assert (cell["billed_usd"], cell["lines"]) == (5.0, 2)


async def test_a_newer_export_of_the_same_day_replaces_the_amounts(client, tmp_path):
    schema = Schema()
    store.insert(client, schema, read_file(FIXTURES / "openai_costs.json")[1])
    page = json.loads((FIXTURES / "openai_costs.json").read_text())
    page["data"][1]["results"][0]["amount"]["value"] = 2.5  # the day's bill grew
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(page))
    store.insert(client, schema, read_file(newer)[1])
    assert store.count(client, schema) == 4
    [cell] = store.cells(client, schema, D4, date(2025, 11, 5))
    assert cell["billed_usd"] == 2.5


def cli_of(tmp_path):
    """`meterline ...` on a pipeline whose ClickHouse (chDB, in `tmp_path`/ch) no daemon
    has opened yet."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
receivers: {{webhook: {{listen: "127.0.0.1:0"}}}}
exporters: {{clickhouse: {{endpoint: "chdb://{tmp_path}/ch"}}}}
extensions: {{finops: {{}}}}
service:
  data_dir: {tmp_path}
  pipelines: {{p: {{receivers: [webhook], exporters: [clickhouse]}}}}
""")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "meterline", args[0], *args[1:2],
                               "-c", str(config), *args[2:]], capture_output=True, text=True,
                              timeout=120)

    return cli


def test_billing_import_refuses_a_malformed_file_and_stores_nothing(tmp_path):
    bad = tmp_path / "cur.csv"
    bad.write_text((FIXTURES / "aws_cur.csv").read_text().replace(",4.5,USD,", ",4.5x,USD,"))
    cli = cli_of(tmp_path)

    def billing(*args):
        return cli("billing", "import", *args)

    result = billing(str(bad))
    assert result.returncode == 1
    assert result.stderr == (f"meterline billing import: {bad}: line 2: "
                             "line_item_unblended_cost: expected a number, got '4.5x'\n")
    assert not (tmp_path / "ch").exists()  # nothing opened, nothing stored
    result = billing(str(FIXTURES / "aws_cur.csv"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"{FIXTURES / 'aws_cur.csv'}: aws-cur, 3 billing "
                                             "lines, 2025-11-03 to 2025-11-04 (3 stored in all)")


def test_a_bill_imported_before_any_event_is_reconciled_against_no_estimate(tmp_path):
    cli = cli_of(tmp_path)  # a fresh data directory: the import creates the tables
    assert cli("billing", "import", str(FIXTURES / "openai_costs.json")).returncode == 0
    result = cli("finops", "reconcile", "--since", "2025-11-01T00:00:00Z", "--until",
                 "2025-11-08T00:00:00Z", "--format", "json")
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)["total"]
    assert (total["estimated_cost_usd"], total["billed_cost_usd"],
            total["unexplained_usd"]) == (0, 7.1, 7.1)
