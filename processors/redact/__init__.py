"""Processor `redact`: PII and secrets out of the content before it is stored.

Every string inside `input_messages` and `output_messages` (message text, content
parts, tool-call arguments) and inside the `fields` the config lists is scanned by
the detectors (see `detectors.py`), each with its action:

- `mask`: replaced by a typed placeholder, `<EMAIL>`;
- `hash`: replaced by `<EMAIL:3f9a0c1d2b4e5f67>`, a keyed HMAC-SHA256 of the value,
  so the same value gives the same token across events (and daemons sharing
  `hash_key`) while the value itself cannot be read back;
- `drop`: the whole field that held it is removed from the event;
- `drop_event`: the event is not kept;
- `off`: the detector does not run.

`redactions` on the event counts findings by detector. What was found is never
logged; the self-telemetry counts findings by detector and dropped events.
Strings that are data URIs (`data:image/png;base64,...`) are not scanned.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from processors.fieldpath import FieldPath
from processors.redact.detectors import BUILTIN, NAMES, Detector, DetectorSet

Action = Literal["mask", "hash", "drop", "drop_event", "off"]
ACTIONS: tuple[Action, ...] = ("mask", "hash", "drop", "drop_event", "off")
_SKIPPED_KEYS = frozenset({"role", "type", "id", "tool_call_id", "finish_reason"})


def _check_action(action: str, where: str) -> None:
    """Literal types would say only "Invalid enum value": name the choices."""
    if action not in ACTIONS:
        raise ValueError(f"{where}: unknown action '{action}' (expected {', '.join(ACTIONS)})")


class CustomDetector(Config):
    name: str
    pattern: str
    action: str = "mask"

    def __post_init__(self) -> None:
        _check_action(self.action, f"custom detector {self.name}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"detector name '{self.name}' must be lower_snake_case")
        if self.name in NAMES:
            raise ValueError(f"'{self.name}' is a built-in detector; choose another name")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"invalid regular expression {self.pattern!r}: {e}") from e


class RedactConfig(Config):
    # action per built-in detector; YAML reads a bare `off` as false, so false is off too
    detectors: dict[str, str | bool] = msgspec.field(default_factory=dict)
    default_action: str = "mask"  # for built-in detectors not listed in `detectors`
    custom: list[CustomDetector] = msgspec.field(default_factory=list)
    fields: list[FieldPath] = msgspec.field(default_factory=list)  # besides the messages
    hash_key: str | None = None  # HMAC key of `hash`; default: one kept in the data dir

    def __post_init__(self) -> None:
        _check_action(self.default_action, "default_action")
        self.detectors = {name: ("off" if action is False else self.default_action
                                 if action is True else action)
                          for name, action in self.detectors.items()}
        for name, action in self.detectors.items():
            _check_action(str(action), f"detector {name}")
        unknown = set(self.detectors) - set(NAMES)
        if unknown:
            raise ValueError(f"unknown detector {', '.join(sorted(unknown))} "
                             f"(built-in: {', '.join(NAMES)})")
        names = [c.name for c in self.custom]
        if len(set(names)) != len(names):
            raise ValueError("custom detector names must be unique")
        if self.hash_key is not None and len(self.hash_key) < 16:
            raise ValueError("hash_key must be at least 16 characters")

    def active(self) -> list[tuple[Detector, str]]:
        """The detectors that run, most specific first: custom ones, then built-ins."""
        chosen: list[tuple[Detector, str]] = [
            (Detector(c.name, (re.compile(c.pattern),)), c.action) for c in self.custom]
        chosen += [(d, str(self.detectors.get(d.name, self.default_action))) for d in BUILTIN]
        return [(d, a) for d, a in chosen if a != "off"]


class _DropField(Exception):
    """A `drop` finding: abandon the field being scanned."""


class _DropEvent(Exception):
    """A `drop_event` finding: abandon the event."""


Slot = tuple[Any, Any, str]  # (container, key, string): where a string sits in a value


def _strings(value: Any, slots: list[Slot], container: Any = None, key: Any = None) -> None:
    """Every string inside `value`, with where it sits (dicts and lists are walked)."""
    if isinstance(value, str):
        if not value.startswith("data:"):  # inline images and files: base64, not text
            slots.append((container, key, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _SKIPPED_KEYS:
                _strings(v, slots, value, k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _strings(v, slots, value, i)


class Redactor:
    """Finds and replaces in a field's strings, tallying findings by detector."""

    def __init__(self, detectors: list[tuple[Detector, str]], hash_key: bytes) -> None:
        self.detectors = DetectorSet([d for d, _ in detectors])
        self.actions = [a for _, a in detectors]
        self.names = [d.name for d, _ in detectors]
        self.placeholders = [d.placeholder for d, _ in detectors]
        self.hash_key = hash_key

    def redact_value(self, value: Any, counts: dict[str, int]) -> Any:
        """`value` with its strings redacted (in place inside dicts and lists). Which
        detectors can match is settled once for all of them together."""
        slots: list[Slot] = []
        _strings(value, slots)
        if not slots:
            return value
        whole = slots[0][2] if len(slots) == 1 else "\n".join(s for _, _, s in slots)
        candidates = self.detectors.candidates(whole)
        if not candidates:
            return value
        for container, key, text in slots:
            new = self.redact(text, candidates, counts)
            if new is not text:
                if container is None:
                    return new
                container[key] = new
        return value

    def redact(self, text: str, candidates: list[int], counts: dict[str, int]) -> str:
        findings = self.detectors.find(text, candidates)
        if not findings:
            return text
        parts = []
        last = 0
        for start, end, index in findings:
            name = self.names[index]
            counts[name] = counts.get(name, 0) + 1
            action = self.actions[index]
            if action == "drop_event":
                raise _DropEvent
            if action == "drop":
                raise _DropField
            parts.append(text[last:start])
            if action == "hash":
                digest = hmac.new(self.hash_key, text[start:end].encode(), hashlib.sha256)
                parts.append(f"<{name.upper()}:{digest.hexdigest()[:16]}>")
            else:
                parts.append(self.placeholders[index])
            last = end
        parts.append(text[last:])
        return "".join(parts)


