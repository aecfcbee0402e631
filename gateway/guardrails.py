"""Guardrails the gateway applies inline, on the prompt and on the answer.

A rule names what it looks for (redaction detectors, prompt-injection pattern sets,
deny-listed topics), where (`input`, `output` or both) and what to do when it fires:
`monitor` (record only), `redact` (mask what matched, then go on: upstream gets the
masked prompt, the client the masked answer) or `block` (answer an error in the
provider's own shape; nothing goes upstream). Every rule that fired is recorded on the
call's event (`Event.guardrails`, and `guardrails` in `Event.policies`).

All the rules of a stage run as one `DetectorSet`: one Hyperscan pass over the texts
finds where any of them may match, and the anchored regexes confirm those places (the
redact processor's engine, `processors/redact/engine.py`), so work stays linear in the
text whatever the number of rules. Small texts are checked on the event loop (a 4 KB
prompt costs tens of microseconds); larger ones in a thread of their own, so that a
megabyte prompt does not hold up the other streams (see `Guardrails.check`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, cast, get_args

import msgspec

from meterline.component import Config
from meterline.event import Event, Guardrail, GuardrailAction, GuardrailStage, add_policy
from meterline.processors.redact.detectors import BUILTIN, NAMES, Detector, Probe
from meterline.processors.redact.engine import DetectorSet

STAGES: Final = ("input", "output", "both")
ACTIONS: Final = get_args(GuardrailAction)
INLINE_CHARS: Final = 64 << 10  # texts up to this many characters are checked on the loop

# Prompt-injection pattern sets. Each is a keyword Hyperscan finds (the probe) and the
# phrase a regex confirms from there, bounded so that a confirmation reads a few words.
_WORDS = r"(?:[\w'-]+\s+){0,3}"
INJECTION: Final[dict[str, tuple[str, str]]] = {
    "ignore_instructions": (
        r"\b(?:ignore|disregard|forget|override|bypass|skip)\b",
        rf"(?:ignore|disregard|forget|override|bypass|skip)\s+{_WORDS}"
        r"(?:previous|prior|above|earlier|preceding|system|original|initial|all)\s+"
        r"(?:instructions?|prompts?|rules?|directions?|guidelines?|directives?|context)\b"),
    "system_prompt_extraction": (
        r"\b(?:reveal|show|print|repeat|output|display|leak|tell|what|give)\b",
        r"(?:reveal|show|print|repeat|output|display|leak|tell\s+me|what\s+(?:is|are|was|were)"
        rf"|give\s+me)\s+{_WORDS}(?:system\s+(?:prompt|message|instructions?)|"
        r"(?:initial|hidden|original|secret)\s+(?:prompt|instructions?)|"
        r"(?:the\s+)?(?:words|text|instructions?)\s+above)\b"),
    "role_confusion": (
        r"(?:\b(?:you|from|act|pretend|enter|enable)\b|<\||\[|#)",
        r"(?:you\s+are\s+(?:now\s+)?(?:DAN|an?\s+(?:unrestricted|unfiltered|jailbroken)\b)|"
        r"from\s+now\s+on\s+you\s+are\b|act\s+as\s+(?:an?\s+)?(?:unrestricted|unfiltered|"
        r"jailbroken)\b|pretend\s+(?:to\s+be|you\s+are)\s+(?:an?\s+)?(?:unrestricted|"
        r"unfiltered|jailbroken)\b|(?:enter|enable)\s+(?:developer|god|DAN)\s+mode\b|"
        r"<\|im_start\|>\s*system|\[(?:SYSTEM|INST)\]|#{2,}\s*system\s*:)"),
}


class GuardrailRule(Config):
    """One rule: what it looks for, on which side of the call, and what it does."""

    name: str  # named in events, errors and the analytics API
    action: str = "monitor"  # monitor (record only), redact (mask and go on) or block
    stage: str = "input"  # input (the prompt), output (the answer) or both
    # the redact processor's built-in detectors, by name (email, credit_card, openai_key...)
    detectors: list[str] = msgspec.field(default_factory=list)
    # prompt-injection pattern sets: ignore_instructions, system_prompt_extraction,
    # role_confusion; true: all three
    injection: list[str] | bool = msgspec.field(default_factory=list)
    topics: list[str] = msgspec.field(default_factory=list)  # deny-listed words or phrases
    models: list[str] = msgspec.field(default_factory=list)  # wildcards; empty: every model

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"guardrail name {self.name!r}: letters, digits, _ . - only")
        if self.action not in ACTIONS:
            raise ValueError(f"guardrail {self.name}: unknown action {self.action!r} "
                             f"(expected {', '.join(ACTIONS)})")
        if self.stage not in STAGES:
            raise ValueError(f"guardrail {self.name}: unknown stage {self.stage!r} "
                             f"(expected {', '.join(STAGES)})")
        if self.injection is True:
            self.injection = list(INJECTION)
        elif self.injection is False:
            self.injection = []
        unknown = [d for d in self.detectors if d not in NAMES]
        if unknown:
            raise ValueError(f"guardrail {self.name}: unknown detector {', '.join(unknown)} "
                             f"(built-in: {', '.join(NAMES)})")
        unknown = [s for s in self.injection if s not in INJECTION]
        if unknown:
            raise ValueError(f"guardrail {self.name}: unknown injection pattern set "
                             f"{', '.join(unknown)} (expected {', '.join(INJECTION)})")
        if any(not t.strip() for t in self.topics):
            raise ValueError(f"guardrail {self.name}: a topic is empty")
        if not (self.detectors or self.injection or self.topics):
            raise ValueError(f"guardrail {self.name}: give detectors, injection or topics")

    def applies(self, stage: str, model: str | None) -> bool:
        if self.stage not in (stage, "both"):
            return False
        return not self.models or any(fnmatch.fnmatchcase(model or "", m) for m in self.models)


def check_names(rules: list[GuardrailRule]) -> None:
    names = [r.name for r in rules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"guardrail names must be unique: {', '.join(twice)}")


@dataclass
class Verdict:
    """What the rules of one stage found in one call's texts."""

    fired: list[Guardrail] = field(default_factory=list)
    blocked_by: Guardrail | None = None
    masked: dict[int, str] = field(default_factory=dict)  # text index -> its masked form

    def record(self, event: Event) -> None:
        """Note the rules that fired on the call's event."""
        if not self.fired:
            return
        event.guardrails = [*(event.guardrails or ()), *self.fired]
        add_policy(event, "guardrails")

    def refusal(self) -> str:
        """The message of the error a blocked call is answered with."""
        blocked = self.blocked_by
        assert blocked is not None
        return (f"blocked by guardrail {blocked.rule!r} ({blocked.detector}, on the "
                f"{blocked.stage})")


