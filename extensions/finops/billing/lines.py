"""A billing line, the error that refuses a file, and the names lines are given.

A line is one amount a provider billed for one UTC day: its provider (as events name it,
`genai.provider_name`), the model it names (in the form reconciliation matches events by:
`model_key`), the amount and its currency (and in USD, when the export gives it), where it
came from, and an id made of the fields that identify it in its export (never the amount),
so that importing a file again, or a newer export of the same days, stores each line once.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date

from meterline.processors.cost.prices import name_forms


class BillingError(ValueError):
    """A file that is none of the formats, or malformed: nothing of it is imported."""


@dataclass(frozen=True)
class BillingLine:
    line_id: str
    day: date  # UTC
    provider: str
    model: str  # '' when the line names no model
    amount: float
    currency: str  # upper case ISO 4217
    amount_usd: float | None  # the amount in USD: amount itself for USD, else when given
    format: str  # openai, anthropic, aws-cur, gcp, azure
    source: str  # the file (or the API) it came from
    description: str = ""  # the export's own wording: line item, usage type, SKU, meter
    account: str = ""  # project, workspace, account or subscription
    region: str = ""


@dataclass
class LineIds:
    """Ids for the lines of one import: a hash of a format's identifying fields, and which
    occurrence of them it is (two lines of a file can share every identifying field)."""

    format: str
    seen: Counter[str] = field(default_factory=Counter)

    def __call__(self, *fields: object) -> str:
        digest = hashlib.sha256("\x1f".join([self.format, *map(str, fields)]).encode())
        key = digest.hexdigest()[:24]
        self.seen[key] += 1
        return f"{key}-{self.seen[key]}"


def model_key(model: str | None) -> str:
    """The model name lines and events are matched by: its base form without provider
    prefix, Bedrock region, vendor and version, or snapshot date (`gpt-4o-2024-08-06`,
    `anthropic.claude-3-5-sonnet-20240620-v1:0` and `claude-3-5-sonnet-latest` are
    `gpt-4o` and `claude-3-5-sonnet`)."""
    if not model or not model.strip():
        return ""
    return name_forms(model)[-1][0]


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z0-9])|(?<=[0-9])(?=[A-Za-z])")


def words_to_model(text: str) -> str:
    """A model name from billing wording: `Claude3.5Sonnet`, `Gemini 2.5 Flash`,
    `gpt 4o 0513` are `claude-3-5-sonnet`, `gemini-2.5-flash`, `gpt-4o`."""
    text = text.strip()
    if not re.search(r"[\s_-]", text):  # one CamelCase word: Claude3.5Sonnet
        text = _CAMEL.sub(" ", text)
    name = "-".join(w for w in re.split(r"[\s_-]+", text.lower()) if w)
    name = re.sub(r"(?<=\d)-(?=o\b|o-)", "", name)  # gpt-4-o -> gpt-4o
    if name.startswith("claude"):
        name = name.replace(".", "-")  # Anthropic writes claude-3-5-sonnet
    return model_key(name)
