"""The built-in detectors of PII and secrets.

A detector is what its regular expressions match, kept by a check that a regex cannot
express (Luhn for card numbers, mod-97 for IBANs, a decodable header for JWTs, valid
ranges for SSNs and IP addresses, the words around a dotted quad). Python's `re`
scanning a text once per detector is far too slow for every prompt, so each built-in
detector also has probes: Hyperscan expressions that match wherever one of its
regexes could start a match (see `engine.py`, which scans all the probes at once).
The regex then runs only there, anchored (`pattern.match(text, start)`), which finds
what `pattern.finditer(text)` finds, provided the probes miss no start.

A probe is the regex with what Hyperscan cannot run taken out, so it matches more:
a lookbehind becomes the character before the match, consumed (`[^0-9A-Za-z]eyJ`
for `(?<![^\\W_])eyJ`), and is checked again in Python; lookaheads and backreferences
are dropped; and the probe stops where the rest would make it match at many ends (a
repeat of unbounded length), since each match costs a Python call. It must also have
one start per end: Hyperscan reports only the leftmost start of each end. Where a
probe matches and its regex does not, the regex says so; where the regex would match
and no probe does, a finding is lost: tests/test_redact_engine.py checks on random
text that the two ways find the same. Probes read the text through `image.py`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple

from meterline.processors.redact.image import ALNUMS, ANY_WORDS, LETTERS_I, caseless
from meterline.processors.redact.image import DIGITS as D
from meterline.processors.redact.image import WORDS as W


class Finding(NamedTuple):
    start: int
    end: int
    detector: int  # index in the redactor's detector list (lower wins an overlap)


Spans = list[tuple[int, int]]


@dataclass(frozen=True)
class Probe:
    """A Hyperscan expression for the detector's regex number `pattern`, whose matches
    begin `skip` characters before where the regex may (a boundary character)."""

    expression: str
    pattern: int = 0
    skip: int = 0
    # ASCII letters in either case, by Hyperscan's flag: caseless words spelt as classes
    # (`[tT][oO]...`) defeat its literal matcher (one such probe took the scan from 630 to
    # 223 MB/s); the regex must then be ASCII-caseless too (`re.ASCII`). (A probe whose
    # words are followed by a part of varying length costs as much: the start of its
    # match must be tracked. Words and one character after them are cheap.)
    caseless: bool = False


class Hits:
    """Where one detector's probes matched: (start, end) of each match, by probe. The
    text holds a batch of texts, each after a separator that no regex matches across,
    so that the regexes run on the whole of it; text k begins at `bases[k]`, and the
    last base is where a text after the last would begin."""

    __slots__ = ("bases", "probes")

    def __init__(self, probes: list[tuple[Probe, list[tuple[int, int]]]],
                 bases: list[int]) -> None:
        self.probes = probes
        self.bases = bases

    def starts(self, pattern: int = 0) -> list[int]:
        """Where regex number `pattern` may match, ascending."""
        found = [start + probe.skip for probe, hits in self.probes if probe.pattern == pattern
                 for start, _ in hits]
        found.sort()
        return found

    def ends(self, pattern: int = 0) -> list[int]:
        """Where the probes for regex number `pattern` matched up to, ascending."""
        found = [end for probe, hits in self.probes if probe.pattern == pattern
                 for _, end in hits]
        found.sort()
        return found

    def limit(self, position: int) -> int:
        """The end of the text that holds `position`."""
        return self.bases[bisect_right(self.bases, position)] - 1


@dataclass(frozen=True)
class Detector:
    """Patterns whose group named `value`, if they have one, is the finding (the token
    after "Bearer"), else the whole match. `spans`, where a detector has one, turns the
    matches into findings in its own way (an IBAN cut to its country's length)."""

    name: str
    patterns: tuple[re.Pattern[str], ...]
    valid: Callable[[str], bool] | None = None  # a further check of the matched text
    probes: tuple[Probe, ...] = ()  # none: the patterns scan every text (custom detectors)
    spans: Callable[[str, Hits | None], Spans] | None = None  # replaces the regex loop

    @property
    def placeholder(self) -> str:
        return f"<{self.name.upper()}>"

    def find(self, text: str, hits: Hits | None = None) -> Spans:
        """Spans of the findings in `text`, looked for where the probes' `hits` say, or
        everywhere (None): both give the same spans."""
        if self.spans is not None:
            return self.spans(text, hits)
        valid = self.valid
        spans = []
        for index, pattern in enumerate(self.patterns):
            group = "value" if "value" in pattern.groupindex else 0
            for m in _matches(pattern, text, hits, index):
                if valid is None or valid(m.group(group)):
                    spans.append(m.span(group))
        return spans


def _matches(pattern: re.Pattern[str], text: str, hits: Hits | None,
            index: int = 0) -> Iterable[re.Match[str]]:
    """What `pattern.finditer(text)` gives, tried only where the probes of regex number
    `index` matched when there are `hits`."""
    if hits is None:
        return pattern.finditer(text)
    found = []
    done = last = -1
    match = pattern.match
    for start in hits.starts(index):
        if start >= done and start != last:
            last = start
            m = match(text, start)  # a lookbehind still sees the text before `start`
            if m is not None:
                done = m.end()
                found.append(m)
    return found


# --- checks --------------------------------------------------------------------------

# Luhn sums mod 10 of a doubled digit, by byte (digits are ASCII here; other bytes keep
# the value the loop below gives them).
_DOUBLED = bytes((2 * (b - 48) - 9 if b - 48 > 4 else 2 * (b - 48)) % 10 for b in range(256))


def luhn(digits: str) -> bool:
    if digits.isascii():  # the sum of the bytes, in C
        raw = digits.encode()
        kept, doubled = raw[-1::-2], raw[-2::-2]
        return (sum(kept) - 48 * len(kept) + sum(doubled.translate(_DOUBLED))) % 10 == 0
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
    """`text`: digits, with single spaces or dashes between some."""
    digits = text.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match(digits) or not luhn(digits):
        return False
    if len(digits) == len(text):
        return True
    if " " in text and "-" in text:
        return False
    groups = tuple(map(len, text.split(" " if " " in text else "-")))
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
_BASE36 = {ord(c): str(int(c, 36)) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def iban_valid(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    if rearranged.isascii() and rearranged.isalnum():
        return int(rearranged.translate(_BASE36)) % 97 == 1
    try:  # digits of other scripts count; a letter such as the Kelvin sign does not
        return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1
    except ValueError:
        return False


# `_IBAN` matches from an IBAN's check digits (a digit is a cheaper place for the regex
# engine to start than any letter); the country code is the two letters before.
_IBAN = re.compile(r"\d{2}(?<=(?<!\w)[A-Za-z]{2}\d{2})(?: ?[A-Z0-9]){11,30}", re.IGNORECASE)


def _iban_spans(text: str, hits: Hits | None) -> Spans:
    """The loose match of `_IBAN` is cut to the country's length: being greedy, it may
    have taken the next word ("... 0130 00 AND")."""
    spans = []
    for m in _matches(_IBAN, text, hits):
        start = m.start() - 2
        want = IBAN_LENGTHS.get(text[start:m.start()].upper())
        if want is None:
            continue
        # the end of the first `want` characters but spaces (they come one at a time)
        end = start + want
        while (longer := start + want + text.count(" ", start, end)) != end:
            end = longer
        if end <= m.end() and not (end < len(text) and text[end].isalnum()) \
                and iban_valid(text[start:end]):
            spans.append((start, end))
    return spans


def _ssn(text: str) -> bool:
    area, group, serial = text[:3], text[4:6], text[7:]
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


def _ipv4_spans(text: str, hits: Hits | None) -> Spans:
    """Dotted quads that are addresses. Unspecified (0.), loopback (127.) and netmask
    (255.) quads are no one's address. One with an octet of 32 or more, or in 10/8, is
    taken as an address; one of small numbers only (3.2.1.4 is a section or a version
    far more often) needs an address's context: `DNS 8.8.8.8`, `host: 1.1.1.1`,
    `https://1.2.3.4`, `user@1.2.3.4`, `1.2.3.4:8080`, `1.2.3.0/24`."""
    spans = []
    for m in _matches(_IPV4, text, hits):
        octets = list(map(int, m.group().split(".")))
        if max(octets) > 255 or octets[0] in (0, 127, 255):
            continue
        start, end = m.span()
        # No context regex reaches across a separator, so the window needs no clipping
        # to the text in a batch.
        before = text[max(0, start - 40):start]
        if not (octets[0] == 10 or max(octets) >= 32 or _IPV4_AFTER.match(text, end)
                or (_may_name_address(before) and _IPV4_BEFORE.search(before))):
            continue
        if _may_name_version(before) and _NOT_ADDRESS_BEFORE.search(before):
            continue
        spans.append((start, end))
    return spans


# The context regexes are searches over 40 characters, several microseconds each; what
# they match ends in one of few characters (the words' last letters, under IGNORECASE,
# then separators), which rules most windows out first.
_ADDRESS_LAST = frozenset("pPsS\u017f4rRtTeEyYnNmMgGhHoOfF")
_VERSION_LAST = frozenset("vVnNeEdDrRcCgGpP\u00a7")
_CONTEXT_SEPARATORS = frozenset(":=\"'([,")


def _may_name_address(before: str) -> bool:
    """False where `_IPV4_BEFORE` cannot match `before`."""
    if before.endswith(("://", "@", "://\n", "@\n")):  # `$` matches before a last newline
        return True
    i = len(before)
    while i and (before[i - 1].isspace() or before[i - 1] in _CONTEXT_SEPARATORS):
        i -= 1
    return i > 0 and before[i - 1] in _ADDRESS_LAST


def _may_name_version(before: str) -> bool:
    """False where `_NOT_ADDRESS_BEFORE` cannot match `before`."""
    tail = before.rstrip()
    return tail.removesuffix(".")[-1:] in _VERSION_LAST


def _ipv6(text: str) -> bool:
    address = text.split("%", 1)[0]
    # `1::2` is a Python slice and `dead::beef` a C++ scope as often as an address:
    # ask for three groups (an embedded IPv4 address is two) and a digit.
    groups = sum(2 if "." in g else 1 for g in address.split(":") if g)
    if groups < 3 or not _HAS_DIGIT(address):
        return False
    if groups != 8 and "::" not in address:  # 12:00:01, a time; a quick no for ipaddress's
        return False
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified)


def _jwt(text: str) -> bool:
    header = text.split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    except (binascii.Error, ValueError):
        return False
    return decoded.startswith(b"{") and b'"alg"' in decoded


# The texts checked are ASCII but for the digits `\d` matched: what isdigit would say.
_HAS_DIGIT = re.compile(r"\d").search
_HAS_LETTER = re.compile(r"[A-Za-z]").search


def _mixed(text: str) -> bool:
    """Random tokens have letters and digits; `sk-your-key-here` has no digit."""
    return _HAS_DIGIT(text) is not None and _HAS_LETTER(text) is not None


def _token(text: str) -> bool:
    """A Hugging Face token is letters at random: `hf_` and a CamelCase name of 34 letters
    (`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`) is Python. A Discord token, three dotted
    parts with no marker, mixes letters and digits: a dotted name does not."""
    if text.startswith("hf_"):
        letters = text[3:]
        upper = sum(c.isupper() for c in letters)
        return upper >= 6 and len(letters) - upper >= 6
    return text.count(".") != 2 or _mixed(text)


def _random(value: str) -> bool:
    """A key, not a name: some part of it (between `_` and `-`) of 8 characters or more
    goes from letters to digits and back (a name ends in a version or a year, a key mixes
    them throughout). `MY_SERVICE_API_KEY_2024`, `ServiceAccount2024` are names."""
    return any(len(part) >= 8 and len(_RUNS(part)) >= 3 for part in _PARTS(value))


_PARTS = re.compile(r"[_-]").split
_RUNS = re.compile(r"[0-9]+|[^0-9]+").findall  # digits and the rest, alternating
# Where a value is named as a secret: `MISTRAL_API_KEY=...`, `"api-key": "..."`,
# `client_secret: ...`, `SessionToken: ...`, `password = '...'`. A bare `token` or `secret`
# ends no longer name (`NextToken`, `ChangeToken`: AWS's pagination and idempotency).
_SECRET_WORDS = ("api_key", "apikey", "access_token", "auth_token", "session_token",
                 "security_token", "refresh_token", "id_token", "private_token",
                 "client_secret", "secret_key", "password", "passwd")
_SECRET_SPELLINGS = "|".join(w.replace("_", "[_-]?") for w in _SECRET_WORDS)  # api-key...
_SECRET_NAME = f"{_SECRET_SPELLINGS}|(?<![A-Za-z])(?:token|secret)"
# A key may name several (`api_keys`, `passwords`: a list of them).
_SECRET_KEY = re.compile(rf"(?i:(?:{_SECRET_NAME})s?)\Z", re.ASCII).search


def secret_key(key: str) -> Callable[[str], bool] | None:
    """For a dict key that names a secret (`api_key`, `http.request.header.api-key`,
    `db.password`, `api_keys`: a name of `secret`'s, or its plural, ending the key), which
    of its string values are secrets: any but an empty one; under a bare `token` or
    `secret` (`llm.token`, where a log-probability entry's `token` is a word of the
    answer), those that read as keys, as in text. None for any other key."""
    found = _SECRET_KEY(key)
    if found is None:
        return None
    if found.group().lower().rstrip("s") in ("token", "secret"):
        return lambda value: len(value) >= 16 and _random(value)
    return bool


def _url_password(value: str) -> bool:
    """A password, not a template's stand-in for one (`${DB_PASSWORD}`, `<password>`,
    `[:<password>]`, `{pw}`, `****`, `%s`, `&lt;password&gt;`) nor a word documentation
    writes there."""
    return not (value[0] in "$<{[%*&" or value[-1] in ">}]" or value.lower() in _STAND_INS
                or _XS(value))


_XS = re.compile(r"x+", re.IGNORECASE).fullmatch
_STAND_INS = frozenset({"password", "passwd", "pass", "pwd", "secret", "changeme", "redacted"})


# The keys of other services that their first characters name (a marker, then what
# follows it), from the AI providers to the platforms a prompt's code or logs carry.
# Checked by hand against gitleaks' default rules; `tests/test_redact.py` has a sample of
# each.
_MARKED_KEYS: tuple[tuple[str, str], ...] = (
    # AI providers and their tools
    ("gsk_", "[A-Za-z0-9]{50,}"), ("xai-", "[A-Za-z0-9]{70,}"),  # Groq, xAI
    ("hf_", "[A-Za-z0-9]{30,}"), ("api_org_", "[A-Za-z]{34}"),  # Hugging Face
    ("r8_", "[A-Za-z0-9]{30,}"), ("pplx-", "[A-Za-z0-9]{40,}"),  # Replicate, Perplexity
    ("lsv2_(?:pt|sk)_", "[0-9a-f]{32}_[0-9a-f]{10}"),  # LangSmith
    ("ya29\\.", "[A-Za-z0-9_-]{20,}"),  # Google OAuth access tokens (Vertex AI callers)
    ("dapi", "[0-9a-f]{32,}"), ("4b1d", "[A-Za-z0-9]{38}"),  # Databricks, ClickHouse Cloud
    ("LTAI", "[A-Za-z0-9]{20}"),  # Alibaba Cloud (DashScope, Qwen)
    # code hosting, packages and CI
    ("gl(?:pat|dt|ft|soat|rt|cbt|imt|agent|oas|ptt|ffct)-", "[A-Za-z0-9_-]{20,}"),  # GitLab
    ("GR1348941", "[A-Za-z0-9_-]{20,}"),  # GitLab runner registration
    ("npm_", "[A-Za-z0-9]{36,}"), ("pypi-(?:AgEIcHlwaS5vcmc|AgENdGVzdC5weXBpLm9yZw)",
                                   "[A-Za-z0-9_-]{50,}"),
    ("rubygems_", "[a-f0-9]{48}"), ("AKC", "[A-Za-z0-9]{60,}"),  # RubyGems, Artifactory
    ("sgp_", "(?:[a-fA-F0-9]{16}_|local_)?[a-fA-F0-9]{40}"),  # Sourcegraph
    ("rdme_", "[a-z0-9]{70}"), ("pnu_", "[A-Za-z0-9]{36}"),  # ReadMe, Prefect
    ("pul-", "[a-f0-9]{40}"), ("ico-", "[A-Za-z0-9]{32}"),  # Pulumi, Infracost
    # clouds, hosting and databases
    ("do[opr]_v1_", "[a-f0-9]{64}"), ("HRKU-AA", "[A-Za-z0-9_-]{58}"),  # DigitalOcean, Heroku
    ("fo1_", "[A-Za-z0-9_-]{43}"), ("fm(?:1[ar]|2)_", "[A-Za-z0-9+/]{100,}=*"),  # Fly.io
    ("pscale_(?:tkn|oauth|pw)_", "[A-Za-z0-9_=.-]{32,64}"),  # PlanetScale
    ("tk-us-", "[A-Za-z0-9_-]{48}"), ("sha256~", "[A-Za-z0-9_-]{43}"),  # Scalingo, OpenShift
    ("v1\\.0-", "[a-f0-9]{24}-[a-f0-9]{146}"),  # Cloudflare origin CA
    ("hvs\\.", "[A-Za-z0-9_-]{90,120}"), ("hvb\\.", "[A-Za-z0-9_-]{138,300}"),  # Vault
    ("dp\\.pt\\.", "[A-Za-z0-9]{43}"), ("ops_eyJ", "[A-Za-z0-9+/]{250,}=*"),  # Doppler, 1Password
    ("AGE-SECRET-KEY-1", "[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}"),  # age
    # observability
    ("dt0c01\\.", "[A-Za-z0-9]{24}\\.[A-Za-z0-9]{64}"),  # Dynatrace
    ("glc_", "[A-Za-z0-9+/]{32,}=*"), ("glsa_", "[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}"),  # Grafana
    ("eyJrIjoi", "[A-Za-z0-9]{70,}=*"),  # Grafana API keys
    ("sntryu_", "[a-f0-9]{64}"), ("sntrys_eyJpYXQiO", "[A-Za-z0-9+/=_]{100,}"),  # Sentry
    ("NRAK-", "[A-Z0-9]{27}"), ("NRII-", "[A-Za-z0-9-]{32}"),  # New Relic
    # payments, commerce, messaging and productivity
    ("[sr]k_(?:live|test|prod)_", "[A-Za-z0-9]{24,}"),  # Stripe
    ("sq0csp-", "[A-Za-z0-9_-]{43}"), ("(?:sq0atp-|EAAA)", "[A-Za-z0-9_-]{22,60}"),  # Square
    ("shippo_(?:live|test)_", "[a-fA-F0-9]{40}"), ("shp(?:at|ca|pa|ss)_", "[a-fA-F0-9]{32}"),
    ("duffel_(?:test|live)_", "[A-Za-z0-9_=-]{43}"), ("EZ[AT]K", "[A-Za-z0-9]{54}"),  # EasyPost
    ("FLWSECK_TEST-", "[a-hA-H0-9]{32}-X"),  # Flutterwave
    ("SG\\.", "[A-Za-z0-9_-]{22}\\.[A-Za-z0-9_-]{43}"),  # SendGrid
    ("xkeysib-", "[a-f0-9]{64}-[A-Za-z0-9]{16}"),  # Brevo (Sendinblue)
    ("(?:AC|SK)", "[0-9a-f]{32}"),  # Twilio
    ("EAA[MC]", "[A-Za-z0-9]{100,}"),  # Facebook page tokens
    ("lin_api_", "[A-Za-z0-9]{40}"), ("ntn_", "[0-9]{11}[A-Za-z0-9]{35}"),  # Linear, Notion
    ("ATATT3", "[A-Za-z0-9_=-]{186}"),  # Atlassian
    ("PMAK-", "[a-fA-F0-9]{24}-[a-fA-F0-9]{34}"),  # Postman
    ("tfp_", "[A-Za-z0-9_=.-]{59}"), ("fio-u-", "[A-Za-z0-9_=-]{64}"),  # Typeform, Frame.io
    ("p8e-", "[A-Za-z0-9]{32}"), ("sl\\.", "[A-Za-z0-9_=-]{135}"),  # Adobe, Dropbox
)


_LITERAL = re.compile(r"(?:[A-Za-z0-9_-]|\\\.){4,}").fullmatch


def _marker_probes() -> tuple[Probe, ...]:
    """The probes of `_MARKED_KEYS`. Markers of four literal characters or more go in one
    expression (Hyperscan's literal matcher; rare enough in text to need nothing after
    them); each other one goes alone, with the key's first characters after it. All of
    them in one alternation followed by those characters took the scan from 3,000 MB/s to
    84 (the start of a match of varying length is tracked); so split, they cost nothing
    measurable."""
    literal = [m for m, _ in _MARKED_KEYS if _LITERAL(m)]
    return (Probe(rf"{_TOKEN_START}(?:{'|'.join(literal)})", skip=1),
            *(Probe(rf"{_TOKEN_START}(?:{m})[A-Za-z0-9_\-+/.=~]{{8}}", skip=1)
              for m, _ in _MARKED_KEYS if m not in literal))


# At most 64 characters before the `@`, as an address allows.
_EMAIL = re.compile(r"(?<![\w.%+-])\w[\w.%+'-]{0,63}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+"
                    r"[^\W\d_]{2,24}(?![\w-])")
# (none of them a top-level domain: `gpt-4o@prices.yaml`, a price file in `pricing_ref`)
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "css", "js", "ts", "py",
                            "json", "md", "txt", "html", "pdf", "ico", "yaml", "yml", "toml",
                            "csv", "xml", "ini", "cfg"})


