"""The redact detectors against a reference that is not ours: every secret format that
Yelp's detect-secrets (1.5) knows by its shape, and flags in a line, is found by the
built-in detectors too, in the three places a prompt carries one (prose, a JSON value, an
assignment).

The samples are seeded random values of the real formats. Each is first checked against
detect-secrets' own plugins (not its entropy or keyword heuristics): a sample the reference
does not flag proves nothing. Kept apart on purpose: Artifactory's encrypted passwords
(`AP` and a hex digit, then 8 letters or digits: `APIClient...` reads as one), and
detect-secrets' high-entropy strings and keywords, which `secret` covers by name instead.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable

import pytest
from detect_secrets.core.scan import scan_line
from detect_secrets.settings import default_settings

from meterline.processors.redact.detectors import BUILTIN
from meterline.processors.redact.engine import DetectorSet

ENGINE = DetectorSet(list(BUILTIN))
ALNUM = string.ascii_letters + string.digits
TOKEN = ALNUM + "_-"
HEX = "0123456789abcdef"
HEURISTICS = ("High Entropy", "Keyword")  # the reference's guesses, not formats


def chars(rng: random.Random, n: int, alphabet: str = ALNUM) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(rng: random.Random) -> str:
    """A token whose header and claims decode (the reference checks that they do)."""
    claims = {"sub": chars(rng, 12), "iat": rng.randint(10**9, 2 * 10**9)}
    return (f"{b64(json.dumps({'alg': 'HS256'}).encode())}."
            f"{b64(json.dumps(claims).encode())}.{chars(rng, 43, TOKEN)}")


# format -> a sample: (the text written, the part of it that is the secret)
Sample = tuple[str, str]
FORMATS: dict[str, Callable[[random.Random], Sample]] = {
    "artifactory": lambda r: (s := "AKCp" + chars(r, 69), s),
    "azure_storage": lambda r: (
        f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey="
        f"{(k := chars(r, 86, ALNUM + '+/') + '==')};EndpointSuffix=core.windows.net", k),
    "discord": lambda r: (
        s := f"M{chars(r, 23, TOKEN)}.{chars(r, 6, TOKEN)}.{chars(r, 27, TOKEN)}", s),
    "github": lambda r: (s := f"{r.choice(['ghp', 'gho', 'ghu', 'ghs', 'ghr'])}_{chars(r, 36)}", s),
    "gitlab": lambda r: (s := f"{r.choice(['glpat', 'gldt', 'glft', 'glsoat', 'glrt'])}-"
                              f"{chars(r, 20, TOKEN)}", s),
    "gitlab_runner_registration": lambda r: (s := "GR1348941" + chars(r, 20, TOKEN), s),
    "gitlab_incoming_mail": lambda r: (s := "glimt-" + chars(r, 25, TOKEN), s),
    "mailchimp": lambda r: (s := f"{chars(r, 32, HEX)}-us{r.randint(1, 21)}", s),
    "npm": lambda r: (f"//registry.npmjs.org/:_authToken=npm_{(k := chars(r, 36))}", "npm_" + k),
    "openai": lambda r: (s := f"sk-{chars(r, 20)}T3BlbkFJ{chars(r, 20)}", s),
    "pypi": lambda r: (s := "pypi-AgEIcHlwaS5vcmc" + chars(r, 80, TOKEN), s),
    "sendgrid": lambda r: (s := f"SG.{chars(r, 22, TOKEN)}.{chars(r, 43, TOKEN)}", s),
    "square": lambda r: (s := "sq0csp-" + chars(r, 43, TOKEN), s),
    "stripe": lambda r: (s := f"{r.choice(['sk', 'rk'])}_live_{chars(r, 24)}", s),
    "telegram": lambda r: (f"{r.randint(10**8, 10**9)}:{(k := 'AA' + chars(r, 33, TOKEN))}", k),
    "twilio": lambda r: (s := r.choice(["AC", "SK"]) + chars(r, 32, HEX), s),
    "slack": lambda r: (s := f"xoxb-{r.randint(10**9, 10**10)}-{r.randint(10**9, 10**10)}-"
                             f"{chars(r, 24, string.ascii_lowercase + string.digits)}", s),
    "basic_auth": lambda r: (f"https://deploy:{(k := chars(r, 14))}@git.acme.example/a.git", k),
    "aws": lambda r: (s := "AKIA" + chars(r, 16, string.ascii_uppercase + string.digits), s),
    "jwt": lambda r: (s := jwt(r), s),
}
PLACES = {
    "prose": "The deploy fails and the log shows {} right before the 401. Any idea?",
    "json": '{{"name": "ci", "credential": "{}", "region": "eu-west-1"}}',
    "assignment": "CREDENTIAL={}\nREGION=eu-west-1",
}


def samples(name: str) -> list[Sample]:
    rng = random.Random(f"{name}-2026")
    return [FORMATS[name](rng) for _ in range(5)]


def flagged_by_the_reference(line: str) -> list[str]:
    with default_settings():
        return [s.type for s in scan_line(line)
                if not any(h in s.type for h in HEURISTICS)]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", FORMATS)
def test_every_secret_format_of_detect_secrets_is_found(name: str, place: str) -> None:
    for written, secret in samples(name):
        line = PLACES[place].format(written)
        assert flagged_by_the_reference(line), f"not a {name} secret to detect-secrets: {line}"
        start = line.index(secret)
        found = ENGINE.find(line)
        assert any(f.start <= start and f.end >= start + len(secret) for f in found), (
            f"{name} in {place} left in clear: {line!r}, found {found}")
