"""Fuzzing the config loader (`meterline.config.loads`): any YAML text either loads or is
refused with a `ConfigError` whose problems each say what is wrong; never another
exception (a YAML syntax error, a bad tag or a bad timestamp included), never a blow-up."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from meterline.config import ConfigError, loads
from tests.fuzz_helpers import SCALARS, TEXT, fuzz, within

_SCALAR_TEXT = st.sampled_from([
    "2001-13-45", "2001-12-14t21:59:43.10-05:00", "2001-02-30", "!!binary 'x'", "!!int abc",
    "!!float x", "!!timestamp 2001-99-99", "!!python/object:os.system x", "!!set {a}",
    "!!omap [a]", "!!str", "!!null x", "!!bool maybe", "0o777", "0x_", "1_000", ".inf", ".nan",
    "~", "${env:NOPE}", "${env:HOME}", "$$", "${env:X:-1s}", "'quoted'", '"\\x00"', "*undefined",
    "&a 1", "10ms", "-1s", "1e400", "9" * 5000, "\u2028", "?", "-", "|", ">", "@", "`"])
KEYS = st.sampled_from([
    "receivers", "processors", "exporters", "service", "pipelines", "webhook", "otlp",
    "gateway", "file", "debug", "filter", "sample", "redact", "labels", "cost", "listen",
    "path", "batch", "timeout", "queue", "include", "exclude", "max_body_mb", "rate",
    "admin", "memory_limiter", "workers", "worker_nice", "telemetry", "data_dir", "webhook/a", "p",
    "upstreams", "auth_token", "filtering", "retry", "sample/x", "receivers/"]) | TEXT
VALUES = st.recursive(SCALARS | _SCALAR_TEXT,
                      lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(KEYS, children, max_size=5), max_leaves=30)


def _dump(data: Any) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, RecursionError):
        return "{}"


VALID = """\
receivers:
  webhook: {listen: "127.0.0.1:0"}
processors:
  filter: {include: [{provider: openai}]}
exporters:
  file: {path: ./out.jsonl}
service:
  pipelines:
    p: {receivers: [webhook], processors: [filter], exporters: [file]}
"""


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["structured", "valid-mutated", "aliases", "deep", "text"]))
    if kind == "structured":
        text = _dump({k: draw(VALUES) for k in draw(st.lists(KEYS, max_size=5))})
        return text.replace("'", draw(st.sampled_from(["'", ""])))  # unquote some scalars
    if kind == "valid-mutated":
        lines = VALID.splitlines()
        i = draw(st.integers(0, len(lines) - 1))
        key, _, _ = lines[i].partition(":")
        lines[i] = draw(st.sampled_from([f"{key}: {draw(_SCALAR_TEXT)}", key + ":",
                                         lines[i] + " " + draw(_SCALAR_TEXT),
                                         lines[i][:draw(st.integers(0, len(lines[i])))]]))
        return "\n".join(lines)
    if kind == "aliases":  # billion laughs, and an alias of itself
        n = draw(st.integers(2, 12))
        doc = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        doc += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, n)]
        return draw(st.sampled_from(["\n".join(doc) + f"\nservice: *a{n - 1}\n",
                                     "service: &s [*s]\n", "a: &a {b: *a}\n",
                                     "<<: *a\n", "a: &a {}\nb: {<<: *a, <<: *a}\n"]))
    if kind == "deep":
        n = draw(st.integers(100, 5000))
        return draw(st.sampled_from(["service: " + "[" * n + "]" * n,
                                     "service: " + "{a: " * n + "1" + "}" * n,
                                     "".join(f"{'  ' * i}a:\n" for i in range(min(n, 400)))]))
    return draw(st.text(max_size=200) | TEXT | st.binary(max_size=100).map(
        lambda b: b.decode("latin-1")))


@fuzz(150)
@given(yaml_texts())
def test_any_yaml_text_loads_or_raises_a_config_error_naming_each_problem(text: str) -> None:
    try:
        within(3, loads, text, environ={"HOME": "/home/x", "X": "1"})
    except ConfigError as e:
        assert e.problems, "a ConfigError lists its problems"
        for problem in e.problems:
            assert isinstance(problem.message, str) and problem.message.strip(), e.problems
