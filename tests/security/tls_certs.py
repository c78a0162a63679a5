"""Throw-away PKI for the TLS tests, generated at test time (no private key is ever committed).

``make_pki(dir)`` writes a CA, a server certificate for localhost/127.0.0.1/::1, a client
certificate signed by the CA, and a second, untrusted CA with its own client certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(cn, ca_cert, ca_key, *, server: bool):
    key = _key()
    b = _builder(cn, ca_cert.subject, key.public_key()).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    if server:
        sans = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    cert = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(
        ca_key, hashes.SHA256()
    )
    return cert, key


def make_pki(directory: Path) -> Pki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("ultramem test CA")
    srv, srv_key = _leaf("localhost", ca, ca_key, server=True)
    cli, cli_key = _leaf("ultramem-client", ca, ca_key, server=False)
    rogue, rogue_key = _ca("rogue CA")
    rcli, rcli_key = _leaf("rogue-client", rogue, rogue_key, server=False)
    return Pki(
        ca=_write_cert(ca, d / "ca.crt"),
        server_cert=_write_cert(srv, d / "server.crt"),
        server_key=_write_key(srv_key, d / "server.key"),
        client_cert=_write_cert(cli, d / "client.crt"),
        client_key=_write_key(cli_key, d / "client.key"),
        rogue_ca=_write_cert(rogue, d / "rogue-ca.crt"),
        rogue_client_cert=_write_cert(rcli, d / "rogue-client.crt"),
        rogue_client_key=_write_key(rcli_key, d / "rogue-client.key"),
    )
