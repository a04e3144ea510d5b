"""
TLS for the stream transport (C{;transport=tls}), with Twisted's TLS over
pyOpenSSL: every node has a certificate and key, and trusts one CA bundle.

Both ends verify each other: a node accepts a TLS connection only from a
peer whose certificate chains to the CA bundle (the peer must present one),
and connects only to a peer whose certificate chains to it I{and} names the
IP address connected to (a C{subjectAltName} IP entry, checked by
service_identity, as nodes are addressed by IP literals).

Importing this module needs C{twisted[tls]} (pyOpenSSL, service_identity);
the transport layer itself does not import it.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from dmq_bus.sip.address import Address

_BEGIN = b"-----BEGIN CERTIFICATE-----"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path!r}: {e.strerror}") from None


def loadAuthorities(path: str) -> list[Certificate]:
    """
    Every certificate of the PEM CA bundle at C{path}.

    @raise ValueError: unreadable, or holding no (or a malformed) certificate.
    """
    data = _read(path, "CA bundle")
    parts = [_BEGIN + chunk for chunk in data.split(_BEGIN)[1:]]
    if not parts:
        raise ValueError(f"no PEM certificate in the CA bundle {path!r}")
    try:
        return [Certificate.loadPEM(part) for part in parts]
    except crypto.Error:
        raise ValueError(f"a malformed certificate in the CA bundle {path!r}") from None


def loadNodeCertificate(certificatePath: str, keyPath: str) -> PrivateCertificate:
    """
    This node's certificate (the first of the PEM file at
    C{certificatePath}) with its private key (PEM, unencrypted, at
    C{keyPath}).

    @raise ValueError: a file is unreadable or malformed, or the key is not
        the certificate's.
    """
    certificateData = _read(certificatePath, "certificate")
    keyData = _read(keyPath, "key")
    try:
        certificate = Certificate.loadPEM(certificateData)
    except crypto.Error:
        raise ValueError(f"no PEM certificate in {certificatePath!r}") from None
    try:
        key = KeyPair.load(keyData, crypto.FILETYPE_PEM)
    except crypto.Error:
        raise ValueError(f"no unencrypted PEM private key in {keyPath!r}") from None
    try:
        node: PrivateCertificate = PrivateCertificate.fromCertificateAndKeyPair(certificate, key)
    except VerifyError:
        raise ValueError(f"the key {keyPath!r} is not the key of {certificatePath!r}") from None
    return node


def describeTLSError(error: BaseException) -> str:
    """
    The reasons in an C{OpenSSL.SSL.Error} (a list of (library, function,
    reason) tuples) joined by C{"; "}, or its text when it holds none.
    """
    parts = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if isinstance(entry, tuple) and entry and isinstance(entry[-1], str) and entry[-1]:
            parts.append(entry[-1])
    return "; ".join(parts) or str(error) or type(error).__name__


class _RefusableTLSFactory(TLSMemoryBIOFactory):
    """A L{TLSMemoryBIOFactory} that closes the connection when the wrapped factory refuses it."""

    noisy = False

    def buildProtocol(self, addr: Any) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)  # type: ignore[no-any-return]


class TLSContexts:
    """
    The TLS settings of a node: its certificate and the CA bundle it
    trusts, as the factories the transport layer wraps its own in.
    """

    def __init__(self, certificate: PrivateCertificate, authorities: list[Certificate]) -> None:
        self.certificate = certificate
        self.authorities = authorities
        self._serverOptions = CertificateOptions(
            privateKey=certificate.privateKey.original,
            certificate=certificate.original,
            verify=True,
            caCerts=[a.original for a in authorities],
            requireCertificate=True,
        )
        self._trustRoot = trustRootFromCertificates(authorities)

    @classmethod
    def fromFiles(cls, certificatePath: str, keyPath: str, caPath: str) -> TLSContexts:
        """
        The contexts of the PEM files given.

        @raise ValueError: a file is unreadable or malformed (the message
            names it), or the key does not match the certificate.
        """
        return cls(loadNodeCertificate(certificatePath, keyPath), loadAuthorities(caPath))

    @staticmethod
    def errorText(reason: Failure) -> str | None:
        """
        What OpenSSL said when C{reason} (why a TLS connection was lost) is
        a TLS error, e.g. C{"tlsv1 alert unknown ca"} for an alert from the
        peer or C{"certificate verify failed"} for our own refusal; None
        for any other reason (the connection closed or reset).
        """
        if not reason.check(SSL.Error) or reason.value is None:
            return None
        return describeTLSError(reason.value)

    def serverFactory(self, factory: Factory[Any]) -> IProtocolFactory:
        """
        C{factory} behind TLS, for listening: the peer must present a
        certificate chaining to the CA bundle.
        """
        return _RefusableTLSFactory(self._serverOptions, False, factory)

    def clientFactory(self, destination: Address, factory: Factory[Any]) -> IProtocolFactory:
        """
        C{factory} behind TLS, to connect to C{destination}: its certificate
        must chain to the CA bundle and name C{destination.host}.
        """
        creator = optionsForClientTLS(
            destination.host, trustRoot=self._trustRoot, clientCertificate=self.certificate
        )
        return _RefusableTLSFactory(creator, True, factory)
