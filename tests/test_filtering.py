"""Otoroshi's filter syntax, operator by operator, on events and raw JSON."""

import pytest

from meterline.filtering import Filter, FilterError, Pattern, compile_pattern
from tests.helpers import make_event

EVENT = make_event(
    1, provider="openai", request_model="gpt-4o-mini", status_code=429, duration_ms=250.0,
    input_tokens=100, streaming=True, finish_reasons=["stop", "length"],
    metadata={"customer_id": "acme-42", "env": "prod"}, attributes={"gen_ai.system": "openai"},
    error_type="rate_limit_error")

CASES = [
    # (pattern, matches?)
    ({"provider": "openai"}, True),
    ({"provider": "anthropic"}, False),
    ({"status_code": 429}, True),
    ({"streaming": True}, True),
    ({"streaming": 1}, False),  # JSON true is not 1
    ({"provider": "openai", "status_code": 200}, False),  # every key must match
    ({"finish_reasons": ["stop", "length"]}, True),
    ({"finish_reasons": ["stop"]}, False),
    ({"metadata": {"customer_id": "acme-42"}}, True),  # nested object
    ({"metadata.customer_id": "acme-42"}, True),  # dotted path
    ({"metadata.customer_id": "other"}, False),
    ({"attributes": {"gen_ai.system": "openai"}}, True),  # dotted key inside a map
    ({"user_id": None}, True),  # null: not reported
    ({"nope": "x"}, False),  # a missing field never matches
    ({"provider": {"$eq": "openai"}}, True),
    ({"provider": {"$ne": "openai"}}, False),
    ({"user_id": {"$ne": "bob"}}, True),  # missing matches under $ne
    ({"duration_ms": {"$gt": 200}}, True),
    ({"duration_ms": {"$gt": 250}}, False),
    ({"duration_ms": {"$gte": 250}}, True),
    ({"duration_ms": {"$lt": 250}}, False),
    ({"duration_ms": {"$lte": 250}}, True),
    ({"provider": {"$gt": 1}}, False),  # not a number
    ({"duration_ms": {"$between": {"min": 200, "max": 300}}}, True),
    ({"duration_ms": {"$between": {"min": 250, "max": 300}}}, False),  # exclusive
    ({"duration_ms": {"$betweene": {"min": 250, "max": 300}}}, True),  # inclusive
    ({"request_model": {"$regex": "gpt-4o.*"}}, True),
    ({"request_model": {"$regex": "gpt"}}, False),  # the whole string must match
    ({"request_model": {"$regex": ".*mini"}}, True),
    ({"request_model": {"$wildcard": "gpt-*"}}, True),
    ({"request_model": {"$wildcard": "claude*"}}, False),
    ({"request_model": {"$wildcard": "gpt.4o*"}}, False),  # . is literal
    ({"provider": {"$in": ["anthropic", "openai"]}}, True),
    ({"provider": {"$in": ["anthropic"]}}, False),
    ({"provider": {"$nin": ["anthropic"]}}, True),
    ({"user_id": {"$nin": ["bob"]}}, True),  # missing matches under $nin
    ({"finish_reasons": {"$contains": "length"}}, True),
    ({"finish_reasons": {"$contains": "tool_calls"}}, False),
    ({"metadata": {"$contains": {"key": "env", "value": "prod"}}}, True),
    ({"metadata": {"$contains": {"key": "env", "value": "dev"}}}, False),
    ({"request_model": {"$contains": "4o"}}, True),  # meterline: substring
    ({"finish_reasons": {"$all": ["length", "stop"]}}, True),
    ({"finish_reasons": {"$all": ["stop", "tool_calls"]}}, False),
    ({"finish_reasons": {"$size": 2}}, True),
    ({"finish_reasons": {"$size": 1}}, False),
    ({"metadata": {"$exists": "customer_id"}}, True),
    ({"metadata": {"$exists": "team"}}, False),
    ({"error_type": {"$exists": True}}, True),  # meterline: presence
    ({"user_id": {"$exists": False}}, True),
    ({"status_code": {"$and": [{"$gte": 400}, {"$lt": 500}]}}, True),
    ({"status_code": {"$and": [{"$gte": 400}, {"$lt": 429}]}}, False),
    ({"status_code": {"$or": [{"$eq": 200}, {"$eq": 429}]}}, True),
    ({"status_code": {"$or": [{"$eq": 200}, {"$eq": 500}]}}, False),
    ({"status_code": {"$nor": [{"$eq": 200}, {"$eq": 500}]}}, True),
    ({"status_code": {"$nor": [{"$eq": 429}]}}, False),
    ({"request_model": {"$not": {"$regex": "claude.*"}}}, True),
    ({"request_model": {"$not": {"$regex": "gpt.*"}}}, False),
    ({"user_id": {"$not": {"$eq": "bob"}}}, True),  # missing matches under $not
    ({"$or": [{"provider": "anthropic"}, {"status_code": 429}]}, True),  # whole event
    ({"$and": [{"provider": "openai"}, {"status_code": 200}]}, False),
    ({"$nor": [{"provider": "anthropic"}]}, True),
]