@dataclass(frozen=True)
class _Check:
    """A detector of the stage's set, with the rules that use it."""

    detector: Detector
    label: str  # what `Guardrail.detector` says: email, injection:role_confusion, topic
    rules: tuple[GuardrailRule, ...]


def _topic_detector(topics: list[str]) -> Detector:
    words = "|".join(r"\s+".join(map(re.escape, t.split())) for t in topics)
    expression = rf"(?i)\b(?:{words})\b"
    return Detector("topic", (re.compile(expression),), probes=(Probe(expression),))


def _injection_detector(name: str) -> Detector:
    probe, confirm = INJECTION[name]
    return Detector(f"injection_{name}", (re.compile(confirm, re.IGNORECASE),),
                    probes=(Probe(f"(?i){probe}"),))


class _Stage:
    """The rules of one stage, compiled into one detector set."""

    def __init__(self, rules: list[GuardrailRule]) -> None:
        builtin = {d.name: d for d in BUILTIN}
        checks: list[_Check] = []
        for name in NAMES:  # built-ins in their own order: a more specific one wins overlaps
            users = tuple(r for r in rules if name in r.detectors)
            if users:
                checks.append(_Check(builtin[name], name, users))
        for name in INJECTION:
            users = tuple(r for r in rules if name in r.injection)  # type: ignore[operator]
            if users:
                checks.append(_Check(_injection_detector(name), f"injection:{name}", users))
        for rule in rules:
            if rule.topics:
                checks.append(_Check(_topic_detector(rule.topics), "topic", (rule,)))
        self.checks = checks
        self.rules = rules
        self._sets = [DetectorSet([c.detector for c in checks]) for _ in range(2)]

    def run(self, stage: str, texts: list[str], model: str | None, threaded: bool) -> Verdict:
        """One scan; `threaded` picks the detector set the thread owns (a set has one
        Hyperscan scratch space: the loop and the thread each scan with their own)."""
        verdict = Verdict()
        found = self._sets[threaded].find_all(texts)
        if not found:
            return verdict
        seen: set[tuple[str, str]] = set()
        masks: dict[int, list[tuple[int, int, str]]] = {}
        for index, spans in found.items():
            for start, end, which in spans:
                check = self.checks[which]
                for rule in check.rules:
                    if not rule.applies(stage, model):
                        continue
                    if (rule.name, check.label) not in seen:
                        seen.add((rule.name, check.label))
                        outcome = Guardrail(rule=rule.name, stage=cast(GuardrailStage, stage),
                                            action=cast(GuardrailAction, rule.action),
                                            detector=check.label)  # (both checked before)
                        verdict.fired.append(outcome)
                        if rule.action == "block" and verdict.blocked_by is None:
                            verdict.blocked_by = outcome
                    if rule.action == "redact":
                        masks.setdefault(index, []).append(
                            (start, end, f"<{check.detector.name.upper()}>"))
        for index, marks in masks.items():
            verdict.masked[index] = _masked(texts[index], marks)
        return verdict


