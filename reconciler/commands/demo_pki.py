"""Throw-away certificate authorities: ``reconciler demo``'s fleet on loopback speaks real TLS.

The demo makes, in its work directory, a CA that lives only as long as the
demo, and one certificate from it for ``127.0.0.1`` and ``localhost`` that
HQ and every relay serve; agents and relays trust the CA with ``--ca-file``.
The TLS tests and ``benchmarks/relay_bench.py --tls`` issue theirs from the
same :class:`CA` (expired ones, ones for another host, client certificates).
Production certificates come from the operator's CA instead (README,
"Running it for real").
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 2

Window = tuple[datetime.datetime, datetime.datetime]  # not valid before, not valid after


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DemoPki:
    """The files of the demo's TLS: the CA certificate, and the loopback server certificate and its key."""

    ca_file: Path
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class CA:
    """A self-signed CA (EC P-256, SHA-256) that issues server and client certificates into ``directory``.

    Its certificate is ``<file_name>.pem`` (default: its ``name``); ``valid``
    is its validity window (default: from a day ago for 30 days) and
    ``path_length`` the BasicConstraints limit (None: unlimited).
    """

    def __init__(self, directory: Path, name: str = "test-ca", *, file_name: str | None = None,
                 valid: Window | None = None, path_length: int | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        start, end = valid or (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(start).not_valid_after(end)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                                    critical=False)
                     .sign(self.key, hashes.SHA256()))
        self.cert_file = self.dir / f"{file_name or name}.pem"
        _write(self.cert_file, self.cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def issue(self, file_name: str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), client: bool = False,
              expired: bool = False, valid: Window | None = None) -> Issued:
        """A certificate for ``hosts`` (server) or a client certificate, ``<file_name>.pem`` and ``.key``.

        ``valid`` is its window (default: from an hour ago for 7 days);
        ``expired`` makes one that ended yesterday.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        if expired:
            start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            start, end = valid or (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7))
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                         else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.dir / f"{file_name}.pem", self.dir / f"{file_name}.key")
        _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(issued.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), 0o600)
        return issued


def make_demo_pki(directory: Path) -> DemoPki:
    """A CA and a certificate for 127.0.0.1/localhost, valid for :data:`VALID_DAYS` days, in ``directory``."""
    now = _now()
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS))
    ca = CA(directory, "reconciler demo CA", file_name="demo-ca", valid=valid, path_length=0)
    loopback = ca.issue("loopback", valid=valid)
    return DemoPki(ca.cert_file, loopback.cert, loopback.key)
