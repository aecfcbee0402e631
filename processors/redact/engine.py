"""Detectors run together: one Hyperscan scan of a whole batch of texts finds where
any detector may match, and Python confirms those places only.

Why Hyperscan (`hyperscan`) rather than RE2's `re2.Set` (`google-re2`): a set says
which patterns match a text, not where, so each detector it names must still scan
the text for its matches, in RE2's Python wrapper (a match object per match, offsets
mapped back from UTF-8) or in Python's `re`. Hyperscan reports every match with its
start and end in the one pass. The probes of all 16 detectors over the same bytes,
one core:

                       Hyperscan: where       re2.Set: which      re2.Set, and RE2
                       (batch joined)         (per text)          for where
    prompts (bench)    1007 MB/s              301 MB/s            237 MB/s
    dense PII corpus     61 MB/s              131 MB/s             25 MB/s
    one 1 MB prompt     828 MB/s              665 MB/s             64 MB/s

Hyperscan's figures include a call into Python per match (about 0.25 us), so probes
are written to match once per place a regex may start. It cannot run lookarounds or
backreferences: the detectors' regexes keep them and run, anchored, where the probes
matched (see `detectors.py`).

A batch's texts are joined, with a separator no regex matches across, into one string:
one scan (a scan per text cost half as much again on the bench's prompts, 385 against
583 MB/s in a first measure), and the regexes run on that string at the probes'
offsets, so no offset is mapped to its text until it is a finding. Work stays linear
in the text: every confirmation is anchored and bounded, or resumes where the last
one ended, and overlaps between detectors are settled a cluster at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import accumulate
from operator import itemgetter
from typing import cast

import hyperscan

from meterline.processors.redact.detectors import Detector, Finding, Hits, Probe
from meterline.processors.redact.image import image

Span = tuple[int, int, int]  # a finding as a plain tuple: (start, end, detector)
SEPARATOR = "\x00"  # before each text: no regex matches it, and it reads as a text's edge


class DetectorSet:
    """Detectors run together on texts; their Hyperscan database is compiled once,
    here (a process builds its own: databases are not picklable). One scan at a time:
    the database has one scratch space, as a processor has one thread."""

    def __init__(self, detectors: list[Detector]) -> None:
        self.detectors = detectors
        self._unprobed = [i for i, d in enumerate(detectors) if not d.probes]
        # by detector: its probes and their ids in the database
        self._probed: list[tuple[int, Detector, list[tuple[Probe, int]]]] = []
        expressions: list[bytes] = []
        flags: list[int] = []
        for i, d in enumerate(detectors):
            if d.probes:
                ids = range(len(expressions), len(expressions) + len(d.probes))
                self._probed.append((i, d, list(zip(d.probes, ids, strict=True))))
                expressions += [p.expression.encode() for p in d.probes]
                flags += [hyperscan.HS_FLAG_SOM_LEFTMOST
                          | (hyperscan.HS_FLAG_CASELESS if p.caseless else 0) for p in d.probes]
        self._database: hyperscan.Database | None = None
        if expressions:
            self._database = hyperscan.Database()
            self._database.compile(expressions=expressions, ids=list(range(len(expressions))),
                                   elements=len(expressions), flags=flags)
        self._probe_count = len(expressions)

    def find(self, text: str) -> list[Finding]:
        """The findings in `text`, without overlaps, in text order."""
        return [Finding(*f) for f in self.find_all([text]).get(0, [])]

    def find_all(self, texts: Sequence[str]) -> dict[int, list[Span]]:
        """The findings in each of `texts` that has any, as `find` gives them but as
        plain tuples (start, end, detector), by index."""
        if not texts:
            return {}
        # where each text begins in the joined ones (and where one more would)
        bases = list(accumulate((len(t) + 1 for t in texts), initial=1))
        found = self._probe(texts, bases)
        for index in self._unprobed:
            scan = self.detectors[index].find
            for text, base in zip(texts, bases, strict=False):
                if SEPARATOR in text:  # as the built-ins, never across one (see `_segments`)
                    found += [(base + offset + start, base + offset + end, index)
                              for offset, segment in _segments(text)
                              for start, end in scan(segment)]
                else:
                    found += [(base + start, base + end, index) for start, end in scan(text)]
        return _by_text(_without_overlaps(found), bases) if found else {}

    def _probe(self, texts: Sequence[str], bases: list[int]) -> list[Span]:
        """What the probed detectors find in `texts`, in offsets of the texts joined."""
        if self._database is None:
            return []
        joined = SEPARATOR + SEPARATOR.join(texts)
        # One image of the whole, unless some text needs more than an encode: then the
        # others need not be searched for characters to mark.
        data = (joined.encode() if joined.isascii()
                else SEPARATOR.encode().join([b"", *map(image, texts)]))
        hits: list[list[tuple[int, int]]] = [[] for _ in range(self._probe_count)]
        self._database.scan(data, match_event_handler=_collect, context=hits)
        found: list[Span] = []
        for index, detector, probes in self._probed:
            mine = [(probe, hits[i]) for probe, i in probes if hits[i]]
            if mine:
                found += [(start, end, index)
                          for start, end in detector.find(joined, Hits(mine, bases))]
        return found


def _segments(text: str) -> list[tuple[int, str]]:
    """The parts of `text` between separators, with their offsets. A custom detector (a
    Python regex, no probe) scans each alone, so that it reads a text that joins several
    fields (see the processor) as it reads each field: `^`, `$` and lookbehinds at their
    edges, and no match across two of them."""
    parts = []
    offset = 0
    for segment in text.split(SEPARATOR):
        parts.append((offset, segment))
        offset += len(segment) + 1
    return parts


def _collect(probe: int, start: int, end: int, _flags: int, hits: object) -> None:
    cast(list[list[tuple[int, int]]], hits)[probe].append((start, end))


def _without_overlaps(found: list[Span]) -> list[Span]:
    """`found` sorted, where findings overlap only the one the detector listed first
    keeps (and of one detector's, the first in the text, then of its first regex).
    Only findings that overlap others need that settled, a cluster at a time."""
    found.sort(key=itemgetter(0))  # stable: at one start, in the order they were found
    kept: list[Span] = []
    cluster: list[Span] = []
    reach = -1  # where the cluster ends
    for f in found:
        if f[0] >= reach:
            if len(cluster) == 1:
                kept.append(cluster[0])
            elif cluster:
                kept += _settle(cluster)
            cluster = [f]
            reach = f[1]
        else:
            cluster.append(f)
            reach = max(reach, f[1])
    if len(cluster) == 1:
        kept.append(cluster[0])
    elif cluster:
        kept += _settle(cluster)
    return kept


def _settle(cluster: list[Span]) -> list[Span]:
    """The findings of `cluster` that are kept: in order of detector, then of start,
    each that overlaps none kept before it. One pass per detector against the ones
    kept (sorted and disjoint), so a long run of overlaps stays linear."""
    cluster.sort(key=lambda f: (f[2], f[0]))
    kept: list[Span] = []
    first = 0
    while first < len(cluster):
        detector = cluster[first][2]
        last = first
        while last < len(cluster) and cluster[last][2] == detector:
            last += 1
        accepted: list[Span] = []
        k, accepted_end = 0, -1
        for f in cluster[first:last]:
            start, end, _ = f
            while k < len(kept) and kept[k][1] <= start:
                k += 1
            if (k < len(kept) and kept[k][0] < end) or start < accepted_end:
                continue
            accepted.append(f)
            accepted_end = end
        kept = sorted(kept + accepted)
        first = last
    return kept


def _by_text(found: list[Span], bases: list[int]) -> dict[int, list[Span]]:
    """`found` (sorted, in offsets of the joined texts) by text, in the text's offsets."""
    by_text: dict[int, list[Span]] = {}
    index, base, following = -1, 0, 0
    current: list[Span] = []
    for start, end, detector in found:
        if start >= following:
            while start >= bases[index + 1]:
                index += 1
            base, following = bases[index], bases[index + 1]
            current = by_text[index] = []
        current.append((start - base, end - base, detector))
    return by_text


_BUILTIN: DetectorSet | None = None
_BUILTIN_LOCK = threading.Lock()  # one scan at a time (`DetectorSet`): callers are the
# event loop (a receiver's log line) and the processors' thread


def masked(texts: Sequence[str]) -> list[str]:
    """`texts` with what the built-in detectors find masked (`<EMAIL>`): for the values
    a component puts in its logs or self-metrics (a model name as a label), which no
    `redact` processor sees. The detectors are compiled on first use (about 60 ms, once
    per process: only where some value is refused or unpriced)."""
    global _BUILTIN
    with _BUILTIN_LOCK:
        if _BUILTIN is None:
            from meterline.processors.redact.detectors import BUILTIN
            _BUILTIN = DetectorSet(list(BUILTIN))
        found = _BUILTIN.find_all(texts)
    out = list(texts)
    for i, spans in found.items():
        text, parts, last = texts[i], [], 0
        for start, end, detector in spans:
            parts += [text[last:start], _BUILTIN.detectors[detector].placeholder]
            last = end
        out[i] = "".join(parts) + text[last:]
    return out
