"""TLS, written once: the `tls` block of every component that connects to a server (the
`kafka` exporter and receiver, the `otlp` exporter: `TlsConfig`) and of every listener
(the receivers', the gateway's, the admin and Prometheus scrape listeners:
`ServerTlsConfig`), their checks and the `ssl.SSLContext` they make.

A client's `tls: {}` verifies the server against the system's CAs. The files are checked
and loaded when the config is read, so a missing file, a bad certificate or a wrong key
password is a config error naming the key, not a failure at the first connection.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

from meterline.component import Config


class TlsConfig(Config):
    """TLS to a server. `tls: {}` verifies it against the system's CAs."""

    ca_file: str | None = None  # PEM bundle of the CAs that signed the server's certificate
    cert_file: str | None = None  # client certificate (mutual TLS), with key_file
    key_file: str | None = None  # the client certificate's private key (PEM)
    key_password: str | None = None  # when key_file is encrypted
    insecure_skip_verify: bool = False  # accept any certificate and host name (tests only)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {path}")
        if self.ca_file is None and self.cert_file is None:
            return  # the system's CAs: nothing of ours to load
        try:
            client_context(self)  # a bad certificate, key or password is a config error
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"cannot load the certificates: {e}") from None


class ServerTlsConfig(Config):
    """TLS on a listener: HTTPS (gRPC over TLS for OTLP). With `client_ca_file`, clients
    must present a certificate those CAs signed (mutual TLS)."""

    cert_file: str  # the listener's certificate chain (PEM)
    key_file: str  # its private key (PEM, unencrypted: mount it from a secret)
    client_ca_file: str | None = None  # require client certificates signed by these CAs

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {path}")
        try:
            server_context(self)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"cannot load the certificates: {e}") from None


def server_context(tls: ServerTlsConfig) -> ssl.SSLContext:
    """The context a listener serves with: TLS 1.2 at least, client certificates required
    when there are client CAs."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file,
                            _encrypted("a listener takes an unencrypted key"))
    if tls.client_ca_file is not None:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context for connecting to a server: its CAs (else the system's), the client
    certificate if any, and verification unless `insecure_skip_verify`."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file,
                                tls.key_password or _encrypted("give its key_password"))
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def read_pem(path: str | None) -> bytes | None:
    """A file's bytes (None for None), for libraries that take PEM, not a context (gRPC)."""
    return Path(path).read_bytes() if path else None


def _encrypted(hint: str) -> Callable[[], str]:
    """OpenSSL's password callback for a key given no password: an encrypted key is a
    config error saying so (its default would prompt on the terminal, or fail with EINVAL
    without one)."""
    def refuse() -> str:
        raise ValueError(f"key_file is encrypted: {hint}")
    return refuse
