"""The built-in detectors of PII and secrets, and how their findings are combined.

Each detector is one or more precompiled regular expressions plus, where a format
has one, a check that a regex cannot express (Luhn for card numbers, mod-97 for
IBANs, a decodable header for JWTs, valid ranges for SSNs and IP addresses). A
detector whose matches must contain some literal (`@` for e-mail, `eyJ` for a
JWT) names it, so that a text without it costs one substring search instead of a
regex scan. Where findings of several detectors overlap, the more specific one
wins (a JWT over a bearer token, an SSN over a phone number).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple


class Finding(NamedTuple):
    start: int
    end: int
    detector: int  # index in the redactor's detector list (lower wins an overlap)


@dataclass(frozen=True)
class Detector:
    """Patterns whose group named `value`, if they have one, is the finding (the token
    after "Bearer"), else the whole match."""

    name: str
    patterns: tuple[re.Pattern[str], ...]
    valid: Callable[[str], bool] | None = None  # a further check of the matched text
    needles: tuple[str, ...] = ()  # the text must contain one of these to match at all
    needs_number: bool = False  # matches hold 7+ digits or a dotted quad (see DetectorSet)
    spans: Callable[[str], Iterator[tuple[int, int]]] | None = None  # replaces the regex loop

    @property
    def placeholder(self) -> str:
        return f"<{self.name.upper()}>"

    def find(self, text: str) -> Iterator[tuple[int, int]]:
        """Spans of the findings in `text` (`needles` are the caller's to check)."""
        if self.spans is not None:
            yield from self.spans(text)
            return
        valid = self.valid
        for pattern in self.patterns:
            group = "value" if "value" in pattern.groupindex else 0
            for m in pattern.finditer(text):
                if valid is None or valid(m.group(group)):
                    yield m.span(group)


# --- checks --------------------------------------------------------------------------

def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes: Visa, Mastercard and Maestro (5x, 6x), Amex, Diners, JCB, Discover,
# UnionPay, RuPay.
_CARD_PREFIX = re.compile(r"^(?:4|5\d|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[689])|"
                          r"35(?:2[89]|[3-8])|6\d)")
_CARD_GROUPS = {(4, 4, 4, 4), (4, 6, 5), (4, 6, 4), (4, 4, 4, 4, 3), (4, 4, 4, 2), (4, 4, 4, 3)}


def _card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match(digits) or not luhn(digits):
        return False
    separators = set(re.sub(r"\d", "", text))
    if not separators:
        return True
    if len(separators) > 1:
        return False
    groups = tuple(len(g) for g in re.split(r"[ -]", text))
    return groups in _CARD_GROUPS


# Lengths of IBANs by country (the SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_valid(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _iban_spans(pattern: re.Pattern[str]) -> Callable[[str], Iterator[tuple[int, int]]]:
    """`pattern` matches from an IBAN's check digits (a digit is a cheaper place for the
    regex engine to start than any letter); the country code is the two letters before.
    The loose match is then cut to the country's length: being greedy, it may have
    taken the next word ("... 0130 00 AND")."""

    def find(text: str) -> Iterator[tuple[int, int]]:
        for m in pattern.finditer(text):
            start = m.start() - 2
            want = IBAN_LENGTHS.get(text[start:m.start()].upper())
            if want is None:
                continue
            count, end = 0, start
            for end in range(start, m.end()):
                if text[end] != " ":
                    count += 1
                    if count == want:
                        break
            end += 1
            if count == want and not (end < len(text) and text[end].isalnum()) \
                    and iban_valid(text[start:end]):
                yield start, end

    return find


def _ssn(text: str) -> bool:
    area, group, serial = re.split(r"[- ]", text)
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\.?\d|\w)")
# What makes a dotted quad of small numbers (8.8.8.8, 1.1.1.1) an address rather than
# a version or a section number: the words or syntax just before it, or a port or
# prefix length just after it.
_IPV4_BEFORE = re.compile(
    r"(?:\b(?:ips?|ipv4|ip\s+address(?:es)?|address(?:es)?|addr|hosts?|hostname|servers?|"
    r"dns|resolvers?|nameservers?|gateway|router|peers?|remote|client|origin|upstream|"
    r"proxy|ping|nslookup|dig|traceroute|ssh|connect(?:ing|ed)?\s+to)"
    r"\b[\s:=\"'(\[,]*(?:(?:is|was|at|of|on|to)\s+)?|://|@)$", re.IGNORECASE)
_IPV4_AFTER = re.compile(r":\d{1,5}\b|/\d{1,2}\b")  # matched right at the quad's end
# ... and what makes any dotted quad a version or a numbered part of a document
_NOT_ADDRESS_BEFORE = re.compile(r"(?:\b(?:v|version|release|build|rev|ver|section|sec|"
                                 r"figure|fig|chapter|table|step|clause)\.?\s*|§\s*)$",
                                 re.IGNORECASE)


