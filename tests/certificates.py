"""
Throw-away X.509 material for TLS tests: a CA and node certificates for IP
addresses, written as PEM files into a temporary directory.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@attrs.frozen
class NodeFiles:
    """The PEM files of one node: certificate, private key, and the CA bundle it trusts."""

    certificate: str
    key: str
    ca: str


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@attrs.frozen
class Authority:
    """A self-signed CA that issues node certificates."""

    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        """A new CA called C{name}, valid from yesterday for a day more."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, certificate)

    def issue(self, directory: str, host: str, label: str) -> NodeFiles:
        """
        Write a certificate for IP C{host} (a subjectAltName IP entry), its
        key and this CA into C{directory}, file names starting with C{label}.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{label} {host}"))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        files = NodeFiles(
            str(base / f"{label}.pem"), str(base / f"{label}.key"), str(base / f"{label}-ca.pem")
        )
        Path(files.certificate).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        Path(files.key).write_bytes(_pem(key))
        Path(files.ca).write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return files