def _email(text: str) -> bool:
    domain = text.rpartition("@")[2]
    # logo@2x.png is an asset, not an address
    return not (domain.count(".") == 1 and domain.rpartition(".")[2].lower() in _FILE_SUFFIXES)


def _email_spans(text: str, hits: Hits | None) -> Spans:
    found = _EMAIL.finditer(text) if hits is None else _email_matches(text, hits.ends())
    return [m.span() for m in found if _email(m.group())]


_LOCAL = re.compile(r"[\w.%+'-]*")  # what a local part is made of


def _email_matches(text: str, ends: list[int]) -> list[re.Match[str]]:
    """What `_EMAIL.finditer(text)` gives, from where the probe found an `@` after a
    character of a local part (it ends after the `@`). The address starts where that
    run of characters does, or after an apostrophe in it (`o'brien@`), within 64
    characters: `_EMAIL.match` there tells which."""
    found = []
    done = 0
    for end in ends:
        at = end - 1
        if at < done:  # inside the previous address
            continue
        low = max(done, at - 64)
        run = _LOCAL.match(text[low:at][::-1])  # the run, read backwards (may be empty)
        start = at - (run.end() if run else 0)
        m = _EMAIL.match(text, start)
        quote = text.find("'", start, at)
        while m is None and quote >= 0:
            m = _EMAIL.match(text, quote + 1)
            quote = text.find("'", quote + 1, at)
        if m is not None:
            done = m.end()
            found.append(m)
    return found


