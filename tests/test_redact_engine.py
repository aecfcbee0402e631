"""The multi-pattern engine of the redact processor: it finds what the detectors'
regexes alone find, in batches, in text of any script, in big texts, and in linear
work on hostile ones."""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest

from meterline.config import convert
from meterline.event import Event
from meterline.processors.redact import RedactConfig, RedactProcessor
from meterline.processors.redact.detectors import BUILTIN, NAMES, Finding, iban_valid
from meterline.processors.redact.engine import DetectorSet
from meterline.processors.redact.image import DIGIT, FOLD_K, FOLD_S, OTHER, image
from tests.helpers import make_context

ENGINE = DetectorSet(list(BUILTIN))

# Random texts are built of pieces of PII, near misses and separators, and of
# characters, among them ones that Python's regexes treat specially.
PIECES = [
    "+44 ", "(415) ", "555-0132", "4111 1111 1111 1111", "5555-5555-5555-4444", "123-45-6789",
    "192.168.", "10.0.0.1", "1.2.3.4:80", "v1.2.3.4", "::", "2001:db8::", "fe80::1%eth0",
    "::ffff:1.2.3.4", "1:2:3:4:5:6:7:8", "12:00:01", "std::vector", "jane.doe@acme.com",
    "a@b.co", "o'brien@x.org", "b.co'x@c.com", "DE89 3704 0044 0532 0130 00",
    "GB82WEST12345698765432", "IBAN ", "sk-", "sk-ant-api03-", "sk-proj-", "eyJhbGciOiJIUzI1NiJ9",
    ".eyJzdWIiOiIxIn0", ".", "ghp_", "github_pat_", "xoxb-", "xapp-1-", "AKIA", "ASIA",
    "aws secret = ", "secret_key: ", "SECRET ACCESS KEY=", "Bearer ", "bearer_token=", "AIza",
    "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----",
    "server ", "host: ", "version ", "https://", "0044 20 7946 0958", "06 12 34 56 78",
    "020 7946 0958", "https://hooks.slack.com/services/", "\n", "\x00",
    # whole secrets, for the detectors whose matches are long
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa98765432", "ghp_" + "aB3" * 12,
    "xoxb-2048-1024-AbCdEf123456", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
    "AKIAIOSFODNN7EXAMPLE", "gsk_", "hf_", "dapi", "ya29.",
    "gsk_" + "Qz8" * 18, "hf_" + "QzkWpL" * 6, "dapi" + "0f9e" * 8, "API_KEY=", "token: ",
    "\"client-secret\": \"", "NextToken=", "Xq7LmN2pR9sT4vW8yZ1aB3cD", "postgres://u:",
    "redis://:Pw9x@", "@db:5432", "AccountKey=" + "Ab3+" * 21 + "Xy==", "123456789:AA",
    "M" + "aB3_" * 6 + ".xY7-zQ." + "Pq8" * 9, "0f9e" * 8 + "-us6", "SK" + "0f9e" * 8,
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
]
# (Written as escapes: é, Arabic-Indic 3, fullwidth 0, bold 1, dotless i, dotted I, long s,
# Kelvin, a C1 control, no-break space, em dash, typographic apostrophe, a CJK ideograph.)
ALPHABET = (list("0123456789") * 3 + list(" .-+()@:/_'%,=\"") + list("abcdefxyzABCDEFKS")
            + ["\xe9", "\u0663", "\uff10", "\U0001d7cf", "\u0131", "\u0130", "\u017f",
               "\u212a", "\x85", "\xa0", "\u2014", "\u2019", "\u4e2d", "\U0001f600"])


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(PIECES))
        elif r < 0.7:
            parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 20))))
        else:
            parts.append("".join(rng.choice("0123456789abcdefABCDEF:.- ")
                                 for _ in range(rng.randint(1, 30))))
    return "".join(parts)


