"""The webhook's certificates: made and renewed by the operator, someone else's only reloaded."""

from __future__ import annotations

import datetime
import pathlib
import shutil
import socket
import ssl
import time

from cryptography import x509

from kvpool.cli.devtools.local_servers import free_port
from kvpool.operator.webhook import certs
from kvpool.operator.webhook.server import WebhookServer

NAMES = ["kvpool-webhook.kvpool-system.svc", "localhost"]


def _cert(path: pathlib.Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_operator_makes_its_own_and_renews_it_before_expiry(tmp_path: pathlib.Path) -> None:
    first = certs.ensure(tmp_path, NAMES)
    assert first.generated and first.own
    leaf, ca = _cert(tmp_path / certs.CERT), _cert(tmp_path / certs.CA_CERT)
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == NAMES
    assert (tmp_path / certs.KEY).stat().st_mode & 0o077 == 0  # the key is the owner's only
    assert not certs.ensure(tmp_path, NAMES).generated  # nothing to do
    ca_bytes = (tmp_path / certs.CA_CERT).read_bytes()
    soon = leaf.not_valid_after_utc - datetime.timedelta(days=29)
    renewed = certs.ensure(tmp_path, NAMES, now=soon)
    assert renewed.generated and renewed.not_after > leaf.not_valid_after_utc
    assert (tmp_path / certs.CA_CERT).read_bytes() == ca_bytes  # same CA: the caBundle stays valid
    _cert(tmp_path / certs.CERT).verify_directly_issued_by(ca)
    # A new DNS name (the Service moved) is a new certificate too.
    assert certs.ensure(tmp_path, [*NAMES, "other.svc"], now=soon).generated


def test_certificates_the_operator_did_not_make_are_never_replaced(tmp_path: pathlib.Path) -> None:
    certs.ensure(tmp_path / "cm", NAMES)
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for name in (certs.CERT, certs.KEY, certs.CA_CERT):  # what a cert-manager Secret holds: no ca.key
        shutil.copy(tmp_path / "cm" / name, mounted / name)
    before = (mounted / certs.CERT).read_bytes()
    far = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    status = certs.ensure(mounted, NAMES, now=far)
    assert not status.generated and not status.own and (mounted / certs.CERT).read_bytes() == before


def test_bundle_keeps_other_live_cas_and_drops_expired_ones(tmp_path: pathlib.Path) -> None:
    pems = []
    for i in range(6):
        certs.ensure(tmp_path / str(i), NAMES)
        pems.append((tmp_path / str(i) / certs.CA_CERT).read_bytes())
    bundle = b""
    for pem in pems:
        bundle = certs.merge_bundle(bundle, pem)
    kept = x509.load_pem_x509_certificates(bundle)
    assert len(kept) == 4 and kept[0] == x509.load_pem_x509_certificate(pems[-1])
    assert certs.merge_bundle(bundle, pems[-1]) == bundle  # already there: no change, no write
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3651)
    assert len(x509.load_pem_x509_certificates(certs.merge_bundle(bundle, pems[0], now=later))) == 1


def _served_serial(port: int, ca: pathlib.Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_server_loads_a_rotated_certificate_without_restarting(tmp_path: pathlib.Path) -> None:
    """cert-manager rotates the Secret mounted in the cert dir: new connections get the new certificate."""
    issued = tmp_path / "issuer"
    certs.ensure(issued, NAMES)
    live = tmp_path / "live"
    live.mkdir()
    for name in (certs.CERT, certs.KEY):
        shutil.copy(issued / name, live / name)
    server = WebhookServer(lambda ns, name: None, port=free_port(), host="127.0.0.1", cert_dir=live,
                           dns_names=NAMES, refresh_s=0.1).start()  # fmt: skip
    try:
        first = _served_serial(server.port, issued / certs.CA_CERT)
        assert first == _cert(issued / certs.CERT).serial_number
        (issued / certs.CERT).unlink()
        assert certs.ensure(issued, NAMES).generated  # the issuer renews (same CA), the Secret changes
        for name in (certs.KEY, certs.CERT):
            shutil.copy(issued / name, live / name)
        deadline = time.monotonic() + 10
        while _served_serial(server.port, issued / certs.CA_CERT) == first:
            assert time.monotonic() < deadline, "the server kept the old certificate"
            time.sleep(0.1)
        assert _served_serial(server.port, issued / certs.CA_CERT) == _cert(live / certs.CERT).serial_number
        assert not (live / certs.CA_KEY).exists()  # never wrote into someone else's directory
    finally:
        server.stop()
