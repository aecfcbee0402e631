"""Fuzzing the filter language (meterline/filtering.py): any expression either is refused
with a `FilterError` saying where and why, or compiles to a matcher that evaluates any
event (and any JSON value) without raising, in bounded time (`$regex` runs on RE2)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meterline.event import FIELDS, from_dict
from meterline.filtering import OPERATORS, FilterError, compile_pattern
from tests.fuzz_helpers import SCALARS, TEXT, fuzz, json_values, meterline_events, within
from tests.helpers import make_event

REGEXES = st.sampled_from([
    "(a+)+b", "(a|aa)*c", "(.*a){20}", "^(\\w+\\s?)*$", "a{1000}", "a{0,1001}", "(?=a)", "(a)\\1",
    "[", "(", "*", "\\", "(?i)GPT-.*", "\\p{Greek}+", "[[:alpha:]]", "\\x{10FFFF}", "\x00",
    ".*", "", "gpt-4o(-mini)?", "(?P<n>a)", "\\C", "(?s).", "[^\\x00-\\x7f]"]) | TEXT
FIELD_KEYS = (st.sampled_from(sorted(FIELDS)) | st.sampled_from(
    ["metadata.team", "attributes.x.y", "params.temperature", "a.b.c.d", ".", "..", "",
     "metadata."]) | TEXT)


def _operand(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (SCALARS | st.lists(SCALARS | children, max_size=3)
            | st.fixed_dictionaries({"min": SCALARS, "max": SCALARS})
            | st.fixed_dictionaries({"key": SCALARS | FIELD_KEYS, "value": SCALARS})
            | children)


def _expressions(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    op = st.sampled_from([*OPERATORS, "$foo", "$", "$REGEX"])
    return (st.builds(lambda o, a: {o: a}, op, _operand(children))
            | st.builds(lambda o, a: {o: a}, st.sampled_from(["$contains", "$exists"]),
                        st.fixed_dictionaries({"key": SCALARS | FIELD_KEYS, "value": SCALARS})
                        | SCALARS | FIELD_KEYS)
            | st.builds(lambda a: {"$regex": a}, REGEXES)
            | st.builds(lambda a: {"$wildcard": a}, REGEXES)
            | st.builds(lambda o, xs: {o: xs}, st.sampled_from(["$and", "$or", "$nor"]),
                        st.lists(children, max_size=3))
            | st.builds(lambda inner: {"$not": inner}, children)
            | st.dictionaries(FIELD_KEYS, children, max_size=3)
            | st.builds(lambda k, o, a: {k: {o: a}, "$and": []}, FIELD_KEYS, op, SCALARS))


def _event_or_dict(data: dict[str, Any]) -> Any:
    try:
        return from_dict(data)
    except Exception:
        return data  # raw decoded JSON, which filters also read


EXPRESSIONS = st.recursive(SCALARS, _expressions, max_leaves=12) | json_values(10)
TARGETS = (st.builds(lambda i: make_event(i), st.integers(0, 5))
           | meterline_events().map(lambda d: _event_or_dict(d))
           | json_values(15))


LONG = ["a" * 30 + "!", "a" * 5000, "x" * 100_000 + "b"]


@fuzz(400)
@given(EXPRESSIONS, st.lists(TARGETS, min_size=1, max_size=4))
def test_any_filter_is_refused_with_a_reason_or_matches_any_event_without_raising(
        expression: Any, targets: list[Any]) -> None:
    try:
        matches = within(2, compile_pattern, expression)
    except FilterError as e:
        assert str(e).strip(), "a refusal must say why"
        return
    for target in targets:
        assert isinstance(within(1, matches, target), bool)


@fuzz(60)
@given(REGEXES, FIELD_KEYS.filter(lambda k: k in FIELDS), st.sampled_from(LONG))
def test_a_regex_filter_on_a_long_value_takes_linear_time(pattern: str, field: str,
                                                          value: str) -> None:
    try:
        matches = compile_pattern({field: {"$regex": pattern}})
    except FilterError as e:
        assert str(e).strip()
        return
    assert isinstance(within(1, matches, {field: value}), bool)