def _phone(text: str) -> bool:
    digits = len(text.translate(_PHONE_PUNCTUATION))  # all that `_PHONE` matches but digits
    if text.startswith("+"):
        return 8 <= digits <= 15
    if text.startswith("00"):  # the international prefix, as + is
        return not text.startswith("000") and 10 <= digits <= 17
    if text.startswith("0"):  # a trunk prefix, then an area code
        return 9 <= digits <= 12
    return digits == 10


_PHONE_PUNCTUATION = str.maketrans("", "", " .-()+")

_KEY_MARKER = r"(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
# (never across a NUL, which separates the texts of a batch and the fields of an event)
_PRIVATE_KEY = re.compile(rf"-----BEGIN {_KEY_MARKER}[^\x00]*?-----END {_KEY_MARKER}")


def _private_key_spans(text: str, hits: Hits | None) -> Spans:
    """A key runs from a BEGIN line (probe 0) to the first END line after it in its
    text, with no NUL between (probe 1, whose matches are exact): no regex scans the
    body, and a BEGIN with no END after it costs nothing."""
    if hits is None:
        return [m.span() for m in _PRIVATE_KEY.finditer(text)]
    ends = sorted(end for probe, found in hits.probes if probe.pattern == 1 for end in found)
    end_starts = [start for start, _ in ends]
    spans = []
    done = 0
    nul = -1  # the first NUL after the last BEGIN looked at (begins ascend: linear work)
    for begin, begin_end in sorted(b for probe, found in hits.probes if probe.pattern == 0
                                   for b in found):
        if begin >= done:
            i = bisect_left(end_starts, begin_end)
            if i == len(ends):
                break
            if nul < begin_end:
                nul = text.find("\x00", begin_end)
                nul = len(text) if nul < 0 else nul
            if ends[i][0] < min(nul, hits.limit(begin)):
                done = ends[i][1]
                spans.append((begin, done))
    return spans