_MESSAGES = (FieldPath("input_messages"), FieldPath("output_messages"))


class RedactProcessor(Processor):
    def __init__(self, config: RedactConfig, context: Context) -> None:
        active = config.active()
        needs_key = any(action == "hash" for _, action in active)
        key = (config.hash_key.encode() if config.hash_key is not None
               else _stored_key(context) if needs_key else b"")
        self.redactor = Redactor(active, key)
        self.fields = [*_MESSAGES, *config.fields]
        self.id = context.id
        meter = context.meter
        self._redactions = meter.create_counter(
            "meterline_redact_redactions", description="PII and secrets found, by detector")
        self._dropped = meter.create_counter(
            "meterline_redact_dropped_events",
            description="Events dropped by a drop_event detector")

    def process(self, events: list[Event]) -> list[Event]:
        if not self.redactor.names:
            return events
        redact = self.redactor.redact_value
        totals: dict[str, int] = {}
        kept: list[Event] = []
        dropped = 0
        for e in events:
            counts: dict[str, int] = {}
            try:
                for path in self.fields:
                    value = path.get(e)
                    if value is None:
                        continue
                    try:
                        new = redact(value, counts)
                    except _DropField:
                        path.delete(e)
                        continue
                    if new is not value:
                        path.set(e, new)
            except _DropEvent:
                dropped += 1
                for name, n in counts.items():
                    totals[name] = totals.get(name, 0) + n
                continue
            if counts:
                if e.redactions:
                    for name, n in counts.items():
                        e.redactions[name] = e.redactions.get(name, 0) + n
                else:
                    e.redactions = counts
                for name, n in counts.items():
                    totals[name] = totals.get(name, 0) + n
            kept.append(e)
        for name, n in totals.items():
            self._redactions.add(n, {"processor": self.id, "detector": name})
        if dropped:
            self._dropped.add(dropped, {"processor": self.id})
        return kept


def _stored_key(context: Context) -> bytes:
    """The HMAC key kept under the data directory, created on first use, so that hashes
    stay the same across restarts without a key in pipeline.yaml."""
    path = Path(f"{context.state_path('redact')}.key")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


factory = Factory(kind="processor", type="redact", config=RedactConfig, create=RedactProcessor)
