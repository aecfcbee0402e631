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

A batch is scanned at once: the strings of all its events go through one pass of
all the detectors (`engine.py`), and only the events with findings are visited again
(`redactor.py`).
"""

from __future__ import annotations

import os
import re
import secrets
from bisect import bisect_right
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from processors.fieldpath import FieldPath
from processors.redact.detectors import BUILTIN, NAMES, Detector
from processors.redact.engine import Span
from processors.redact.redactor import DropEvent, DropField, Redactor, Strings

Action = Literal["mask", "hash", "drop", "drop_event", "off"]
ACTIONS: tuple[Action, ...] = ("mask", "hash", "drop", "drop_event", "off")


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


_MESSAGES = (FieldPath("input_messages"), FieldPath("output_messages"))


class RedactProcessor(Processor):
    """A batch at a time (see the module's docstring)."""

    def __init__(self, config: RedactConfig, context: Context) -> None:
        active = config.active()
        needs_key = any(action == "hash" for _, action in active)
        key = (config.hash_key.encode() if config.hash_key is not None
               else _stored_key(context) if needs_key else b"")
        self.redactor = Redactor(active, key)
        self.fields = [*_MESSAGES, *config.fields]
        self._getters = [attrgetter(p.key) if p.kind == "field" else p.get for p in self.fields]
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
        # by event, then field: its value and where its strings begin in `strings`
        values: list[Any] = []
        starts: list[int] = []
        strings = Strings()
        for e in events:
            for get in self._getters:
                value = get(e)
                values.append(value)
                starts.append(len(strings.texts))
                if value is not None:
                    strings.add(value)
        starts.append(len(strings.texts))
        found = self.redactor.detectors.find_all(strings.texts)
        if not found:
            return events
        width = len(self.fields)
        hit = {(bisect_right(starts, i) - 1) // width for i in found}
        totals: dict[str, int] = {}
        kept: list[Event] = []
        dropped = 0
        for i, e in enumerate(events):
            if i not in hit:
                kept.append(e)
                continue
            counts: dict[str, int] = {}
            try:
                self._redact_event(e, i * width, values, starts, strings, found, counts)
            except DropEvent:
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

    def _redact_event(self, e: Event, first: int, values: list[Any], starts: list[int],
                      strings: Strings, found: dict[int, list[Span]],
                      counts: dict[str, int]) -> None:
        """The fields of `e` (`values[first:]`) in order, as if each were scanned only
        when reached: one that an earlier field changed (a path listed twice, or inside
        another) is scanned again."""
        redactor = self.redactor
        for k, path in enumerate(self.fields):
            value = values[first + k]
            indexes = range(starts[first + k], starts[first + k + 1])
            current = self._getters[k](e)
            if current is None:
                continue
            try:
                if current is value and strings.unchanged(indexes, found):
                    new = redactor.replace_value(value, strings, indexes, found, counts)
                else:
                    new = redactor.redact_value(current, counts)
            except DropField:
                path.delete(e)
                continue
            if new is not current:
                path.set(e, new)


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