# --- the detectors -------------------------------------------------------------------

_I = re.IGNORECASE
# A key's marker (`sk-`, `eyJ`, `ghp_`...) starts it wherever no letter or digit comes
# before: a dash or an underscore is where a program joined the key to what it put
# before it (`req-sk-proj-...`, `cache_ghp_...`, a file `openai-sk-...`), and taking it
# for a word character left such a key in clear. The markers are rare enough that this
# costs no false positive: none in 2.5 GB of code and documentation (a Python
# environment, /usr/share), where the one `-sk-` run long enough had no digit.
_KEY = r"(?<![^\W_])"
_TOKEN_START = rf"[^{ALNUMS}]"  # what `_KEY` lets through
# Patterns whose first element is a character class let the regex engine skip ahead to
# where one occurs; a leading lookbehind would not, so those come after the first
# character (`\d(?<![\d-]\d)` is "a digit not preceded by a digit or dash").
_PHONE = re.compile(
    r"[+(\d](?<![\w+.-][+(\d])(?<!\d[ .-][+(\d])"  # not the tail of a longer run of digits
    r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,5}"  # +44 20..
    r"|(?<=\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (415) 555-0132
    r"|(?<=\d)\d{2}[ .-]\d{3}[ .-]\d{4}"  # 415-555-0132
    r"|(?<=0)\d{1,4}(?:[ .-]\d{2,8}){1,4}"  # 020 7946 0958, 06 12 34 56 78
    r")(?![\w-]|\.\d)")
