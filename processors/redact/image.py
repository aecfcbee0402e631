"""The bytes Hyperscan scans for a text: one byte per character, so that an offset in
them is an offset in the text.

ASCII text is its own image, the cheap and common case. Other text is encoded as
Latin-1, each character past it as `?`, and then the few characters a probe
(`detectors.py`) must tell apart are marked with bytes of their own: a decimal digit
of another script (Python's `\\d` matches it) and a letter that folds to an ASCII i,
s or k under IGNORECASE (dotless i, dotted capital I, long s, the Kelvin sign). The
C1 controls, whose Latin-1 bytes those marks use, become a plain non-ASCII byte.

So the image does not tell a letter from a mark past ASCII: a probe reads such a
byte (and `?`) as either, outside a word where it asks for a boundary, inside one
where it asks for a word character, and the regex behind it decides. Telling them
apart would cost a Python call per character, or per run of them (an encoding error
handler): 10 to 20 MB/s on French or on English with typographic quotes. This is an
encode and a count in C, and a regex search where there are characters past Latin-1.

UTF-8 would also give Hyperscan the text, but its offsets are bytes, and mapping them
back to characters costs a pass over the text per finding; Hyperscan's own Unicode
tables (UCP mode) also lag Python's by several Unicode versions.
"""

from __future__ import annotations

import re

OTHER = 0x80  # a C1 control: a non-ASCII character like any other
DIGIT = 0x81  # a decimal digit past Latin-1 (there are none in it)
FOLD_I, FOLD_S, FOLD_K = 0x82, 0x83, 0x84  # match `(?i)i`, `(?i)s`, `(?i)k`

# Class bodies for probe expressions (Hyperscan syntax, inside [...]).
DIGITS = r"0-9\x81"  # what `\d` matches
ALNUMS = r"0-9A-Za-z\x81-\x84"  # letters and digits for sure: what `[^\W_]` matches
WORDS = ALNUMS + "_"  # word characters for sure: `[^{WORDS}]` is a boundary
ANY_WORDS = r"0-9A-Za-z_?\x80-\xff"  # and any that may be one
LETTERS_I = r"A-Za-z\x82-\x84"  # [A-Za-z] under IGNORECASE

_MARKED = {"\u0130": FOLD_I, "\u0131": FOLD_I, "\u017f": FOLD_S, "\u212a": FOLD_K}


def _marks() -> re.Pattern[str]:
    """The characters to mark in the Basic Multilingual Plane: its decimal digits past
    Latin-1 (ranges, which a regex tests far faster than a category), and `_MARKED`."""
    ranges: list[list[int]] = []
    for code in range(0x100, 0x10000):
        if chr(code).isdecimal():
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return re.compile(f"[{''.join(f'{chr(a)}-{chr(b)}' for a, b in ranges)}{''.join(_MARKED)}]")


_MARKS = _marks()
_ASTRAL_DIGITS = re.compile(r"[^\D\x00-\uffff]")
_C1 = bytes.maketrans(bytes(range(0x81, 0xA0)), bytes([OTHER]) * 0x1F)


def image(text: str) -> bytes | bytearray:
    """`text` as Hyperscan scans it (see the module's docstring)."""
    if text.isascii():
        return text.encode("ascii")
    data = text.encode("latin-1", "replace").translate(_C1)
    if data.count(b"?") == text.count("?"):  # nothing past Latin-1
        return data
    marked = bytearray(data)
    for m in _MARKS.finditer(text):
        marked[m.start()] = _MARKED.get(m.group(), DIGIT)
    if len(text.encode("utf-16-le", "surrogatepass")) > 2 * len(text):  # emoji, and the like
        for m in _ASTRAL_DIGITS.finditer(text):
            marked[m.start()] = DIGIT
    return marked


def caseless(word: str) -> str:
    """A probe expression matching `word` as `(?i:word)` matches in Python: ASCII
    letters in either case, and the non-ASCII letters that fold to i, s and k."""
    folds = {"i": r"\x82", "s": r"\x83", "k": r"\x84"}
    return "".join(f"[{c.lower()}{c.upper()}{folds.get(c.lower(), '')}]" if c.isalpha()
                   else c for c in word)