def regexes_alone(text: str) -> list[Finding]:
    """What the detectors find with their regexes run over the whole text, and
    overlaps settled one finding at a time: the meaning the engine must keep."""
    found = sorted((Finding(start, end, index) for index, d in enumerate(BUILTIN)
                    for start, end in d.find(text)), key=lambda f: (f.detector, f.start))
    kept: list[Finding] = []
    for f in found:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept)


def test_the_engine_finds_what_the_regexes_alone_find() -> None:
    rng = random.Random(20240301)
    texts = [random_text(rng) for _ in range(4000)]
    found = ENGINE.find_all(texts)
    wrong = [(text, regexes_alone(text), found.get(i, []))
             for i, text in enumerate(texts) if regexes_alone(text) != found.get(i, [])]
    assert not wrong, f"{len(wrong)} texts differ, first: {wrong[0]}"
    seen = Counter(NAMES[detector] for findings in found.values() for _, _, detector in findings)
    assert set(seen) == set(NAMES), f"the texts should hold findings of every detector: {seen}"


def test_a_batch_gives_each_text_what_it_gives_alone() -> None:
    rng = random.Random(7)
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    texts = ["", "-----BEGIN PRIVATE KEY-----\nMIIE", "-----END PRIVATE KEY----- a@b.co",
             key, "x\x00y jane@acme.com\x00", *(random_text(rng) for _ in range(300))]
    found = ENGINE.find_all(texts)
    assert [found.get(i, []) for i in range(len(texts))] == [ENGINE.find(t) for t in texts]
    assert found.get(1) is None and found[2] == [(26, 32, NAMES.index("email"))]
    assert found[3] == [(0, len(key), NAMES.index("private_key"))]


def test_text_in_any_script_is_imaged_one_byte_per_character() -> None:
    assert image("plain ASCII: 12@x.y") == b"plain ASCII: 12@x.y"
    text = "\xe9 \u0663 \U0001d7cf \u017f \u212a \x85 \u4e2d ?"
    assert image(text) == bytes([0xE9, 32, DIGIT, 32, DIGIT, 32, FOLD_S, 32, FOLD_K, 32,
                                 OTHER, 32, ord("?"), 32, ord("?")])
    assert image("a\ud800b") == b"a?b"  # a lone surrogate, which JSON can carry
    rng = random.Random(3)
    for _ in range(200):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 50)))
        assert len(image(text)) == len(text)


