"""Provider keys an upstream's error body echoes are kept out of the event's
`error_message` (with or without a `redact` processor); the client still gets the
upstream's body unchanged: it sent that key itself."""

import anthropic
import openai
import pytest

from meterline.event import to_json
from meterline.gateway.fakeupstream import FakeUpstream
from meterline.gateway.proxy import SECRET_MARKER, scrub_secrets
from tests.gateway_helpers import gateway, openai_upstream

MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-proj-Q3x9TzLm4Kp7Vw2Rb8Nc5Hd1Jf6Gs0Ya3Ue7Wi2Oq9Zl4"


@pytest.fixture
async def fake():
    async with FakeUpstream() as upstream:
        yield upstream


async def test_an_openai_401_echoing_the_masked_key_is_recorded_without_it(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        with pytest.raises(openai.AuthenticationError) as caught:
            await gw.openai(key=KEY).chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-echo-key": "masked"})
        event = gw.event
    masked = KEY[:8] + "*" * (len(KEY) - 12) + KEY[-4:]
    assert caught.value.body["message"] == (  # the upstream's body, unchanged
        f"Incorrect API key provided: {masked}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.")
    assert event.error_message == (
        f"Incorrect API key provided: {SECRET_MARKER}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.")
    assert event.error_type == "authentication_error"


async def test_a_proxy_echoing_the_bearer_value_in_clear_is_recorded_without_it(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        with pytest.raises(openai.AuthenticationError) as caught:
            await gw.openai(key=KEY).chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-echo-key": "clear"})
        event = gw.event
    assert f"Bearer {KEY}" in caught.value.body["message"]
    assert KEY[:12] not in to_json(event).decode()
    assert event.error_message.startswith(
        f"Incorrect API key provided: Bearer {SECRET_MARKER}.")


async def test_an_anthropic_error_echoing_the_x_api_key_is_recorded_without_it(fake):
    key = "sk-ant-api03-" + KEY[8:]
    upstreams = {"anthropic": {"base_url": fake.url, "provider": "anthropic"}}
    async with gateway(upstreams) as gw:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await gw.anthropic(key=key).messages.create(
                model="claude", max_tokens=5, messages=MESSAGES,
                extra_headers={"x-fake-echo-key": "clear", "x-api-key": key})
        event = gw.event
    assert caught.value.body["error"]["message"] == f"invalid x-api-key: {key}"
    assert event.error_message == f"invalid x-api-key: {SECRET_MARKER}"


async def test_the_key_the_gateway_injects_is_kept_from_the_event_and_the_client(fake):
    upstream = openai_upstream(fake.url, api_key="gw-upstream-key-0123456789")
    async with gateway({"openai": upstream}) as gw:
        with pytest.raises(openai.AuthenticationError) as caught:
            await gw.openai(key="sk-client").chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-echo-key": "clear"})
        event = gw.event
    # the client never had that key: the body it gets has the marker in its place
    assert caught.value.body["message"].startswith(
        f"Incorrect API key provided: Bearer {SECRET_MARKER}.")
    assert caught.value.body["code"] == "invalid_api_key"
    assert event.error_message.startswith(
        f"Incorrect API key provided: Bearer {SECRET_MARKER}.")
    assert "0123456789" not in event.error_message


@pytest.mark.parametrize("message", [
    "invalid key sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345 for this org",
    "Incorrect API key provided: sk-abc12****************************wxyz.",
    "upstream said: Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig failed",
    "API key not valid: AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "no such key_sk-abcdefghij0123456789 in the vault",
    "unknown config_AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
])
def test_key_shaped_words_are_scrubbed_without_knowing_the_key(message):
    scrubbed = scrub_secrets(message, [])
    assert SECRET_MARKER in scrubbed
    assert not any(part in scrubbed for part in ("abcdefghij", "abc12", "eyJhb", "AIzaSy"))


@pytest.mark.parametrize("message", [
    "fake upstream error 500",
    "Bearer token is missing",
    "model 'gpt-4o-mini' not found; see https://platform.openai.com/docs/models",
    "the gateway stopped before the response ended",
])
def test_ordinary_error_messages_are_left_as_they_are(message):
    assert scrub_secrets(message, [KEY, "sk-client"]) == message
