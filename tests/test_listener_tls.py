"""TLS on every listener (`tls` of `meterline.httpserver.ListenerConfig`): the webhook,
OTLP over HTTP and gRPC, the gateway, the admin server and the Prometheus scrape."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import grpc
import msgspec
import openai
import pytest
import trustme
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from meterline.config import convert
from meterline.gateway.fakeupstream import FakeUpstream
from meterline.tls import ServerTlsConfig
from tests.gateway_helpers import gateway, openai_upstream
from tests.helpers import (
    eventually,
    free_port,
    make_event,
    pipeline,
    read_jsonl,
    running,
    webhook_to_file,
)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    """A `tls` block: a certificate for 127.0.0.1 signed by `ca`."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(tmp_path / "cert.pem", append=True)
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    return {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")}


def trusting(ca: trustme.CA, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


async def post(url: str, context: ssl.SSLContext | bool, events: list[dict]) -> int:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=msgspec.json.encode(events), ssl=context,
            headers={"content-type": "application/json"}) as r:
        return r.status


EVENT = msgspec.to_builtins(make_event(1))


async def test_the_webhook_serves_https_with_its_certificate(tmp_path, ca, tls):
    port = free_port()
    async with running(webhook_to_file(port, {"tls": tls}), tmp_path):
        assert await post(f"https://127.0.0.1:{port}/v1/events", trusting(ca), [EVENT]) == 200
        await eventually(lambda: (tmp_path / "data" / "out.jsonl").exists()
                         and read_jsonl(tmp_path / "data" / "out.jsonl"))


async def test_a_plain_http_request_to_a_tls_listener_gets_no_answer(tmp_path, tls):
    port = free_port()
    async with running(webhook_to_file(port, {"tls": tls}), tmp_path):
        with pytest.raises(aiohttp.ClientError):
            await post(f"http://127.0.0.1:{port}/v1/events", False, [EVENT])


async def test_with_client_cas_a_client_without_a_certificate_is_refused(tmp_path, ca, tls):
    clients = trustme.CA()
    clients.cert_pem.write_to_path(tmp_path / "clients.pem")
    port = free_port()
    mutual = {**tls, "client_ca_file": str(tmp_path / "clients.pem")}
    async with running(webhook_to_file(port, {"tls": mutual}), tmp_path):
        url = f"https://127.0.0.1:{port}/v1/events"
        with pytest.raises(aiohttp.ClientError):
            await post(url, trusting(ca), [EVENT])
        signed = clients.issue_cert("collector@example.com")
        assert await post(url, trusting(ca, signed), [EVENT]) == 200


async def test_otlp_over_grpc_with_tls_takes_the_sdks_spans(tmp_path, ca, tls):
    port = free_port()
    body = pipeline({"otlp": {"grpc": f"127.0.0.1:{port}", "http": None, "tls": tls}})
    async with running(body, tmp_path):
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        exporter = OTLPSpanExporter(endpoint=f"localhost:{port}", credentials=credentials)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))

        def traced_call() -> None:  # exported as it ends: off the loop the receiver runs on
            with provider.get_tracer("t").start_as_current_span("chat gpt-4o") as span:
                span.set_attributes({"gen_ai.operation.name": "chat",
                                     "gen_ai.request.model": "gpt-4o"})
            provider.shutdown()

        await asyncio.to_thread(traced_call)
        out = tmp_path / "data" / "out.jsonl"
        [event] = await eventually(lambda: out.exists() and read_jsonl(out))
    assert event["request_model"] == "gpt-4o"


async def test_the_gateway_serves_https_to_the_openai_sdk(ca, tls):
    async with FakeUpstream() as fake, gateway({"openai": openai_upstream(fake.url)},
                                               tls=tls) as gw:
        client = openai.AsyncOpenAI(
            base_url=f"https://127.0.0.1:{gw.proxy.port}/v1", api_key="sk-client",
            max_retries=0, http_client=openai.DefaultAsyncHttpxClient(verify=trusting(ca)))
        gw.clients.append(client)
        reply = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content


async def test_the_admin_server_and_the_prometheus_scrape_serve_https(tmp_path, ca, tls):
    admin, scrape = free_port(), free_port()
    body = pipeline({"webhook": {"listen": f"127.0.0.1:{free_port()}"}},
                    exporters={"prometheus": {"listen": f"127.0.0.1:{scrape}", "tls": tls}},
                    service={"admin": {"listen": f"127.0.0.1:{admin}", "tls": tls}})
    async with running(body, tmp_path), aiohttp.ClientSession() as session:
        for url in (f"https://127.0.0.1:{admin}/healthz", f"https://127.0.0.1:{scrape}/metrics"):
            async with session.get(url, ssl=trusting(ca)) as r:
                assert r.status == 200, url


def test_a_missing_certificate_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(msgspec.ValidationError, match="cert_file: no such file"):
        convert({"cert_file": str(tmp_path / "nope.pem"), "key_file": str(tmp_path / "k")},
                ServerTlsConfig)


def test_a_key_that_is_not_the_certificates_is_a_config_error(tmp_path, ca, tls):
    other = ca.issue_cert("other")
    other.private_key_pem.write_to_path(tmp_path / "other-key.pem")
    with pytest.raises(msgspec.ValidationError, match="cannot load the certificates"):
        convert({**tls, "key_file": str(tmp_path / "other-key.pem")}, ServerTlsConfig)
