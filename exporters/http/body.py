"""A batch as the body of one request: NDJSON, a JSON array, or `_bulk` lines.

The documents are the events' JSON forms, or what the exporter's `projection` makes of
them (`meterline/projection.py`). A `_bulk` body pairs each document with its action
line, `{"index": {"_index": ..., "_id": <event_id>}}`: the event id as `_id` makes a
retried batch overwrite what an earlier attempt stored instead of storing it twice.
"""

from __future__ import annotations

from typing import Any

import msgspec

from meterline.event import Event
from meterline.exporters.http.config import Format
from meterline.projection import Projection, documents, jsonl

_encoder = msgspec.json.Encoder()

CONTENT_TYPES: dict[Format, str] = {
    "ndjson": "application/x-ndjson", "array": "application/json",
    "bulk": "application/x-ndjson"}


def encode(events: list[Event], projection: Projection | None, format_: Format,
           index: str, action: str) -> bytes:
    """The request body of a batch."""
    if format_ == "ndjson":
        return jsonl(events, projection)
    docs = documents(events, projection)
    if format_ == "array":
        return _encoder.encode(docs)
    lines: list[Any] = []
    for event, doc in zip(events, docs, strict=True):
        lines.append({action: {"_index": index, "_id": event.event_id}})
        lines.append(doc)
    return _encoder.encode_lines(lines)