_PHONE_START = rf"[^{W}+.\-]"

# What an address `_ipv6` takes begins with three colons, groups of four digits at
# most between them (eight groups, or `::` and three groups or more), or else is one
# group, `::` and an IPv4 address. Not a time (12:00:01), nor `std::vector` in C++.
# (A probe that starts with a group rather than the colons costs Hyperscan much more
# on prose, for all its literal colons.)
_GROUP = "[0-9a-fA-F]{0,4}"
_IPV6_PROBES = (Probe(f"{_GROUP}:{_GROUP}:{_GROUP}:"),
                Probe(rf"{_GROUP}::[{D}]{{1,3}}\."))
# The detectors of runs of digits (and of the letters and digits of an IBAN). In a
# correlation key their findings are the id's own: a numeric id (Otoroshi's `@id` has 19
# digits) that begins as a card number does passes Luhn one time in ten, and one random
# 32-hex trace id in 1,300 holds a run of digits that does.
DIGIT_RUNS: Final = frozenset({"credit_card", "ssn", "phone", "ipv4", "iban"})
BUILTIN: tuple[Detector, ...] = (
    Detector("private_key", (_PRIVATE_KEY,), spans=_private_key_spans, probes=(
        Probe(f"-----BEGIN {_KEY_MARKER}"), Probe(f"-----END {_KEY_MARKER}", pattern=1))),
    Detector("jwt", (re.compile(
        rf"{_KEY}eyJ[A-Za-z0-9_-]{{8,}}\.eyJ[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]*"),),
        valid=_jwt, probes=(Probe(
            rf"{_TOKEN_START}eyJ[A-Za-z0-9_\-]{{8,}}\.eyJ[A-Za-z0-9_\-]{{8}}", skip=1),)),
    Detector("anthropic_key", (re.compile(
        rf"{_KEY}sk-ant-(?:api|admin|sid|oat)\d{{2}}-[A-Za-z0-9_-]{{32,}}"),),
        probes=(Probe(rf"{_TOKEN_START}sk-ant-(?:api|admin|sid|oat)[{D}]{{2}}-"
                      r"[A-Za-z0-9_\-]{32}", skip=1),)),
    Detector("openai_key", (re.compile(
        rf"{_KEY}sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{{20,}}"),),
        valid=_mixed, probes=(Probe(rf"{_TOKEN_START}sk-[A-Za-z0-9_\-]{{20}}", skip=1),)),
    Detector("github_token", (re.compile(
        rf"{_KEY}(?:gh[pousr]_[A-Za-z0-9]{{36,255}}|github_pat_[A-Za-z0-9_]{{22,255}})"),),
        probes=(Probe(rf"{_TOKEN_START}(?:gh[pousr]_[A-Za-z0-9]{{36}}|"
                      r"github_pat_[A-Za-z0-9_]{22})", skip=1),)),
    Detector("slack_token", (
        re.compile(rf"{_KEY}xox[abposre]-[A-Za-z0-9-]{{10,}}"),
        re.compile(rf"{_KEY}xapp-\d-[A-Za-z0-9-]{{10,}}"),
        re.compile(r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]+"),
    ), valid=_mixed, probes=(
        Probe(rf"{_TOKEN_START}xox[abposre]-[A-Za-z0-9\-]{{10}}", skip=1),
        Probe(rf"{_TOKEN_START}xapp-[{D}]-[A-Za-z0-9\-]{{10}}", pattern=1, skip=1),
        Probe(r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_\-]",
              pattern=2))),
    # a key is 39 characters: one joined to a word after it (`_prod`, `-old`) ends there
    Detector("google_api_key", (re.compile(rf"{_KEY}AIza[0-9A-Za-z_-]{{35}}(?![^\W_])"),),
             probes=(Probe(rf"{_TOKEN_START}AIza[0-9A-Za-z_\-]{{35}}", skip=1),)),
    # the keys of other services, known by their markers (`_MARKED_KEYS`); then an Azure
    # storage account's key (named in its connection string), a Discord bot's token, a
    # Telegram bot's secret (after its public id), a Mailchimp key, an Entra ID (Azure AD)
    # client secret and a Microsoft Teams webhook's path. Every format detect-secrets'
    # plugins know, but Artifactory's passwords (`AP` and a hex digit: `APIs...`), is
    # checked against it in tests/test_redact_reference.py.
    Detector("api_key", (
        re.compile(rf"{_KEY}(?:{'|'.join(m + rest for m, rest in _MARKED_KEYS)})"
                   r"(?![A-Za-z0-9])"),
        re.compile(r"AccountKey=(?P<value>[A-Za-z0-9+/]{86}==)"),
        re.compile(r"(?<![A-Za-z0-9_-])[MNO][A-Za-z0-9_-]{23,25}\.[A-Za-z0-9_-]{6}\."
                   r"[A-Za-z0-9_-]{27,38}(?![A-Za-z0-9_-])"),
        re.compile(r"(?<=[0-9]):(?P<value>AA[A-Za-z0-9_-]{33})(?![A-Za-z0-9_-])"),
        re.compile(r"(?<![0-9a-f])[0-9a-f]{32}-us[0-9]{1,2}(?![0-9])"),
        re.compile(r"(?<![A-Za-z0-9_~.-])[A-Za-z0-9_~.]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}"
                   r"(?![A-Za-z0-9_~.-])"),
        re.compile(r"\.webhook\.office\.com/webhookb2/(?P<value>[A-Za-z0-9@/_-]{60,})"),
    ), valid=_token, probes=(
        *_marker_probes(),
        Probe("AccountKey=", pattern=1),
        Probe(r"[^A-Za-z0-9_\-][MNO][A-Za-z0-9_\-]{23,25}\.[A-Za-z0-9_\-]{6}\.", pattern=2,
              skip=1),
        Probe(r"[0-9]:AA[A-Za-z0-9_\-]{16}", pattern=3, skip=1),
        Probe(r"[^0-9a-f][0-9a-f]{32}-us[0-9]", pattern=4, skip=1),
        Probe(r"[^A-Za-z0-9_~.\-][A-Za-z0-9_~.]{3}[0-9]Q~", pattern=5, skip=1),
        Probe(r"\.webhook\.office\.com/webhookb2/", pattern=6))),
    Detector("aws_key", (  # access key ids: AKIA long-term, ASIA temporary (STS)
        re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
        # a secret access key has no marker: it is known by what names it
        re.compile(r"(?i:aws)[\w .-]{0,20}?(?i:secret)[\w .-]{0,20}?[\"']?\s*[:=]\s*[\"']?"
                   r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
        re.compile(r"(?i:secret[_ -]?(?:access[_ -]?)?key)[\"']?(?:\s*[:=]\s*|\s+)[\"']?"
                   r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
    ), probes=(
        Probe(r"[^A-Z0-9](?:AKIA|ASIA)[A-Z0-9]{16}", skip=1),
        Probe(caseless("aws"), pattern=1),
        Probe(caseless("secret"), pattern=2))),
    # Bearer X, bearer_auth("X"), bearer: X, AUTH_BEARER_TOKEN='X' (a name joined by `_`)
    Detector("bearer_token", (re.compile(
        rf"{_KEY}(?i:bearer)(?:\s+|(?:[_-]?(?i:auth|token))?[\"']?\s*[:=(]\s*[\"']?)"
        r"(?P<value>[A-Za-z0-9._~+/-]{16,}=*)"),), valid=_mixed,
        probes=(Probe(rf"{_TOKEN_START}{caseless('bearer')}", skip=1),)),
    # the keys with no marker (Mistral's, Cohere's, Azure OpenAI's...), where a name says
    # what they are; after the detectors that know a key by its marker
    Detector("secret", (re.compile(
        rf"(?i:{_SECRET_NAME})[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9_~+/=-]{{16,}})"
        r"(?![A-Za-z0-9_~+/=>-])",  # (not a hash's placeholder: `<SECRET:3f9a0c1d2b4e5f67>`)
        re.ASCII),),
        valid=_random, probes=(Probe(
            rf"(?:{_SECRET_SPELLINGS}|token|secret)[\"'\s:=]", caseless=True),)),
    # the password of a URL's user (`postgresql://admin:S3cret@db:5432/app`, a DSN in
    # a prompt or an error): from the `://`, a probe of three characters every URL has
    Detector("url_password", (re.compile(
        r"://[^\s:/@\x00]{0,256}:(?P<value>[^\s:/@\x00]{1,256})@"),), valid=_url_password,
        probes=(Probe("://"),)),
    Detector("email", (_EMAIL,), spans=_email_spans,
             probes=(Probe(rf"[{ANY_WORDS}.%+'\-]@"),)),
    Detector("iban", (_IBAN,), spans=_iban_spans, probes=(
        Probe(rf"[^{W}][{LETTERS_I}]{{2}}[{D}]{{2}}(?: ?[0-9{LETTERS_I}]){{11}}", skip=3),)),
    Detector("credit_card", (re.compile(
        r"\d(?<![\d.,-]\d)(?:[ -]?\d){12,18}(?![\d-]|[.,]\d)"),), valid=_card,
        probes=(Probe(rf"[^{D}.,\-][{D}](?:[ \-]?[{D}]){{12}}", skip=1),)),
    Detector("ssn", (re.compile(r"\d(?<![\d-]\d)\d{2}([- ])\d{2}\1\d{4}(?![\d-])"),),
             valid=_ssn,
             probes=(Probe(rf"[^{D}\-][{D}]{{3}}[\- ][{D}]{{2}}[\- ][{D}]{{4}}", skip=1),)),
    Detector("ipv6", (re.compile(
        r"(?<![\w:.])(?=[0-9a-f:]*:[0-9a-f]*:)"
        r"(?:[0-9a-f:]{2,29}(?<=:)(?:\d{1,3}\.){3}\d{1,3}|[0-9a-f:]{2,39}(?!\.\d))"
        r"(?:%[\w.]+)?(?![\w:])", _I),),
        valid=_ipv6, probes=_IPV6_PROBES),
    Detector("ipv4", (_IPV4,), spans=_ipv4_spans, probes=(
        Probe(rf"[^{W}.][{D}]{{1,3}}\.[{D}]{{1,3}}\.[{D}]{{1,3}}\.[{D}]", skip=1),)),
    Detector("phone", (_PHONE,), valid=_phone, probes=(  # one probe per alternative
        Probe(rf"{_PHONE_START}\+[{D}]", skip=1),
        Probe(rf"{_PHONE_START}\([{D}]{{3}}\)", skip=1),
        Probe(rf"{_PHONE_START}[{D}]{{3}}[ .\-][{D}]{{3}}[ .\-][{D}]{{4}}", skip=1),
        Probe(rf"{_PHONE_START}0[{D}]{{1,4}}[ .\-][{D}]{{2}}", skip=1))),
)

NAMES = tuple(d.name for d in BUILTIN)
