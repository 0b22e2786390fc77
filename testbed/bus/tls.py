"""Throw-away certificate authority for TLS tests and lab brokers (not for production).

Why: `mqtts://` must be testable without a real PKI. One call makes a CA and a server
certificate for the loopback names, and a client certificate for brokers that ask for one.
EC P-256 keys keep generation fast (milliseconds, not RSA's hundreds).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TestCA:
    """Paths of the PEM files written by `make_test_ca`."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "testbed"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def make_test_ca(
    directory: str | Path,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 30,
) -> TestCA:
    """Write ca.pem/ca.key, server.pem/server.key and client.pem/client.key into ``directory``.

    ``hostnames`` go into the server certificate's subjectAltName (IP literals as IP entries).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = _key()
    ca_name = _name("testbed test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: Sequence[str]) -> tuple[
            x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        if sans:
            entries: list[x509.GeneralName] = []
            for h in sans:
                try:
                    entries.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    entries.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(entries), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(hostnames[0] if hostnames else "server",
                                   ExtendedKeyUsageOID.SERVER_AUTH, hostnames)
    client_cert, client_key = leaf("testbed client", ExtendedKeyUsageOID.CLIENT_AUTH, ())

    out = TestCA(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key",
                 d / "client.pem", d / "client.key")
    pem = serialization.Encoding.PEM
    out.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_key(ca_key, out.ca_key)
    out.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_key(server_key, out.server_key)
    out.client_cert.write_bytes(client_cert.public_bytes(pem))
    _write_key(client_key, out.client_key)
    return out