@pytest.mark.parametrize(("text", "detector", "value"), [
    ("call +٤٤ ٢٠ ٧٩٤٦ ٠٩٥٨ today", "phone", "+٤٤ ٢٠ ٧٩٤٦ ٠٩٥٨"),  # Arabic-Indic digits
    ("\u017fecret_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_key",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),  # long s folds to s under IGNORECASE
    ("écrivez à josé.garcía@correo.es — merci", "email", "josé.garcía@correo.es"),
    ("“Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0”", "bearer_token",
     "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
])
def test_findings_in_other_scripts_are_those_the_regexes_make(
        text: str, detector: str, value: str) -> None:
    start = text.index(value)
    assert ENGINE.find(text) == regexes_alone(text) == [
        (start, start + len(value), NAMES.index(detector))]


def test_an_iban_with_a_letter_int_cannot_read_is_not_an_error() -> None:
    assert not iban_valid("DE89370400440532013\u212a00")  # the Kelvin sign, not K
    assert ENGINE.find("IBAN DE89 3704 0044 0532 0130 \u212a0") == []


PLANTED = {
    "email": "ops.{i}@corp-{i}.example.com",
    "phone": "+44 20 7946 {i:04d}",
    "credit_card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ipv4": "203.0.{j}.{k}",
    "openai_key": "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn{i:06d}",
    "ssn": "123-45-6789",
}
PROSE = ("Summarize the attached quarterly report for the leadership team, keeping the "
         "figures on revenue, churn and hiring, and suggest three follow-up questions. ")


def big_prompt(size: int) -> tuple[str, Counter[str]]:
    """`size` characters of prose with PII of every kind in `PLANTED` spread through it,
    and how many of each there are."""
    parts: list[str] = []
    planted: Counter[str] = Counter()
    i = length = 0
    while length < size:
        name = list(PLANTED)[i % len(PLANTED)]
        value = PLANTED[name].format(i=i, j=i // 250 % 250, k=i % 250 + 1)
        parts += [PROSE * (i % 7 + 1), value, " "]
        length += len(parts[-3]) + len(value) + 1
        planted[name] += 1
        i += 1
    return "".join(parts), planted


def test_a_1mb_prompt_with_pii_spread_through_it_is_redacted(tmp_path: Path) -> None:
    text, planted = big_prompt(1_000_000)
    p = RedactProcessor(convert({}, RedactConfig), make_context(tmp_path, "redact"))
    event = p.process([Event(input_messages=[{"role": "user", "content": text}])])[0]
    assert event.redactions == dict(planted)
    redacted = event.input_messages[0]["content"]  # type: ignore[index]
    assert "@corp-" not in redacted and "4111 1111" not in redacted and "sk-proj" not in redacted
    assert redacted.count("<EMAIL>") == planted["email"]


def calls(work: Callable[[], Any]) -> int:
    """How many Python and C functions `work` calls: a measure of work that, unlike a
    clock, does not depend on the machine."""
    count = 0

    def profile(_frame: Any, event: str, _arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return count


HOSTILE = ["1", "@", ":", "1 ", "a@b.co ", "b.co'x@", "-----BEGIN PRIVATE KEY-----", "1.1.1.1.",
           "sk-", "eyJ", "aws secret ", "secret key ", "bearer ", "+1 ", "::1:", "1:", "٣",
           "\u017f", "DE89 ", "0 ", "4111 1111 1111 1111 ", "(415) ", "-", "a", "\x00"]


@pytest.mark.parametrize("unit", HOSTILE)
def test_hostile_text_costs_work_in_proportion_to_its_size(unit: str) -> None:
    small, large = (unit * (size // len(unit)) for size in (20_000, 40_000))
    ratio = calls(lambda: ENGINE.find(large)) / calls(lambda: ENGINE.find(small))
    assert ratio < 2.3, f"{unit!r}: twice the text, {ratio:.1f} times the work"


@pytest.mark.parametrize("unit", ["1", "@", ":", "1 ", "a@b.co ", "::1:"])
def test_a_megabyte_of_hostile_text_is_scanned(unit: str) -> None:
    text = unit * (1_000_000 // len(unit))
    assert [f for f in ENGINE.find(text) if f.detector != NAMES.index("email")] == []


def test_a_private_key_block_never_spans_a_nul() -> None:
    """A NUL separates the fields of an event joined into one text: a BEGIN line in
    one field and an END line in another are no key."""
    text = "-----BEGIN PRIVATE KEY-----\nMIIEvQ\x00-----END PRIVATE KEY-----"
    assert ENGINE.find(text) == []
    assert regexes_alone(text) == []


def test_a_field_listed_twice_is_redacted_and_counted_once(tmp_path: Path) -> None:
    config = convert({"fields": ["input_messages", "metadata", "metadata.note"],
                      "identifiers": "mask"}, RedactConfig)
    p = RedactProcessor(config, make_context(tmp_path, "redact"))
    e = p.process([Event(input_messages=[{"role": "user", "content": "mail a@corp.example.com"}],
                         metadata={"note": "ssn 123-45-6789"})])[0]
    assert e.input_messages == [{"role": "user", "content": "mail <EMAIL>"}]
    assert e.metadata == {"note": "ssn <SSN>"}
    assert e.redactions == {"email": 1, "ssn": 1}


def redact_in_a_new_process(data_dir: str, text: str) -> Any:
    p = RedactProcessor(convert({}, RedactConfig), make_context(Path(data_dir), "redact"))
    return p.process([Event(input_messages=[{"role": "user", "content": text}])])[0].input_messages


def test_the_processor_is_built_in_a_spawned_worker(tmp_path: Path) -> None:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(redact_in_a_new_process, str(tmp_path), "mail a@corp.example.com")
        assert result.result(timeout=120) == [{"role": "user", "content": "mail <EMAIL>"}]
