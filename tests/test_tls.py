"""Client TLS (`meterline.tls`), the one `tls` block of the Kafka and OTLP components."""

import asyncio
import ssl

import msgspec
import pytest
import trustme

from meterline.config import convert
from meterline.tls import ServerTlsConfig, TlsConfig, client_context


@pytest.fixture
def ca():
    return trustme.CA()


async def handshake(server_context: ssl.SSLContext, client: ssl.SSLContext) -> dict | None:
    """Connect to a local TLS server as `localhost`; the client certificate it saw."""
    seen: list[dict | None] = []

    async def serve(reader, writer):
        seen.append(writer.get_extra_info("peercert"))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                  server_hostname="localhost")
        writer.close()
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
    finally:
        server.close()
    return seen[0] if seen else None


def server_context(ca: trustme.CA, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_the_context_trusts_a_server_signed_by_the_configured_ca(tmp_path, ca):
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    tls = convert({"ca_file": str(tmp_path / "ca.pem")}, TlsConfig)
    await handshake(server_context(ca), client_context(tls))  # no SSLError


async def test_the_context_refuses_a_server_another_ca_signed(tmp_path, ca):
    trustme.CA().cert_pem.write_to_path(tmp_path / "other.pem")
    tls = convert({"ca_file": str(tmp_path / "other.pem")}, TlsConfig)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(server_context(ca), client_context(tls))


async def test_the_context_presents_the_client_certificate(tmp_path, ca):
    client_ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    client_ca.issue_cert("meterline-client").private_key_and_cert_chain_pem.write_to_path(
        tmp_path / "client.pem")
    tls = convert({"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "client.pem"),
                   "key_file": str(tmp_path / "client.pem")}, TlsConfig)
    peer = await handshake(server_context(ca, client_ca), client_context(tls))
    assert peer is not None and ("DNS", "meterline-client") in peer["subjectAltName"]


def test_insecure_skip_verify_turns_verification_off():
    context = client_context(convert({"insecure_skip_verify": True}, TlsConfig))
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(msgspec.ValidationError, match="ca_file: no such file"):
        convert({"ca_file": str(tmp_path / "missing.pem")}, TlsConfig)


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(tmp_path, ca):
    ca.issue_cert("a").cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    ca.issue_cert("b").private_key_pem.write_to_path(tmp_path / "key.pem")
    with pytest.raises(msgspec.ValidationError, match="cannot load the certificates"):
        convert({"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")},
                TlsConfig)


def encrypted_pair(ca: trustme.CA, tmp_path, password: bytes = b"s3cret") -> dict[str, str]:
    """A certificate and its key, the key encrypted with `password` (PKCS#8)."""
    from cryptography.hazmat.primitives import serialization

    issued = ca.issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password)))
    return {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")}


def test_an_encrypted_key_without_its_password_is_a_config_error_saying_so(tmp_path, ca):
    with pytest.raises(msgspec.ValidationError,
                       match="key_file is encrypted: give its key_password"):
        convert(encrypted_pair(ca, tmp_path), TlsConfig)


def test_an_encrypted_key_loads_with_its_password(tmp_path, ca):
    convert({**encrypted_pair(ca, tmp_path), "key_password": "s3cret"}, TlsConfig)


def test_a_listener_refuses_an_encrypted_key_saying_so(tmp_path, ca):
    with pytest.raises(msgspec.ValidationError,
                       match="key_file is encrypted: a listener takes an unencrypted key"):
        convert(encrypted_pair(ca, tmp_path), ServerTlsConfig)