@pytest.mark.parametrize(("pattern", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_operator(pattern, expected):
    assert compile_pattern(pattern)(EVENT) is expected


def test_patterns_apply_to_raw_json_too():
    raw = {"audit": "LLMUsageAudit", "usage": {"prompt_tokens": 14}}
    assert compile_pattern({"audit": "LLMUsageAudit", "usage.prompt_tokens": {"$lt": 20}})(raw)


def test_empty_include_keeps_everything():
    assert Filter().apply([EVENT]) == [EVENT]


def test_kept_when_one_include_matches_and_no_exclude_does():
    f = Filter(include=[Pattern({"provider": "anthropic"}), Pattern({"provider": "openai"})],
               exclude=[Pattern({"status_code": 500})])
    assert f.keeps(EVENT)


def test_an_exclude_match_drops_the_event():
    f = Filter(exclude=[Pattern({"status_code": {"$gte": 400}})])
    assert not f.keeps(EVENT)


def test_no_include_match_drops_the_event():
    f = Filter(include=[Pattern({"provider": "anthropic"})])
    assert not f.keeps(EVENT)


@pytest.mark.parametrize(("pattern", "message"), [
    ({"a": {"$nope": 1}}, "unknown operator $nope"),
    ({"a": {"$gt": "x"}}, "expected a number"),
    ({"a": {"$regex": "("}}, "invalid regular expression"),
    ({"a": {"$between": {"min": 1}}}, "expected {min: N, max: N}"),
    ({"a": {"$in": "x"}}, "expected a list"),
    ({"a": {"$gt": 1, "$lt": 2}}, "exactly one $ key"),
    ({"a": {"$not": "x"}}, "expected an operator object"),
    ({"a": {"$size": -1}}, "non-negative integer"),
    ("text", "expected an object"),
])
def test_bad_pattern_is_refused_with_a_reason(pattern, message):
    with pytest.raises(FilterError, match=message.replace("$", r"\$").replace("{", r"\{")
                       .replace("(", r"\(")):
        compile_pattern(pattern)


def test_a_pattern_nested_deeper_than_32_levels_is_refused_and_one_as_deep_compiles():
    as_deep = {"provider": "openai"}  # 1 level; each $and adds 2 (its object and list)
    for _ in range(15):
        as_deep = {"$and": [as_deep]}
    assert compile_pattern(as_deep)({"provider": "openai"})
    with pytest.raises(FilterError, match="nested deeper than 32 levels"):
        compile_pattern({"$and": [as_deep]})


def test_patterns_compare_by_source():
    assert Pattern({"a": 1}) == Pattern({"a": 1})
    assert Pattern({"a": 1}) != Pattern({"a": 2})


def test_an_operator_beside_field_keys_is_refused_with_the_and_form_to_write():
    with pytest.raises(FilterError) as e:
        compile_pattern({"provider": "openai", "$or": [{"request_model": "a"}]})
    assert 'write {"$and": [{"provider": "openai"}, {"$or": [{"request_model": "a"}]}]}' \
        in str(e.value)
    matches = compile_pattern({"$and": [{"provider": "openai"}, {"$or": [{"request_model": "a"}]}]})
    assert matches({"provider": "openai", "request_model": "a"})
    assert not matches({"provider": "openai", "request_model": "b"})


def test_a_regex_that_would_backtrack_matches_in_linear_time():
    """`(a+)+b` on a run of `a`s takes exponential time in a backtracking engine (26 of them:
    seconds, 40: hours); RE2 answers at once, so a tap or filter cannot stall the daemon."""
    pattern = Pattern({"request_model": {"$regex": "(a+)+b"}})
    assert not pattern.matches(make_event(request_model="a" * 40))
    assert pattern.matches(make_event(request_model="a" * 40 + "b"))


def test_a_regex_answers_each_value_alike_past_the_values_it_remembers():
    """Answers are remembered per value (4,096 of them, then forgotten): every value keeps
    its own answer, long ones and those seen after the memory was cleared too."""
    matches = compile_pattern({"endpoint": {"$regex": "/v1/.*[02468]"}})
    values = [f"/v1/{i}" for i in range(10_000)] + ["/v1/" + "x" * 300 + "2"]
    for _ in range(2):
        assert [matches({"endpoint": v}) for v in values] == \
            [v[-1] in "02468" for v in values]
    assert not matches({"endpoint": 2}) and not matches({"endpoint": None})


def test_a_regex_with_a_lookbehind_is_refused_with_the_engines_reason():
    with pytest.raises(FilterError, match=r"invalid perl operator: \(\?<.*no lookarounds"):
        compile_pattern({"endpoint": {"$regex": "(?<=/v1)/chat"}})


def test_a_wildcard_star_spans_newlines():
    pattern = Pattern({"error_message": {"$wildcard": "upstream*timed out"}})
    assert pattern.matches(make_event(error_message="upstream\nconnection timed out"))