def _masked(text: str, spans: list[tuple[int, int, str]]) -> str:
    parts, last = [], 0
    for start, end, placeholder in sorted(set(spans)):
        if start >= last:
            parts += [text[last:start], placeholder]
            last = end
    parts.append(text[last:])
    return "".join(parts)


class Guardrails:
    """The gateway's rules, by stage, and where their scans run."""

    def __init__(self, rules: list[GuardrailRule]) -> None:
        self.rules = rules
        self._stages = {stage: _Stage([r for r in rules if r.stage in (stage, "both")])
                        for stage in ("input", "output")}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="guardrails")

    def active(self, stage: str, model: str | None) -> bool:
        """Whether any rule of `stage` applies to calls of `model`."""
        return any(r.applies(stage, model) for r in self._stages[stage].rules)

    def holds(self, stage: str, model: str | None) -> bool:
        """Whether a rule of `stage` for `model` may change or stop the call (redact or
        block): then an answer is held until it has been checked."""
        return any(r.applies(stage, model) and r.action != "monitor"
                   for r in self._stages[stage].rules)

    async def check(self, stage: str, texts: list[str], model: str | None) -> Verdict:
        """The rules of `stage` on `texts`: on the loop when they are small, else in the
        guardrails' thread (one at a time; the loop serves other streams meanwhile)."""
        rules = self._stages[stage]
        if not rules.checks or not texts:
            return Verdict()
        if sum(map(len, texts)) <= INLINE_CHARS:
            return rules.run(stage, texts, model, threaded=False)
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, rules.run, stage, texts, model, True)

    async def guard(self, stage: str, body: Any, model: str | None) -> Verdict:
        """The rules of `stage` on the texts of a JSON body; what a `redact` rule masked
        is masked in `body` itself."""
        slots = text_slots(body)
        verdict = await self.check(stage, [container[key] for container, key in slots], model)
        for index, text in verdict.masked.items():
            container, key = slots[index]
            container[key] = text
        return verdict

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


# --- the texts of a body --------------------------------------------------------------

_TEXT_KEYS: Final = frozenset({"content", "text", "prompt", "input", "system",
                               "instructions", "response", "output_text"})
_MAX_DEPTH: Final = 32


def text_slots(body: Any) -> list[tuple[Any, Any]]:
    """Where a request or response body holds text a person or a model wrote: (container,
    key) of every string under a text key (`content`, `text`, `prompt`, `system`...), at
    any depth, in any provider's shape. Keys such as `model` or `role` are not text."""
    return list(_slots(body, None, 0))


def _slots(value: Any, key: Any, depth: int) -> Iterator[tuple[Any, Any]]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str):
                if k in _TEXT_KEYS:
                    yield value, k
            elif isinstance(v, dict | list):
                yield from _slots(v, k, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):
                if key in _TEXT_KEYS:
                    yield value, i
            elif isinstance(v, dict | list):
                yield from _slots(v, key, depth + 1)
