"""Values a client named as secrets: under a key such as `api_key`, `db.password` or
`http.request.header.api-key` (an instrumentation's capture of Azure OpenAI's header), in
`params`, `attributes`, `metadata` or the messages.

The text detectors read a value alone, without its key, so a key with no marker
(Mistral's, Cohere's, Azure's) stored under such a name was left in clear, where the same
pair written in a prompt (`"api_key": "..."`) is found by `secret`. Such values are
`secret` findings, whole (each string of a list under such a key too): at the top of
`params`, `attributes` and `metadata` replaced before the text pass, which then finds
nothing in the placeholder (`redact`); deeper, found in the text pass's own walk
(`nested`). A batch's distinct keys
are checked first: a batch without such a key costs a set union per field."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from operator import attrgetter
from typing import Any

from meterline.event import Event
from meterline.processors.redact.detectors import secret_key
from meterline.processors.redact.engine import Span
from meterline.processors.redact.redactor import DropField, Strings

FIELDS = ("params", "attributes", "metadata")  # the maps whose keys the client chose
Rules = dict[str, Callable[[str], bool]]  # a key naming a secret -> which values are
Replace = Callable[..., str]  # `Redactor.replace`

_rule = lru_cache(maxsize=4096)(secret_key)  # keys repeat from batch to batch


class NamedSecrets:
    """The values under secret-naming keys of `fields`, replaced as findings of detector
    `detector` (identifiers in a field that is not free text: `metadata`)."""

    def __init__(self, fields: Sequence[str], detector: int,
                 text_fields: frozenset[str]) -> None:
        self.fields = [(name, attrgetter(name), name not in text_fields) for name in fields]
        self.detector = detector

    def rules(self, events: list[Event]) -> Rules:
        """The keys of the batch that name secrets, with their rule."""
        rules: Rules = {}
        for _, get, _ in self.fields:
            for key in set().union(*filter(None, map(get, events))):
                if isinstance(key, str) and (rule := _rule(key)) is not None:
                    rules[key] = rule
        return rules

    def nested(self, strings: Strings, count: int, walked: set[Any], values: list[Any],
               events: list[Event], found: dict[int, list[Span]]) -> None:
        """The strings under secret-naming keys deeper in `params`, `attributes` and the
        messages (`params.extra_headers["api-key"]`, a tool's `{"password": ...}`, or
        `{"api_keys": [...]}`, a list's strings each): the walk of the text pass met them
        (`strings`, its first `count`, inside `values`) and their keys (`walked`); each
        becomes one finding, the whole string, in `found`. The top of the fields was done
        before the pass (`redact`)."""
        rules = {key: rule for key in walked
                 if isinstance(key, str) and (rule := _rule(key)) is not None}
        if not rules:
            return
        top = {id(value) for _, get, _ in self.fields for value in map(get, events) if value}
        lists = _named_lists(values, rules, top)
        texts, keys, containers = strings.texts, strings.keys, strings.containers
        for i in range(count):
            container = containers[i]
            if type(container) is dict:
                rule = rules.get(keys[i]) if id(container) not in top else None
            else:
                rule = lists.get(id(container)) if lists else None
            if rule is not None and rule(texts[i]):
                found[i] = [(0, len(texts[i]), self.detector)]

    def redact(self, e: Event, rules: Rules, replace: Replace, counts: dict[str, int]) -> None:
        """`e`'s values under those keys replaced (a list's strings each); a `drop`
        finding drops the entry."""
        for _, get, identifier in self.fields:
            value = get(e)
            if not value:
                continue
            for key in rules.keys() & value.keys():
                try:
                    value[key] = self._replaced(value[key], rules[key], replace, counts,
                                                identifier)
                except DropField:
                    del value[key]

    def _replaced(self, value: Any, rule: Callable[[str], bool], replace: Replace,
                  counts: dict[str, int], identifier: bool) -> Any:
        if isinstance(value, list):  # an OpenTelemetry header attribute is a list
            return [self._replaced(v, rule, replace, counts, identifier) for v in value]
        if isinstance(value, str) and value and rule(value):
            return replace(value, [(0, len(value), self.detector)], counts,
                           identifier=identifier)
        return value


def _named_lists(values: list[Any], rules: Rules,
                 top: set[int]) -> dict[int, Callable[[str], bool]]:
    """The lists (and the lists inside them) held under a secret-naming key of a dict
    within `values`, by id, with the key's rule; not those at the top of the fields
    (`top`), replaced before the pass. A walk of its own, with an explicit stack as the
    text pass's: only batches that hold such a key pay for it."""
    named: dict[int, Callable[[str], bool]] = {}
    stack: list[tuple[Any, Callable[[str], bool] | None]] = [
        (v, None) for v in values if isinstance(v, (dict, list))]
    while stack:
        container, rule = stack.pop()
        if isinstance(container, dict):
            at_top = id(container) in top
            for key, v in container.items():
                if isinstance(v, list):
                    stack.append((v, None if at_top else rules.get(key)))
                elif isinstance(v, dict):
                    stack.append((v, None))
        else:
            if rule is not None:
                named[id(container)] = rule
            stack += [(v, rule if isinstance(v, list) else None)
                      for v in container if isinstance(v, (dict, list))]
    return named
