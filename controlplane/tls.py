"""The control plane over TLS, and the host identity a client certificate proves.

``controlplane serve --tls-cert FILE --tls-key FILE [--client-ca FILE]`` serves HTTPS; with
``--client-ca`` every connection must present a certificate that CA issued, and the host's
identity is that certificate's subject CN, else its first DNS name. Only then is the
proxy's ``X-Metadata-Proxy-Host`` header checked against it (``controlplane.app.HostBinding``:
a mismatch is 403 ``host_mismatch``) and trusted; without a certificate it is informational.

The app learns the certificate from the ASGI TLS extension, ``scope["extensions"]["tls"]``
(``client_cert_chain``: PEM, leaf first). uvicorn 0.54 does not fill it in, so
``TLSProtocol`` does: its httptools protocol, reading the peer certificate from the
transport's public ``ssl_object`` when the connection is made and adding the extension to
each request's scope. ``HostBinding`` fails closed when a certificate was required and the
extension is missing (the hook did not run), so a uvicorn change cannot silently turn
verified hosts into unverified ones; tests/test_tls.py pins the seam.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HOST_HEADER", "TLSError", "TLSProtocol", "client_identity", "server_context"]

HOST_HEADER = b"x-metadata-proxy-host"
# ASGI TLS extension: the TLS version as the integer the protocol puts on the wire.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 or newer); with ``client_ca``, client certificates are required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot use --tls-cert {cert} with --tls-key {key}: {_reason(exc)}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(f"cannot use --client-ca {client_ca}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc)


def tls_extension(ssl_object: Any) -> dict[str, Any]:
    """The ASGI TLS extension for one connection, from its ssl.SSLObject."""
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,  # the ssl module cannot hand back our own certificate
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,  # a certificate that fails verification never gets this far
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


class TLSProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that puts the ASGI TLS extension in every request's scope."""

    tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # asyncio (and uvloop) call this once the handshake is complete: the peer certificate is known.
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls = tls_extension(ssl_object) if ssl_object is not None else None
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.tls is not None:
            extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
            extensions["tls"] = self.tls
            self.scope["extensions"] = extensions


@functools.lru_cache(maxsize=256)
def _identity_of(pem: str) -> str | None:
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        if isinstance(value, str) and value:
            return value
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns_names = names.get_values_for_type(x509.DNSName)
    return dns_names[0] if dns_names else None


def client_identity(scope: Scope) -> str | None:
    """The host's identity proven by its client certificate: subject CN, else first DNS SAN; None without one."""
    tls = scope.get("extensions", {}).get("tls")
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    if not chain:
        return None
    return _identity_of(chain[0])
