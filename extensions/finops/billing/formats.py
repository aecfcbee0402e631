"""The providers' exports, read into billing lines.

- `openai`: the organization costs API's JSON pages (`object: page`, `data[]` of daily
  buckets with `results[]`): `amount.value` and `.currency`, the model from `line_item`.
- `anthropic`: the Admin API cost report's JSON pages (`data[]` with `starting_at`,
  `results[]`): the `tokens` results' `amount` (a decimal string in cents), `model`.
- `aws-cur`: AWS CUR 2.0 (CSV, gzipped or not, or Parquet): Amazon Bedrock usage lines,
  `line_item_unblended_cost`, the model from the resource's foundation model, the usage type
  or the Marketplace product.
- `gcp`: the Cloud Billing export to BigQuery (CSV or JSON rows): `regular` rows of Vertex
  AI and the Gemini API, `cost`, `currency`, the model from `sku.description`.
- `azure`: the Cost Management export (CSV): Azure OpenAI rows, `CostInBillingCurrency`
  (`Cost` in EA), `BillingCurrency`, the model from `MeterName`.

docs/finops.md#billing has the full mapping.

Anything else in an export (other services, taxes, credits, refunds, Vertex AI training)
is not a line: the reconciliation is of what the calls cost. A file is read whole before
anything is stored, and refused (`BillingError`, naming the file, the line or row, and
what was expected) when it is none of the formats or malformed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from meterline.extensions.finops.billing.lines import (
    BillingError,
    BillingLine,
    LineIds,
    model_key,
    words_to_model,
)

_SHAPES = {  # what a file of each format is, for the errors
    "openai": "an OpenAI costs page (JSON with object 'page' and data[] of buckets)",
    "anthropic": "an Anthropic cost report page (JSON with data[] of buckets with starting_at)",
    "aws-cur": "an AWS CUR 2.0 file (CSV or Parquet with line_item_product_code)",
    "gcp": "a Google Cloud billing export (CSV or JSON rows with service.description, "
           "sku.description, cost)",
    "azure": "an Azure cost export (CSV with MeterCategory and CostInBillingCurrency)",
}
FORMATS = tuple(_SHAPES)
_PAGES = ("openai", "anthropic")  # JSON pages of a cost API; the others are rows of an export


def _expected(fmt: str) -> str:
    """What the file should have been: the format named, or when detecting, any of them
    (one named with --format is the user's word: the others would only mislead)."""
    if fmt != "auto":
        return f"--format {fmt} expects {_SHAPES[fmt]}"
    *others, last = _SHAPES.values()
    return f"expected {', '.join(others)} or {last}"


Row = tuple[str, dict[str, Any]]  # (where: "line 3", "row 2", "data[0]"), fields by _key


def read_file(path: Path, fmt: str = "auto") -> tuple[str, list[BillingLine]]:
    """The format of the file and its billing lines; `BillingError` if it is none of the
    formats (or not `fmt`) or malformed."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BillingError(f"unknown format {fmt!r} (expected auto or {', '.join(FORMATS)})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BillingError(f"{path}: cannot read: {e.strerror or e}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise BillingError(f"{path}: not a valid gzip file: {e}") from None
    source = str(path)
    try:
        if data[:4] == b"PAR1":
            return parse_rows(_parquet(path, data), fmt, source)
        text = _text(data, fmt, source)
        if fmt in _PAGES or text.lstrip()[:1] in ("{", "["):  # (pages are JSON, however it looks)
            return parse_json(text, fmt, source)
        return parse_rows(_csv(text, fmt, source), fmt, source)
    except RecursionError:  # JSON (or a Parquet struct) nested deeper than any export's
        raise BillingError(f"{path}: nested too deeply; {_expected(fmt)}") from None


def _text(data: bytes, fmt: str, source: str) -> str:
    try:
        return data.decode("utf-8-sig")  # Azure exports start with a byte order mark
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BillingError(f"{source}: line {line}: not UTF-8 text; {_expected(fmt)}") \
            from None


def _key(name: str) -> str:
    """A column name as looked up: `service.description`, `service_description` and
    `Service_Description` alike; `MeterCategory` and `meterCategory` alike."""
    return re.sub(r"[./\s]", "_", name.strip()).lower()


def _flat(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested JSON fields (`{"service": {"description": ...}}`) as `service_description`."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        name = _key(f"{prefix}{k}")
        if isinstance(v, dict):
            out |= _flat(v, f"{name}_")
        else:
            out[name] = v
    return out


def _csv(text: str, fmt: str, source: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if not header or len(header) < 2:
            raise BillingError(f"{source}: line 1: expected a CSV header naming the columns; "
                               f"{_expected(fmt)}")
        names = [_key(h) for h in header]
        rows: list[Row] = []
        start = reader.line_num + 1
        for values in reader:
            if not any(v.strip() for v in values):
                start = reader.line_num + 1
                continue
            if len(values) != len(names):
                raise BillingError(f"{source}: line {start}: expected {len(names)} columns "
                                   f"as in the header, got {len(values)}")
            rows.append((f"line {start}", dict(zip(names, values, strict=True))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise BillingError(f"{source}: line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _parquet(path: Path, data: bytes) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BillingError(f"{path}: reading Parquet needs pyarrow "
                           "(pip install 'meterline[parquet]')") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises its own errors for damaged files
        raise BillingError(f"{path}: not a valid Parquet file: {e}") from None
    return [(f"row {i + 1}", _flat(r)) for i, r in enumerate(table.to_pylist())]


def parse_json(text: str, fmt: str, source: str) -> tuple[str, list[BillingLine]]:
    """A JSON document (a page, an array of pages or of rows) or JSON lines."""
    documents: list[tuple[str, Any]]
    try:
        whole = json.loads(text)
        documents = [("", whole)]
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise BillingError(f"{source}: line {e.lineno}: not valid JSON ({e.msg}); "
                               f"{_expected(fmt)}") from None
        documents = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    documents.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise BillingError(f"{source}: line {n}: not valid JSON ({err.msg}); "
                                       "expected one JSON object a line") from None
    if len(documents) == 1 and isinstance(documents[0][1], list):
        documents = [(f"item {i + 1}", d) for i, d in enumerate(documents[0][1])]
    if documents and all(isinstance(d, dict) and "data" in d for _, d in documents):
        return parse_pages(documents, fmt, source)
    rows: list[Row] = []
    for where, d in documents:
        if not isinstance(d, dict):
            raise BillingError(f"{source}: {where or 'the document'}: expected a JSON object "
                               f"(a page or an export row), got {type(d).__name__}; "
                               f"{_expected(fmt)}")
        rows.append((where or "the document", _flat(d)))
    return parse_rows(rows, fmt, source)


# --- the cost APIs' pages ---------------------------------------------------------------
def parse_pages(pages: list[tuple[str, Any]], fmt: str, source: str,
                ) -> tuple[str, list[BillingLine]]:
    """OpenAI or Anthropic cost pages (`where` names each: "line 2", "page 1")."""
    if fmt == "auto":
        fmt = _page_format(pages, source)
    if fmt not in _PAGES:
        raise BillingError(f"{source}: JSON pages of a cost API, but --format {fmt} expects "
                           f"{'CSV or Parquet' if fmt == 'aws-cur' else 'rows'} of its export")
    parse = _openai_bucket if fmt == "openai" else _anthropic_bucket
    ids = LineIds(fmt)
    lines: list[BillingLine] = []
    for where, page in pages:
        data = page.get("data")
        here = f"{where}: " if where else ""
        if not isinstance(data, list):
            raise BillingError(f"{source}: {here}expected data, a list of buckets")
        for b, bucket in enumerate(data):
            at = f"{here}data[{b}]"
            if not isinstance(bucket, dict) or not isinstance(bucket.get("results"), list):
                raise BillingError(f"{source}: {at}: expected a bucket with results[]")
            lines += parse(bucket, f"{source}: {at}", source, ids)
    return fmt, lines


def _page_format(pages: list[tuple[str, Any]], source: str) -> str:
    for _, page in pages:
        for bucket in page.get("data") or []:
            if isinstance(bucket, dict) and "start_time" in bucket:
                return "openai"
            if isinstance(bucket, dict) and "starting_at" in bucket:
                return "anthropic"
    if all(page.get("object") == "page" for _, page in pages):
        return "openai"
    raise BillingError(f"{source}: JSON with data[], but no bucket has start_time (OpenAI) or "
                       f"starting_at (Anthropic); {_expected('auto')}")


_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def _openai_bucket(bucket: dict[str, Any], at: str, source: str,
                   ids: LineIds) -> Iterator[BillingLine]:
    start = bucket.get("start_time")
    if not isinstance(start, int | float) or isinstance(start, bool):
        raise BillingError(f"{at}: expected start_time, Unix seconds")
    day = datetime.fromtimestamp(start, UTC).date()
    for r, result in enumerate(bucket["results"]):
        where = f"{at}.results[{r}]"
        amount = result.get("amount") if isinstance(result, dict) else None
        if not isinstance(amount, dict):
            raise BillingError(f"{where}: expected amount, an object with value and currency")
        value = _number(amount.get("value"), f"{where}: amount.value")
        currency = _currency(amount.get("currency", "usd"), f"{where}: amount.currency")
        line_item = _optional_text(result.get("line_item"), f"{where}: line_item")
        project = _optional_text(result.get("project_id"), f"{where}: project_id")
        head = line_item.split(",")[0].strip()
        model = model_key(head) if _MODEL_ID.match(head) and re.search(r"\d", head) else ""
        if line_item and not model:
            continue  # storage, tools: not what a model call costs
        yield BillingLine(ids(int(start), line_item, project), day, "openai", model, value,
                          currency, value if currency == "USD" else None, "openai", source,
                          line_item, project)


def _anthropic_bucket(bucket: dict[str, Any], at: str, source: str,
                      ids: LineIds) -> Iterator[BillingLine]:
    starting = _time(bucket.get("starting_at"), f"{at}: starting_at")
    for r, result in enumerate(bucket["results"]):
        where = f"{at}.results[{r}]"
        if not isinstance(result, dict):
            raise BillingError(f"{where}: expected an object with amount and currency")
        cents = _number(result.get("amount"), f"{where}: amount (a decimal string, in cents)")
        currency = _currency(result.get("currency", "USD"), f"{where}: currency")
        fields = {k: _optional_text(result.get(k), f"{where}: {k}") for k in
                  ("workspace_id", "description", "cost_type", "model", "token_type",
                   "context_window", "service_tier")}
        if fields["cost_type"] not in ("", "tokens"):
            continue  # web search, code execution, sessions: not what a model call costs
        value = cents / 100
        description = " ".join(v for v in (fields["description"], fields["cost_type"],
                                           fields["token_type"]) if v)
        yield BillingLine(ids(bucket["starting_at"], *fields.values()), starting.date(),
                          "anthropic", model_key(fields["model"]), value, currency,
                          value if currency == "USD" else None, "anthropic", source,
                          description, fields["workspace_id"])


# --- exports as rows: AWS CUR, Google Cloud, Azure -----------------------------------------
def parse_rows(rows: list[Row], fmt: str, source: str) -> tuple[str, list[BillingLine]]:
    if not rows:
        raise BillingError(f"{source}: no rows; {_expected(fmt)}")
    columns = set(rows[0][1])
    if fmt == "auto":  # (the columns: a CSV's header, line 1)
        fmt = _row_format(columns, "line 1" if rows[0][0].startswith("line") else rows[0][0],
                          source)
    if fmt in _PAGES:
        raise BillingError(f"{source}: {rows[0][0]}: rows of an export, but --format {fmt} "
                           "expects the JSON pages of its cost API")
    parse = _ROWS[fmt]
    ids = LineIds(fmt)
    return fmt, [line for where, row in rows
                 if (line := parse(_Fields(row, f"{source}: {where}", fmt), source, ids))]


def _row_format(columns: set[str], where: str, source: str) -> str:
    if "line_item_product_code" in columns:
        return "aws-cur"
    if {"service_description", "sku_description", "cost"} <= columns:
        return "gcp"
    if columns & {"metercategory", "servicename"} and columns & {
            "costinbillingcurrency", "cost", "pretaxcost"}:
        return "azure"
    shown = ", ".join(sorted(columns)[:8])
    raise BillingError(f"{source}: {where}: columns {shown}... are none of the formats; "
                       f"{_expected('auto')}")


class _Fields:
    """A row's fields, by `_key`, with errors naming the row and the column expected."""

    def __init__(self, row: dict[str, Any], where: str, fmt: str) -> None:
        self.row, self.where, self.fmt = row, where, fmt

    def text(self, *names: str, required: bool = False) -> str:
        for name in names:
            value = self.row.get(name)
            if value is not None and str(value).strip() != "":
                return str(value).strip()
        if required:
            raise BillingError(f"{self.where}: expected {' or '.join(names)} "
                               f"(a column of the {self.fmt} format)")
        return ""

    def number(self, *names: str) -> float:
        return _number(self.text(*names, required=True), f"{self.where}: {names[0]}")

    def time(self, *names: str) -> datetime:
        value = next((self.row[n] for n in names if self.row.get(n) not in (None, "")), None)
        if isinstance(value, datetime):  # Parquet timestamps
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        return _time(self.text(*names, required=True), f"{self.where}: {names[0]}")


_AWS_KEPT_TYPES = {"", "usage", "discountedusage", "savingsplancoveredusage"}
_AWS_REGION = re.compile(r"^[A-Z]{2,4}\d?-")
_AWS_UNIT = re.compile(r"-(?:input|output|cache[\w-]*?)-?(?:tokens?|token-count|units)\b.*$",
                       re.IGNORECASE)


def _aws(f: _Fields, source: str, ids: LineIds) -> BillingLine | None:
    product = f.text("line_item_product_code", required=True)
    name = f.text("product_product_name", "product_servicename")
    if product != "AmazonBedrock" and "bedrock" not in name.lower():
        return None
    if f.text("line_item_line_item_type").lower() not in _AWS_KEPT_TYPES:
        return None  # Tax, Credit, Refund, fees: not what the calls cost
    start = f.time("line_item_usage_start_date")
    cost = f.number("line_item_unblended_cost")
    currency = _currency(f.text("line_item_currency_code") or "USD",
                         f"{f.where}: line_item_currency_code")
    usage_type = f.text("line_item_usage_type", required=True)
    resource = f.text("line_item_resource_id")
    if m := re.search(r"(?:foundation-model|inference-profile)/([^/]+)$", resource):
        model = model_key(m.group(1))
    elif ":" not in usage_type and (base := _AWS_UNIT.sub("", _AWS_REGION.sub("", usage_type))):
        model = words_to_model(base)
    else:  # a Marketplace model: "Claude 3.5 Sonnet (Amazon Bedrock Edition)"
        model = words_to_model(name.split("(")[0]) if "(" in name else ""
    line_id = (ids(f.text("identity_line_item_id"), f.text("identity_time_interval"))
               if f.text("identity_line_item_id") else
               ids(start.isoformat(), usage_type, resource, f.text("line_item_operation"),
                   f.text("line_item_usage_account_id")))
    return BillingLine(line_id, start.date(), "aws.bedrock", model, cost, currency,
                       cost if currency == "USD" else None, "aws-cur", source, usage_type,
                       f.text("line_item_usage_account_id"),
                       f.text("product_region_code", "product_region"))


_GCP_SERVICES = {"vertex ai": "gcp.vertex_ai", "gemini api": "gcp.gemini",
                 "generative language api": "gcp.gemini"}
_GCP_MODEL_FAMILIES = re.compile(r"^(?:gemini|gemma|claude|llama|mistral|codestral|imagen|veo|"
                                 r"text-embedding|text-multilingual|jamba|deepseek|qwen)")
_SKU_STOP = re.compile(r"\s(?:-\s|input|output|text|image|video|audio|tokens?|characters|"
                       r"predictions?|cached|caching|long|short|batch|grounding|thinking)\b",
                       re.IGNORECASE)


def _gcp(f: _Fields, source: str, ids: LineIds) -> BillingLine | None:
    service = f.text("service_description", required=True)
    provider = _GCP_SERVICES.get(service.lower())
    if provider is None:
        return None
    if f.text("cost_type").lower() not in ("", "regular"):
        return None  # tax, adjustment, rounding error
    sku = f.text("sku_description", required=True)
    start = f.time("usage_start_time")
    cost = f.number("cost")
    currency = _currency(f.text("currency", required=True), f"{f.where}: currency")
    model = words_to_model(_SKU_STOP.split(f" {sku}", maxsplit=1)[0])
    if provider == "gcp.vertex_ai" and not _GCP_MODEL_FAMILIES.match(model):
        return None  # training, endpoints, other Vertex AI services: no model call
    if not _GCP_MODEL_FAMILIES.match(model):
        model = ""
    usd: float | None = cost if currency == "USD" else None
    if usd is None and (rate := f.text("currency_conversion_rate")):
        usd = cost / _number(rate, f"{f.where}: currency_conversion_rate")
    project = f.text("project_id")
    end = f.time("usage_end_time").isoformat() if f.text("usage_end_time") else ""
    return BillingLine(ids(start.isoformat(), end, project, service, sku,
                           f.text("sku_id"), f.text("location_region", "location_location")),
                       start.date(), provider, model, cost, currency, usd, "gcp", source, sku,
                       project, f.text("location_region", "location_location"))


_AZURE_CATEGORIES = {"azure openai", "azure openai service", "cognitive services",
                     "foundry models", "azure ai foundry models"}
_AZURE_METER_STOP = re.compile(r"[-\s](?:inp|input|out|outp|output|opt|cached|cchd|cache|"
                               r"tokens?|glbl|global|gl|regional|rgnl|dzone|data|batch|ft|"
                               r"training|hosting|fine)\b", re.IGNORECASE)


def _azure(f: _Fields, source: str, ids: LineIds) -> BillingLine | None:
    category = f.text("metercategory", "servicename", required=True)
    about = " ".join([category, f.text("metersubcategory"), f.text("productname"),
                      f.text("servicename")]).lower()
    if category.lower() not in _AZURE_CATEGORIES or "openai" not in about.replace(" ", ""):
        return None
    day = f.time("date", "usagedate", "billingperiodstartdate").date()
    cost = f.number("costinbillingcurrency", "cost", "pretaxcost")
    currency = _currency(f.text("billingcurrency", "billingcurrencycode", "currency") or "USD",
                         f"{f.where}: BillingCurrency")
    meter = f.text("metername", "productname", required=True)
    model = words_to_model(_AZURE_METER_STOP.split(meter, maxsplit=1)[0])
    if not re.search(r"\d|^(?:o\d|gpt|davinci|babbage|dall|whisper|tts|ada)", model):
        model = ""
    usd: float | None = cost if currency == "USD" else None
    if usd is None and (in_usd := f.text("costinusd")):
        usd = _number(in_usd, f"{f.where}: CostInUsd")
    subscription = f.text("subscriptionid", "subscriptionguid")
    return BillingLine(ids(day.isoformat(), subscription, f.text("resourceid", "instanceid",
                                                                  "instancename"),
                           f.text("meterid"), meter, f.text("chargetype"),
                           f.text("pricingmodel")),
                       day, "azure.ai.openai", model, cost, currency, usd, "azure", source,
                       meter, subscription, f.text("resourcelocation", "location"))


_ROWS: dict[str, Callable[[_Fields, str, LineIds], BillingLine | None]] = {
    "aws-cur": _aws, "gcp": _gcp, "azure": _azure}


# --- values ------------------------------------------------------------------------------
def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise BillingError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        raise BillingError(f"{what}: expected a number, got {value!r}") from None


def _currency(value: Any, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]{3}", value.strip()):
        raise BillingError(f"{what}: expected a currency code such as USD, got {value!r}")
    return value.strip().upper()


def _optional_text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BillingError(f"{what}: expected a string or null, got {value!r}")
    return value


_US_DATE = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")


def _time(value: Any, what: str) -> datetime:
    """ISO 8601 (`Z`, an offset, or BigQuery's ` UTC`; UTC when it says nothing), or a
    US date (Azure's `11/03/2025`)."""
    if isinstance(value, str):
        text = value.strip()
        if m := _US_DATE.match(text):
            try:
                return datetime(int(m.group(3)), int(m.group(1)), int(m.group(2)), tzinfo=UTC)
            except ValueError:
                pass
        else:
            text = re.sub(r"\s*UTC$", "+00:00", text).replace("Z", "+00:00")
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                pass
            else:
                return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None \
                    else parsed.astimezone(UTC)
    raise BillingError(f"{what}: expected a date or time such as 2025-11-03T00:00:00Z, "
                       f"got {value!r}")


def lines_of_pages(pages: Iterable[dict[str, Any]], fmt: str,
                   source: str) -> list[BillingLine]:
    """The lines of pages fetched from a cost API (`pull.py`)."""
    return parse_pages([(f"page {i + 1}", p) for i, p in enumerate(pages)], fmt, source)[1]
