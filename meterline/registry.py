"""Finds component factories (and commands, the demo) through entry points, so the core names
none of them."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from meterline.component import Factory, Kind

_GROUPS: dict[Kind, str] = {
    "receiver": "meterline.receivers",
    "processor": "meterline.processors",
    "exporter": "meterline.exporters",
    "extension": "meterline.extensions",
}


@cache
def available(kind: Kind) -> dict[str, str]:
    """Type name -> entry point value, for every installed component of `kind`."""
    return {ep.name: ep.value for ep in entry_points(group=_GROUPS[kind])}


@cache
def factory(kind: Kind, type_: str) -> Factory:
    """The factory of component `type_`; KeyError when no such type is installed."""
    found = list(entry_points(group=_GROUPS[kind], name=type_))
    if not found:
        raise KeyError(type_)
    ep = found[0]
    loaded = ep.load()
    if not isinstance(loaded, Factory) or loaded.kind != kind or loaded.type != type_:
        raise TypeError(f"entry point {ep.value} is not the {kind} factory of '{type_}'")
    return loaded


def add_commands(subparsers: object) -> None:
    """Add the `meterline` subcommands components contribute (`meterline.commands` entry
    points): each names a function `add(subparsers)` that adds its subparser and sets
    `func` (taking the parsed arguments, returning the exit code)."""
    for ep in entry_points(group="meterline.commands"):
        ep.load()(subparsers)


def demo() -> type[Any] | None:
    """The demo behind `meterline run --demo` (`meterline.demo` entry point), if installed.

    It is a class with `async start(raw) -> overlay` (start its fakes; given the file's
    data, return what to merge into it, see `config.load`), `async drive(config)` (send
    traffic until cancelled) and `async stop()`."""
    found = list(entry_points(group="meterline.demo"))
    return found[0].load() if found else None
