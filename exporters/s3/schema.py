"""The archive's Parquet schema: one column per event field, each with a fixed Arrow type.

The columns are derived from `Event`'s annotations, so that a field added to the event
is archived without a change here, and typed by one fixed rule, so that every file of an
archive has the same schema whatever its events hold (a column of a batch with no value
is null, never a different type). The rule:

| event field | Arrow column |
|---|---|
| `timestamp` | `timestamp[ns, tz=UTC]` (engines read it as a time, not a number) |
| str / int / float / bool | `string` / `int64` / `float64` / `bool` |
| list of str (`finish_reasons`, `tags`, `policies`) | `list<string>` |
| `metadata`, `redactions` | `map<string, string>`, `map<string, int64>` |
| `guardrails` | `list<struct<rule, stage, action, detector>>` |
| free-form (`params`, `attributes`, `input_messages`, `output_messages`) | `string` holding JSON |

Free-form values are JSON text rather than structs: their keys differ from event to
event, and a struct type would change with every batch. `schema_version` is the first
column (1 for every event of this schema).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec
import pyarrow as pa

from meterline.event import SCHEMA_VERSION, Event

_json = msgspec.json.Encoder()
_events = msgspec.inspect.type_info(Event)
assert isinstance(_events, msgspec.inspect.StructType)

_SCALARS: dict[type[msgspec.inspect.Type], pa.DataType] = {
    msgspec.inspect.StrType: pa.string(),
    msgspec.inspect.IntType: pa.int64(),
    msgspec.inspect.FloatType: pa.float64(),
    msgspec.inspect.BoolType: pa.bool_(),
}


def _unwrap(tp: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, bool]:
    """`X | None` as (X, nullable)."""
    if isinstance(tp, msgspec.inspect.UnionType):
        kept = [t for t in tp.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(kept) == 1:
            return kept[0], True
    return tp, False


def _free_form(tp: msgspec.inspect.Type) -> bool:
    """Whether a type holds values of no fixed shape (then it is stored as JSON text)."""
    if isinstance(tp, msgspec.inspect.AnyType):
        return True
    if isinstance(tp, msgspec.inspect.ListType):
        return _free_form(tp.item_type)
    if isinstance(tp, msgspec.inspect.DictType):
        return _free_form(tp.value_type)
    return False


def _arrow(tp: msgspec.inspect.Type) -> pa.DataType:
    if type(tp) in _SCALARS:
        return _SCALARS[type(tp)]
    if isinstance(tp, msgspec.inspect.ListType):
        return pa.list_(_arrow(tp.item_type))
    if isinstance(tp, msgspec.inspect.DictType):
        return pa.map_(_arrow(tp.key_type), _arrow(tp.value_type))
    if isinstance(tp, msgspec.inspect.LiteralType) and all(
            isinstance(v, str) for v in tp.values):  # (a guardrail's stage and action)
        return pa.string()
    if isinstance(tp, msgspec.inspect.StructType):
        return pa.struct([pa.field(f.name, _arrow(_unwrap(f.type)[0]), _unwrap(f.type)[1])
                          for f in tp.fields])
    raise TypeError(f"no Arrow column type for {tp}: add one to exporters/s3/schema.py")


JSON_COLUMNS: Final = frozenset(f.name for f in _events.fields if _free_form(_unwrap(f.type)[0]))
TIMESTAMP: Final = pa.timestamp("ns", tz="UTC")


def _field(f: msgspec.inspect.Field) -> pa.Field:
    tp, nullable = _unwrap(f.type)
    if f.name == "timestamp":
        return pa.field(f.name, TIMESTAMP, nullable)
    return pa.field(f.name, pa.string() if f.name in JSON_COLUMNS else _arrow(tp), nullable)


SCHEMA: Final = pa.schema(
    [pa.field("schema_version", pa.int16(), False), *map(_field, _events.fields)],
    metadata={"meterline.schema_version": str(SCHEMA_VERSION)})
# Fields whose default is a value (`sample_weight`: 1.0), in every row of their column.
# msgspec leaves a default out of the JSON form only when it is the default object itself,
# so a value equal to it is read back as absent: the event takes the default, as it had.
_DEFAULTS: Final = {f.name: f.default for f in _events.fields
                    if f.default not in (msgspec.NODEFAULT, None)}
_STRUCT_LISTS = frozenset(f.name for f in SCHEMA if pa.types.is_list(f.type)
                          and pa.types.is_struct(f.type.value_type))
_MAPS = frozenset(f.name for f in SCHEMA if pa.types.is_map(f.type))


def _to_json(values: list[Any]) -> list[Any]:
    return [None if v is None else _json.encode(v).decode() for v in values]


def _writer(name: str) -> Callable[[list[Any]], list[Any]] | None:
    if name in JSON_COLUMNS:
        return _to_json
    if name in _STRUCT_LISTS:
        return msgspec.to_builtins
    return None


_WRITERS = [(f.name, f.type, _writer(f.name)) for f in SCHEMA if f.name != "schema_version"]


def to_table(events: list[Event]) -> pa.Table:
    """Events as an Arrow table of `SCHEMA`, built column by column."""
    columns = [pa.array([SCHEMA_VERSION] * len(events), pa.int16())]
    for name, type_, prepare in _WRITERS:
        values = [getattr(e, name) for e in events]
        columns.append(pa.array(prepare(values) if prepare else values, type_))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def from_table(table: pa.Table) -> list[Event]:
    """The events of an archive's table (its columns may be a subset of `SCHEMA`'s: a file
    written before a field existed). Raises `msgspec.ValidationError` on a foreign table."""
    columns: dict[str, list[Any]] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64())
        values = column.to_pylist()
        if name in JSON_COLUMNS:
            values = [None if v is None else msgspec.json.decode(v) for v in values]
        elif name in _MAPS:
            values = [None if v is None else dict(v) for v in values]
        elif name in _DEFAULTS:
            values = [None if v == _DEFAULTS[name] else v for v in values]
        columns[name] = values
    rows = [{k: v[i] for k, v in columns.items() if v[i] is not None}
            for i in range(table.num_rows)]
    return msgspec.convert(rows, list[Event])


HOUR_NS: Final = 3600 * 10**9


def by_hour(events: list[Event]) -> dict[int, list[Event]]:
    """The events grouped by the hour of their timestamp (hours since the epoch), in order
    of first appearance."""
    hours: dict[int, list[Event]] = {}
    for event in events:
        hours.setdefault(event.timestamp // HOUR_NS, []).append(event)
    return hours


OTHERS: Final = "_others"  # ends the name of the file of a batch's hours past the bound


def partitions(events: list[Event], most: int) -> list[tuple[int, str, list[Event]]]:
    """(hour, file name suffix, events) of each group a batch is written as: its `most`
    busiest hours, each in its own partition (the later first among equals, so that every
    retry chooses alike), and one group of the events of its other hours, in the busiest
    hour's partition."""
    hours = by_hour(events)
    ranked = sorted(hours, key=lambda hour: (len(hours[hour]), hour), reverse=True)
    groups = [(hour, "", hours[hour]) for hour in ranked[:most]]
    if rest := ranked[most:]:
        groups.append((ranked[0], OTHERS, [e for hour in sorted(rest) for e in hours[hour]]))
    return groups