def _ipv4_spans(text: str) -> Iterator[tuple[int, int]]:
    """Dotted quads that are addresses. Unspecified (0.), loopback (127.) and netmask
    (255.) quads are no one's address. One with an octet of 32 or more, or in 10/8, is
    taken as an address; one of small numbers only (3.2.1.4 is a section or a version
    far more often) needs an address's context: `DNS 8.8.8.8`, `host: 1.1.1.1`,
    `https://1.2.3.4`, `user@1.2.3.4`, `1.2.3.4:8080`, `1.2.3.0/24`."""
    for m in _IPV4.finditer(text):
        octets = [int(o) for o in m.group().split(".")]
        if max(octets) > 255 or octets[0] in (0, 127, 255):
            continue
        start, end = m.span()
        before = text[max(0, start - 40):start]
        if _NOT_ADDRESS_BEFORE.search(before):
            continue
        if (octets[0] == 10 or max(octets) >= 32 or _IPV4_BEFORE.search(before)
                or _IPV4_AFTER.match(text, end)):
            yield start, end


def _ipv6(text: str) -> bool:
    address = text.split("%", 1)[0]
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return False
    # `1::2` is a Python slice and `dead::beef` a C++ scope as often as an address:
    # ask for three groups (an embedded IPv4 address is two) and a digit.
    groups = sum(2 if "." in g else 1 for g in address.split(":") if g)
    return groups >= 3 and any(c.isdigit() for c in address)


def _jwt(text: str) -> bool:
    header = text.split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    except (binascii.Error, ValueError):
        return False
    return decoded.startswith(b"{") and b'"alg"' in decoded


def _mixed(text: str) -> bool:
    """Random tokens have letters and digits; `sk-your-key-here` has no digit."""
    return any(c.isdigit() for c in text) and any(c.isalpha() for c in text)


def _around_at(pattern: re.Pattern[str], valid: Callable[[str], bool]
               ) -> Callable[[str], Iterator[tuple[int, int]]]:
    """E-mail addresses are searched for only around each `@`, within the lengths an
    address allows (64 characters before it, 255 after): scanning the whole text from
    every word character would cost more than the rest of redaction."""

    def find(text: str) -> Iterator[tuple[int, int]]:
        at = text.find("@")
        done = 0
        while at >= 0:
            if at >= done:
                m = pattern.search(text, max(done, at - 64), at + 256)
                if m is not None and m.start() <= at:
                    if valid(m.group()):
                        yield m.span()
                    done = m.end()
            at = text.find("@", at + 1)

    return find


_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "css", "js", "ts", "py",
                            "json", "md", "txt", "html", "pdf", "ico"})


def _email(text: str) -> bool:
    domain = text.rpartition("@")[2]
    # logo@2x.png is an asset, not an address
    return not (domain.count(".") == 1 and domain.rpartition(".")[2].lower() in _FILE_SUFFIXES)


def _phone(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    if text.startswith("+"):
        return 8 <= digits <= 15
    if text.startswith("00"):  # the international prefix, as + is
        return not text.startswith("000") and 10 <= digits <= 17
    if text.startswith("0"):  # a trunk prefix, then an area code
        return 9 <= digits <= 12
    return digits == 10


# --- the detectors -------------------------------------------------------------------

_I = re.IGNORECASE
# Patterns whose first element is a character class let the regex engine skip ahead to
# where one occurs; a leading lookbehind would not, so those come after the first
# character (`\d(?<![\d-]\d)` is "a digit not preceded by a digit or dash").
_IBAN = re.compile(r"\d{2}(?<=(?<!\w)[A-Za-z]{2}\d{2})(?: ?[A-Z0-9]){11,30}", _I)
_EMAIL = re.compile(r"(?<![\w.%+-])\w[\w.%+'-]*@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+"
                    r"[^\W\d_]{2,24}(?![\w-])")
_PHONE = re.compile(
    r"[+(\d](?<![\w+.-][+(\d])(?<!\d[ .-][+(\d])"  # not the tail of a longer run of digits
    r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,5}"  # +44 20..
    r"|(?<=\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (415) 555-0132
    r"|(?<=\d)\d{2}[ .-]\d{3}[ .-]\d{4}"  # 415-555-0132
    r"|(?<=0)\d{1,4}(?:[ .-]\d{2,8}){1,4}"  # 020 7946 0958, 06 12 34 56 78
    r")(?![\w-]|\.\d)")

