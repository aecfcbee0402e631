"""Processor `labels`: attribution and business context on every event.

In order, on each event: the source's metadata is cut to `metadata_allowlist`
(when one is given); the API-key table fills `api_key_name`, `team`,
`organization` and metadata from `api_key_id`; `static` labels are written into
metadata; `actions` run (set, copy, rename, delete on fields, `metadata.KEY` and
`attributes.KEY`); finally metadata values are cut to `max_value_length`
characters, the schema's bound for a label.

The key table (inline `keys`, and/or a YAML or CSV `file`) is re-read when the
file changes, checked at most every `check_interval`; a file that no longer
parses is logged and the last good table kept.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from meterline.fieldpath import FieldPath
from meterline.units import Duration


class KeyInfo(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What the table knows about one API key."""

    name: str | None = None  # written into api_key_name
    team: str | None = None  # written into team
    organization: str | None = None  # written into organization
    metadata: dict[str, str] = msgspec.field(default_factory=dict)  # merged into metadata


_KEY_COLUMNS = ("api_key_id", "name", "team", "organization")


def read_key_file(path: str) -> dict[str, KeyInfo]:
    """A key table file: YAML (`{api_key_id: {name, team, organization, metadata}}`)
    or CSV (`api_key_id,name,team,organization` and any more columns as metadata)."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read API-key file {path}: {e.strerror}") from e
    try:
        if path.endswith(".csv"):
            return _keys_from_csv(raw)
        return msgspec.yaml.decode(raw.encode(), type=dict[str, KeyInfo]) if raw.strip() else {}
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise ValueError(f"API-key file {path}: {e}") from e


def _keys_from_csv(raw: str) -> dict[str, KeyInfo]:
    rows = csv.DictReader(io.StringIO(raw))
    if rows.fieldnames is None or "api_key_id" not in rows.fieldnames:
        raise ValueError("expected a header row with an api_key_id column")
    table = {}
    for line, row in enumerate(rows, start=2):
        key_id = (row.get("api_key_id") or "").strip()
        if not key_id:
            raise ValueError(f"line {line}: empty api_key_id")
        table[key_id] = KeyInfo(
            name=row.get("name") or None, team=row.get("team") or None,
            organization=row.get("organization") or None,
            metadata={k: v for k, v in row.items()
                      if k not in _KEY_COLUMNS and k is not None and v})
    return table


class ApiKeysConfig(Config):
    keys: dict[str, KeyInfo] = msgspec.field(default_factory=dict)  # by api_key_id
    file: str | None = None  # entries here win over `keys`
    check_interval: Duration = Duration(5)  # how often `file` is checked for changes

    def __post_init__(self) -> None:
        if self.file is not None:
            read_key_file(self.file)  # so that `meterline validate` reports a bad file


class Action(Config):
    """One of `{set: PATH, value: V}`, `{copy: PATH, to: PATH}`,
    `{rename: PATH, to: PATH}`, `{delete: PATH}`."""

    set: FieldPath | None = None  # the path to write `value` to
    copy: FieldPath | None = None  # the path whose value is copied `to`
    rename: FieldPath | None = None  # the path whose value moves `to` (and is removed)
    delete: FieldPath | None = None  # the path removed
    value: str | None = None  # what `set` writes
    to: FieldPath | None = None  # where `copy` and `rename` write

    def __post_init__(self) -> None:
        verbs = [v for v in ("set", "copy", "rename", "delete") if getattr(self, v) is not None]
        if len(verbs) != 1:
            raise ValueError("an action has exactly one of set, copy, rename, delete")
        verb = verbs[0]
        if verb == "set":
            if self.value is None or self.to is not None:
                raise ValueError("set takes a value (and no `to`)")
            target = self.set
        elif verb == "delete":
            if self.value is not None or self.to is not None:
                raise ValueError("delete takes neither value nor `to`")
            target = self.delete
        else:
            if self.to is None or self.value is not None:
                raise ValueError(f"{verb} takes `to` (and no value)")
            target = self.to
        assert target is not None
        if verb != "delete" and not target.holds_string:
            raise ValueError(f"'{target.text}' is not a string field: labels go to metadata.KEY, "
                             "attributes.KEY or a string field such as team")
        emptied = self.rename if verb == "rename" else self.delete
        if emptied is not None and not emptied.deletable:
            raise ValueError(f"'{emptied.text}' cannot be removed from an event")

    def compile(self) -> Callable[[Event], None]:
        if self.set is not None:
            target, value = self.set, self.value
            return lambda e: target.set(e, value)
        if self.delete is not None:
            return self.delete.delete
        source = self.copy or self.rename
        assert source is not None and self.to is not None
        to, remove = self.to, self.rename is not None

        def move(e: Event) -> None:
            value = source.get(e)
            if value is None:
                return
            to.set(e, value if to.kind == "attributes" or isinstance(value, str) else str(value))
            if remove:
                source.delete(e)

        return move


class LabelsConfig(Config):
    static: dict[str, str] = msgspec.field(default_factory=dict)  # metadata on every event
    actions: list[Action] = msgspec.field(default_factory=list)  # run in order
    api_keys: ApiKeysConfig | None = None  # a table of API keys: name, team, metadata
    metadata_allowlist: list[str] | None = None  # keys kept from the source; None keeps all
    max_value_length: int = 128  # metadata values are cut to this many characters

    def __post_init__(self) -> None:
        if self.max_value_length < 1:
            raise ValueError("max_value_length must be at least 1")


class KeyTable:
    """The API-key table, re-read when its file changes."""

    def __init__(self, config: ApiKeysConfig, context: Context) -> None:
        self.config = config
        self.log = context.log
        self.entries = dict(config.keys)
        self._stamp: tuple[float, int] | None = None
        self._next_check = 0.0
        self.refresh(time.monotonic())

    def refresh(self, now: float) -> None:
        path = self.config.file
        if path is None or now < self._next_check:
            return
        self._next_check = now + float(self.config.check_interval)
        try:
            st = os.stat(path)
        except OSError as e:
            stamp: tuple[float, int] = (0.0, -1)
            if stamp != self._stamp:
                self.log.error("cannot read the API-key file; keeping the last table",
                               file=path, error=e.strerror)
            self._stamp = stamp
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            loaded = read_key_file(path)
        except ValueError as e:
            self.log.error("API-key file is invalid; keeping the last table", error=str(e))
            return
        self.entries = {**self.config.keys, **loaded}
        self.log.info("API-key table loaded", file=path, keys=len(self.entries))


class LabelsProcessor(Processor):
    def __init__(self, config: LabelsConfig, context: Context) -> None:
        self.static = config.static
        self.actions = [a.compile() for a in config.actions]
        self.allowlist = (frozenset(config.metadata_allowlist)
                          if config.metadata_allowlist is not None else None)
        self.max_length = config.max_value_length
        self.keys = KeyTable(config.api_keys, context) if config.api_keys else None
        self.id = context.id
        meter = context.meter
        self._unknown_keys = meter.create_counter(
            "meterline_labels_unknown_api_key_events",
            description="Events whose api_key_id the API-key table does not know")
        self._trimmed = meter.create_counter(
            "meterline_labels_trimmed_values",
            description="Metadata values cut to max_value_length, or keys left out by "
                        "metadata_allowlist")

    def process(self, events: list[Event]) -> list[Event]:
        unknown = trimmed = 0
        keys = None
        if self.keys is not None:
            self.keys.refresh(time.monotonic())
            keys = self.keys.entries
        allowlist, static, actions = self.allowlist, self.static, self.actions
        limit = self.max_length
        for e in events:
            md = e.metadata
            if allowlist is not None and md:
                kept = {k: v for k, v in md.items() if k in allowlist}
                trimmed += len(md) - len(kept)
                e.metadata = md = kept
            if keys is not None and e.api_key_id is not None:
                info = keys.get(e.api_key_id)
                if info is None:
                    unknown += 1
                else:
                    md = self._apply_key(e, info, md)
            if static:
                if md is None:
                    e.metadata = md = dict(static)
                else:
                    md.update(static)
            for action in actions:
                action(e)
            md = e.metadata
            if md:
                for k, v in md.items():
                    if len(v) > limit:
                        md[k] = v[:limit]
                        trimmed += 1
        if unknown:
            self._unknown_keys.add(unknown, {"processor": self.id})
        if trimmed:
            self._trimmed.add(trimmed, {"processor": self.id})
        return events

    @staticmethod
    def _apply_key(e: Event, info: KeyInfo, md: dict[str, str] | None) -> dict[str, str] | None:
        if info.name is not None:
            e.api_key_name = info.name
        if info.team is not None:
            e.team = info.team
        if info.organization is not None:
            e.organization = info.organization
        if info.metadata:
            if md is None:
                e.metadata = md = dict(info.metadata)
            else:
                md.update(info.metadata)
        return md


factory = Factory(kind="processor", type="labels", config=LabelsConfig, create=LabelsProcessor)
