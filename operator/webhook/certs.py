"""The webhook's serving certificate: generated and renewed by the operator, or someone else's.

In `--webhook-cert-dir`: `tls.crt` and `tls.key` are what the server presents. When they are missing
the operator creates its own CA (`ca.crt`, `ca.key`, ten years) and a serving certificate signed by
it (one year, renewed 30 days before it expires, same CA, so the API server's caBundle stays valid).
Files it did not create (cert-manager's Secret mounted there) are only read, never replaced: a
directory without `ca.key` is not ours. Uses `cryptography`; file I/O only, no network.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT, KEY, CA_CERT, CA_KEY = "tls.crt", "tls.key", "ca.crt", "ca.key"
CA_NAME = "kvpool-webhook-ca"
CA_LIFETIME = datetime.timedelta(days=3650)
LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclasses.dataclass(frozen=True)
class Status:
    generated: bool
    """Whether this call wrote a new serving certificate."""
    own: bool
    """Whether the directory holds the operator's own CA (so it must put the CA in the caBundle)."""
    not_after: datetime.datetime


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
    key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
    decipher_only=False,
)  # fmt: skip


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write-then-rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_ca(
    cert_dir: pathlib.Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(cert_dir / CA_KEY, _key_pem(key), 0o600)
    _write(cert_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _load_ca(cert_dir: pathlib.Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((cert_dir / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((cert_dir / CA_KEY).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _new_leaf(cert_dir: pathlib.Path, dns_names: list[str], now: datetime.datetime) -> x509.Certificate:
    if (cert_dir / CA_CERT).exists() and (cert_dir / CA_KEY).exists():
        ca, ca_key = _load_ca(cert_dir)
        if ca.not_valid_after_utc < now + LIFETIME:
            ca, ca_key = _new_ca(cert_dir, now)
    else:
        ca, ca_key = _new_ca(cert_dir, now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(cert_dir / KEY, _key_pem(key), 0o600)
    _write(cert_dir / CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def ensure(cert_dir: pathlib.Path, dns_names: list[str], now: datetime.datetime | None = None) -> Status:
    """Make sure `cert_dir` holds a serving certificate; create or renew only the operator's own."""
    now = now or _now()
    cert_dir.mkdir(parents=True, exist_ok=True)
    own = (cert_dir / CA_KEY).exists()
    if (cert_dir / CERT).exists() and (cert_dir / KEY).exists():
        cert = x509.load_pem_x509_certificate((cert_dir / CERT).read_bytes())
        names = _dns_names(cert)
        due = cert.not_valid_after_utc - RENEW_BEFORE <= now or not set(dns_names) <= names
        if not own or not due:
            return Status(False, own, cert.not_valid_after_utc)
    cert = _new_leaf(cert_dir, dns_names, now)
    return Status(True, True, cert.not_valid_after_utc)


def _dns_names(cert: x509.Certificate) -> set[str]:
    try:
        return set(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName
            )
        )
    except x509.ExtensionNotFound:
        return set()


def merge_bundle(bundle: bytes, ca_pem: bytes, now: datetime.datetime | None = None, keep: int = 4) -> bytes:
    """A caBundle that trusts `ca_pem` and up to `keep - 1` other unexpired CAs already in `bundle`
    (other operator replicas, each with its own CA), newest first; expired ones are dropped."""
    now = now or _now()
    mine = x509.load_pem_x509_certificate(ca_pem)
    others = [
        c for c in (x509.load_pem_x509_certificates(bundle) if bundle.strip() else [])
        if c.not_valid_after_utc > now and c.fingerprint(hashes.SHA256()) != mine.fingerprint(hashes.SHA256())
    ]  # fmt: skip
    others.sort(key=lambda c: c.not_valid_before_utc, reverse=True)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [mine, *others[: keep - 1]])
