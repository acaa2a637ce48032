"""Certificates for the TLS tests, made by the tests themselves (cryptography package).

One call to L{make_certificates} writes into a directory: a CA, a good certificate for
C{provider.test}, one for the wrong name, an expired one, one from an unknown CA, a certificate
for the proxy's own TLS listener (C{proxy.test} and 127.0.0.1), and a client certificate.
Keys are EC P-256: quick to generate.
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROVIDER = "provider.test"
PROXY = "proxy.test"


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA the proxy trusts (PEM)
    good: CertPair  # provider.test, signed by the CA
    wrong_name: CertPair  # other.test, signed by the CA
    expired: CertPair  # provider.test, signed by the CA, expired yesterday
    unknown_ca: CertPair  # provider.test, signed by a CA nobody trusts
    proxy: CertPair  # proxy.test + IP 127.0.0.1, signed by the CA: the proxy's listener
    client: CertPair  # a client certificate (sipproxy.test), signed by the CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _ca(common_name: str, now: datetime.datetime) -> tuple[x509.Certificate,
                                                             ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    directory: Path,
    stem: str,
    names: list[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    client: bool = False,
) -> CertPair:
    ca_cert, ca_key = ca
    key = _key()
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    # the chain: leaf first, then the issuer (servers send both)
    pair.cert.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    _write_key(key, pair.key)
    return pair


def make_certificates(directory: Path, provider_names: tuple[str, ...] = (PROVIDER,)
                      ) -> Certificates:
    """The set above; C{provider_names}: the good certificate's names (DNS names or addresses,
    e.g. the provider's IP address for an upstream URI that names it)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca = _ca("sipproxy test CA", now)
    other_ca = _ca("unknown test CA", now)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    valid = {"not_before": now - day, "not_after": now + 10 * day}
    return Certificates(
        ca=ca_path,
        good=_leaf(directory, "good", list(provider_names), ca, **valid),
        wrong_name=_leaf(directory, "wrong_name", ["other.test"], ca, **valid),
        expired=_leaf(directory, "expired", [PROVIDER], ca, not_before=now - 10 * day,
                      not_after=now - day),
        unknown_ca=_leaf(directory, "unknown_ca", [PROVIDER], other_ca, **valid),
        proxy=_leaf(directory, "proxy", [PROXY, "127.0.0.1"], ca, **valid),
        client=_leaf(directory, "client", ["sipproxy.test"], ca, client=True, **valid),
    )


_CERTS: Certificates | None = None


def certs() -> Certificates:
    """One set of certificates for the whole test run, made at the first call in a temporary
    directory of its own (it outlives any one test's ``tmp_path``)."""
    global _CERTS
    if _CERTS is None:
        _CERTS = make_certificates(Path(tempfile.mkdtemp(prefix="sipproxy-tls-")))
    return _CERTS