BUILTIN: tuple[Detector, ...] = (
    Detector("private_key", (re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),),
        needles=("PRIVATE KEY-----",)),
    Detector("jwt", (re.compile(
        r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),),
        valid=_jwt, needles=("eyJ",)),
    Detector("anthropic_key", (re.compile(
        r"(?<![\w-])sk-ant-(?:api|admin|sid|oat)\d{2}-[A-Za-z0-9_-]{32,}"),),
        needles=("sk-ant-",)),
    Detector("openai_key", (re.compile(
        r"(?<![\w-])sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),),
        valid=_mixed, needles=("sk-",)),
    Detector("github_token", (re.compile(
        r"(?<![\w])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"),),
        needles=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    Detector("slack_token", (
        re.compile(r"(?<![\w-])xox[abposre]-[A-Za-z0-9-]{10,}"),
        re.compile(r"(?<![\w-])xapp-\d-[A-Za-z0-9-]{10,}"),
        re.compile(r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]+"),
    ), valid=_mixed, needles=("xox", "xapp-", "hooks.slack.com")),
    Detector("google_api_key", (re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"),),
             needles=("AIza",)),
    Detector("aws_key", (  # access key ids: AKIA long-term, ASIA temporary (STS)
        re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
        # a secret access key has no marker: it is known by what names it
        re.compile(r"(?i:aws)[\w .-]{0,20}?(?i:secret)[\w .-]{0,20}?[\"']?\s*[:=]\s*[\"']?"
                   r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
        re.compile(r"(?i:secret[_ -]?(?:access[_ -]?)?key)[\"']?(?:\s*[:=]\s*|\s+)[\"']?"
                   r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
    ), needles=("AKIA", "ASIA", "ecret", "ECRET")),
    Detector("bearer_token", (re.compile(  # Bearer X, bearer_auth("X"), bearer_token = 'X'
        r"(?<![\w])(?i:bearer)(?:\s+|[_-]?(?i:auth|token)[\"']?\s*[:=(]\s*[\"']?)"
        r"(?P<value>[A-Za-z0-9._~+/-]{16,}=*)"),), valid=_mixed, needles=("earer", "EARER")),
    Detector("email", (_EMAIL,), spans=_around_at(_EMAIL, _email), needles=("@",)),
    Detector("iban", (_IBAN,), spans=_iban_spans(_IBAN), needs_number=True),
    Detector("credit_card", (re.compile(
        r"\d(?<![\d.,-]\d)(?:[ -]?\d){12,18}(?![\d-]|[.,]\d)"),), valid=_card, needs_number=True),
    Detector("ssn", (re.compile(r"\d(?<![\d-]\d)\d{2}([- ])\d{2}\1\d{4}(?![\d-])"),),
             valid=_ssn, needs_number=True),
    Detector("ipv6", (re.compile(
        r"(?<![\w:.])(?=[0-9a-f:]*:[0-9a-f]*:)"
        r"(?:[0-9a-f:]{2,29}(?<=:)(?:\d{1,3}\.){3}\d{1,3}|[0-9a-f:]{2,39}(?!\.\d))"
        r"(?:%[\w.]+)?(?![\w:])", _I),),
        valid=_ipv6, needles=(":",)),
    Detector("ipv4", (_IPV4,), spans=_ipv4_spans, needs_number=True),
    Detector("phone", (_PHONE,), valid=_phone, needs_number=True),
)

NAMES = tuple(d.name for d in BUILTIN)


# Phone, card, SSN and IBAN numbers hold a run of 7+ digits (separators allowed), an
# IPv4 address a dotted quad: a text with neither (prose with a year or a price in it)
# skips their five regex scans.
_NUMBER = re.compile(r"\d(?:[ ().+/-]{0,2}\d){6}|\d\.\d{1,3}\.\d{1,3}\.\d")


class DetectorSet:
    """Detectors run together on a text. Which ones can match at all is settled first
    (their needles; a long enough number), so that a text where none can costs a few
    substring searches rather than a regex scan per detector."""

    def __init__(self, detectors: list[Detector]) -> None:
        self.detectors = detectors
        self.always = [i for i, d in enumerate(detectors)
                       if not d.needles and not d.needs_number]
        self.numeric = [i for i, d in enumerate(detectors) if d.needs_number]
        self.by_needle: dict[str, list[int]] = {}
        for i, d in enumerate(detectors):
            for needle in d.needles:
                self.by_needle.setdefault(needle, []).append(i)

    def candidates(self, text: str) -> list[int]:
        """The detectors that can match somewhere in `text`."""
        found = set(self.always)
        for needle, indexes in self.by_needle.items():
            if needle in text:
                found.update(indexes)
        if self.numeric and any(d in text for d in "0123456789") \
                and _NUMBER.search(text) is not None:
            found.update(self.numeric)
        return sorted(found)

    def find(self, text: str, candidates: list[int] | None = None) -> list[Finding]:
        """The findings in `text` of the detectors (or of `candidates` among them),
        without overlaps, in text order."""
        if candidates is None:
            candidates = self.candidates(text)
        found: list[Finding] = []
        for index in candidates:
            found.extend(Finding(start, end, index)
                         for start, end in self.detectors[index].find(text))
        if len(found) < 2:
            return found
        found.sort(key=lambda f: (f.detector, f.start))
        kept: list[Finding] = []
        for f in found:
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
        kept.sort()
        return kept
