"""Content policies: what of prompts and answers an exporter receives (`content:`).

The content of a call is its `input_messages` (the prompt, system instructions included)
and `output_messages` (the answer, tool calls and their arguments included); no other
field holds it (a tool call's arguments and result are counted in `request_bytes` and
`response_bytes`, never kept). An exporter's policy:

- `full`: the events as they are (the default; it costs nothing);
- `metadata`: both lists removed, and for each one present, its size and hash put in
  `attributes`: `<field>_count` (messages), `<field>_bytes` (bytes of its compact JSON
  form) and `<field>_sha256` (hex sha256 of the same bytes), e.g.
  `input_messages_sha256`. Equal prompts hash equal, so repeats can be counted and a
  prompt in the archive can be matched, without the stream holding it;
- `none`: both lists removed.

The runner applies it when it selects the exporter's events, before its queue: an
exporter with `content: none` never holds a prompt, on disk (queue, dead letters) or
downstream. Events are shared by the exporters of a pipeline, so a changed event is a
copy; an event without content is passed on as it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from meterline.event import Event

Policy = Literal["full", "metadata", "none"]
CONTENT_FIELDS = ("input_messages", "output_messages")
_encode = msgspec.json.encode


def _dropped(event: Event) -> Event:
    return msgspec.structs.replace(event, input_messages=None, output_messages=None)


def _summarised(event: Event) -> Event:
    attributes: dict[str, Any] = dict(event.attributes or {})
    for name in CONTENT_FIELDS:
        messages = getattr(event, name)
        if messages is not None:
            data = _encode(messages)
            attributes[f"{name}_count"] = len(messages)
            attributes[f"{name}_bytes"] = len(data)
            attributes[f"{name}_sha256"] = hashlib.sha256(data).hexdigest()
    return msgspec.structs.replace(event, input_messages=None, output_messages=None,
                                   attributes=attributes)


def enforcer(policy: Policy) -> Callable[[list[Event]], list[Event]] | None:
    """The function applying `policy` to a batch; None for `full` (nothing to do)."""
    if policy == "full":
        return None
    change = _summarised if policy == "metadata" else _dropped

    def enforce(events: list[Event]) -> list[Event]:
        return [change(e) if e.input_messages is not None or e.output_messages is not None
                else e for e in events]
    return enforce
