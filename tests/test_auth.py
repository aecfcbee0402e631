"""The bearer-token check every listener with an `auth_token` uses (`meterline.auth`)."""

import json

from meterline.auth import REFUSAL, BearerToken, unauthorised


def test_without_a_token_every_request_is_admitted():
    assert BearerToken(None).admits(None)
    assert BearerToken("").admits("Bearer anything")


def test_the_exact_bearer_header_is_admitted():
    assert BearerToken("s3cret").admits("Bearer s3cret")


def test_a_wrong_token_is_refused():
    assert not BearerToken("s3cret").admits("Bearer s3cret2")


def test_a_missing_header_is_refused():
    assert not BearerToken("s3cret").admits(None)


def test_the_token_without_the_bearer_scheme_is_refused():
    assert not BearerToken("s3cret").admits("s3cret")


def test_the_refusal_is_a_401_with_a_json_error():
    answer = unauthorised()
    assert answer.status == 401
    assert json.loads(answer.body) == {"error": REFUSAL}


def test_the_plain_text_refusal_is_a_401_with_one_line():
    answer = unauthorised(plain_text=True)
    assert (answer.status, answer.text) == (401, f"{REFUSAL}\n")
