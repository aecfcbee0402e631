"""`docs/components/` is generated from the config classes (`meterline.describe`), and
`meterline components` prints the same: the committed pages are never stale, and the
description reader takes what the config classes say."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import msgspec

from meterline import cli, describe, registry
from meterline.component import Config
from meterline.units import Duration, Listen
from tests.helpers import ROOT

DOCS = ROOT / "docs" / "components"


def _files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.md"))}


def test_docs_components_is_what_the_config_classes_generate(tmp_path):
    describe.write_markdown(tmp_path)
    generated, committed = _files(tmp_path), _files(DOCS) if DOCS.is_dir() else {}
    problems = [f"{name}: missing" for name in generated if name not in committed]
    problems += [f"{name}: differs" for name in generated
                 if name in committed and committed[name] != generated[name]]
    problems += [f"{name}: generated for nothing registered now" for name, text in
                 committed.items() if name not in generated and text.startswith(describe.MARKER)]
    assert not problems, (f"docs/components is stale ({'; '.join(problems)}): run "
                          f"`{describe.GENERATE}` to regenerate it")
    assert describe.stale(DOCS) == []


def test_every_registered_component_and_section_has_a_page_in_the_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for kind in describe.KINDS:
        for type_ in registry.available(kind):
            assert f"]({kind}-{type_}.md)" in index
    assert "](section-service.md)" in index


def test_markdown_writes_the_pages_and_removes_generated_pages_of_nothing(tmp_path):
    (tmp_path / "receiver-gone.md").write_text(describe.MARKER + "\n")
    (tmp_path / "notes.md").write_text("kept: not generated\n")
    assert cli.main(["components", "--markdown", str(tmp_path)]) == 0
    assert not (tmp_path / "receiver-gone.md").exists()
    assert (tmp_path / "notes.md").exists()
    assert (tmp_path / "exporter-file.md").read_text().startswith(describe.MARKER)
    assert describe.stale(tmp_path) == []


def test_markdown_into_a_file_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "pages").write_text("a file\n")
    assert cli.main(["components", "--markdown", str(tmp_path / "pages")]) == 1
    assert capsys.readouterr().err == (f"meterline components --markdown: {tmp_path / 'pages'}: "
                                       "not a directory\n")


# --- `meterline components` ---------------------------------------------------------------

def test_components_without_a_type_lists_every_registered_component(capsys):
    assert cli.main(["components"]) == 0
    out = capsys.readouterr().out
    for kind in describe.KINDS:
        for type_ in registry.available(kind):
            assert f"{kind}/{type_} " in out


def test_components_type_prints_key_type_default_and_description(capsys):
    assert cli.main(["components", "exporter/file"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exporter/file: ")
    rows = {line.split()[0]: line for line in out.splitlines()[3:] if line[:1].strip()}
    assert rows["queue.type"].split()[1:6] == ["one", "of", "memory|persistent", "persistent",
                                               "persistent:"]
    assert "duration" in rows["batch.timeout"] and "200ms" in rows["batch.timeout"]
    assert "receiver/file" not in out


def test_a_type_of_two_kinds_prints_both_and_kind_slash_type_one(capsys):
    assert cli.main(["components", "file"]) == 0
    out = capsys.readouterr().out
    assert "receiver/file: " in out and "exporter/file: " in out
    assert cli.main(["components", "receivers/file"]) == 0
    out = capsys.readouterr().out
    assert "receiver/file: " in out and "exporter/file" not in out
    assert "required" in out  # path


def test_an_unknown_type_exits_1_and_says_where_to_look(capsys):
    assert describe.command(argparse.Namespace(markdown=None, type="nope")) == 1
    assert "meterline components" in capsys.readouterr().err


# --- the description reader ---------------------------------------------------------------

class _Inner(Config):
    """An inner block.

    More about it, not in the summary."""

    depth: int = 1  # how deep


class _Base(Config):
    inherited: bool = False  # from the base
    overridden: _Inner = msgspec.field(default_factory=_Inner)  # the base's words


class _Sample(_Base, kw_only=True):
    # a leading comment
    # on two lines
    plain: str = "x"  # and a trailing one
    wrapped: Duration = Duration(90)  # a trailing comment that goes
                                      # on below, indented deeper
    # this comment begins the next field's description
    after: int = 0
    documented: Listen = Listen("127.0.0.1:1")
    """An attribute docstring
    on two lines."""
    # a note, then a blank line: it describes no field

    needed: list[str]  # required
    choice: Literal["b", "a"] = "b"  # declared order kept
    nested: _Inner | None = None
    blocks: dict[str, _Inner] = msgspec.field(default_factory=dict)  # by name
    items: list[_Inner] = msgspec.field(default_factory=list)  # in order
    overridden: _Inner = msgspec.field(default_factory=lambda: _Inner(depth=3))


def test_descriptions_come_from_comments_and_attribute_docstrings():
    found = {o.key: o for o in describe.options(_Sample)}
    assert found["plain"].description == "a leading comment on two lines and a trailing one"
    assert found["wrapped"].description == ("a trailing comment that goes on below, indented "
                                            "deeper")
    assert found["after"].description == "this comment begins the next field's description"
    assert found["documented"].description == "An attribute docstring on two lines."
    assert found["needed"].description == "required"
    assert found["inherited"].description == "from the base"
    assert found["overridden"].description == "the base's words. An inner block."  # redeclared
    assert found["nested"].description == "An inner block."  # the struct's docstring
    assert found["blocks"].description == "by name. An inner block."


def test_options_are_dotted_typed_and_defaulted_as_yaml_writes_them():
    found = {o.key: (o.type, o.default) for o in describe.options(_Sample)}
    assert list(found)[:8] == ["plain", "wrapped", "after", "documented", "needed", "choice",
                               "nested", "nested.depth"]  # own options first, then the base's
    assert found["wrapped"] == ("duration", "90s")
    assert found["documented"] == ("host:port", "127.0.0.1:1")
    assert found["needed"] == ("list of string", "required")
    assert found["choice"] == ("one of b|a", "b")
    assert found["nested"] == ("object", "null")
    assert found["blocks.<name>.depth"] == ("int", "1")
    assert found["items[].depth"] == ("int", "1")
    assert found["overridden"] == ("object", "{depth: 3}")
    assert found["overridden.depth"] == ("int", "3")  # the redeclared default, not the class's
    assert found["inherited"] == ("bool", "false")


def test_durations_are_written_with_the_largest_whole_unit():
    assert [describe.duration_text(s) for s in (0.2, 1, 90, 300, 3600, 48 * 3600, 90 * 86400)] \
        == ["200ms", "1s", "90s", "5m", "1h", "48h", "90d"]
    assert describe.default_text(Duration(0)) == "0"


def test_the_cost_processors_unit_prices_each_get_their_own_description():
    found = {o.key: o.description
             for o in describe.options(registry.factory("processor", "cost").config)}
    assert found["prices.<name>.images"] == (
        "USD per image, by `size/quality` (1024x1792/hd), `size` or `quality`; `image` for "
        "the others")
    assert found["prices.<name>.audio_input_minute"] == "USD per minute of audio transcribed"
