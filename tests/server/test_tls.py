"""A node with --tls-cert-file/--tls-key-file: TLS on gRPC, the data channel and HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest

from kvpool.cachenode import Client, InvalidRequest, Unavailable
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.rpc.tls import load_server_tls
from kvpool.cachenode.server.node import CacheNode
from kvpool.cli.devtools.local_servers import free_port

from ..conftest import issue_cert
from ..needs import needs
from .conftest import run_node

pytestmark = needs(shutil.which("openssl") is not None, "needs the openssl command (apt-get install openssl)")


@pytest.fixture(scope="module")
def tls_node(certs):
    with run_node("--tls-cert-file", str(certs / "node.crt"), "--tls-key-file", str(certs / "node.key")) as n:
        yield n


def test_url_says_grpcs(tls_node):
    assert tls_node.url.startswith("grpcs://127.0.0.1:")


@pytest.mark.parametrize("data_channel", [True, False], ids=["data-channel", "grpc-fallback"])
def test_roundtrip_over_tls(tls_node, certs, data_channel):
    values = {f"tls-{data_channel}-{n}".encode(): os.urandom(n) for n in (10, 5 << 20)}
    with Client(tls_node.url, tls_ca_file=str(certs / "ca.crt"), use_data_channel=data_channel) as client:
        client.put_many(values)
        assert client.get_many(list(values)) == values


def test_ca_from_env(tls_node, certs, monkeypatch):
    monkeypatch.setenv("KVPOOL_TLS_CA_FILE", str(certs / "ca.crt"))
    with Client(tls_node.url) as client:
        client.put(b"env-ca", b"v")
        assert client.get(b"env-ca") == b"v"


def test_untrusted_or_plaintext_clients_are_refused(tls_node, certs):
    with (
        Client(tls_node.url, tls_ca_file=str(certs / "other.crt"), timeout=3) as wrong_ca,
        pytest.raises(Unavailable),
    ):
        wrong_ca.stats()  # signed by another CA: verification fails
    plain_url = tls_node.url.replace("grpcs://", "grpc://")
    with Client(plain_url, timeout=3) as plain, pytest.raises(Unavailable):
        plain.stats()
    with Client(tls_node.url, tls_ca_file=str(certs / "ca.crt")) as client:
        data_port = client.hello().data_port
    with socket.create_connection(("127.0.0.1", data_port), timeout=5) as sock:  # plaintext on the data port
        sock.sendall(b"KVPD" + bytes(3))
        with pytest.raises(OSError):
            if not sock.recv(100):  # the server drops it without answering in clear text
                raise ConnectionResetError("closed")
    assert tls_node.alive
    with Client(tls_node.url, tls_ca_file=str(certs / "ca.crt")) as client:
        client.put(b"after-plaintext", b"ok")
        assert client.get(b"after-plaintext") == b"ok"
    with pytest.raises(InvalidRequest, match="PEM"):
        Client(tls_node.url, tls_ca_file=str(certs / "node.ext"))


def test_https_health(tls_node, certs):
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with urllib.request.urlopen(
        f"https://127.0.0.1:{tls_node.http_port}/readyz", context=context, timeout=5
    ) as r:
        assert r.status == 200


def test_mismatched_or_missing_tls_flags(certs):
    kvpool = [sys.executable, "-m", "kvpool.cli.main", "node"]
    for args, expected in (
        (["--tls-cert-file", str(certs / "node.crt")], "go together"),
        (
            ["--tls-cert-file", str(certs / "node.crt"), "--tls-key-file", str(certs / "ca.key")],
            "usable pair",
        ),
        (["--tls-cert-file", str(certs / "node.ext"), "--tls-key-file", str(certs / "node.key")], "PEM"),
    ):
        result = subprocess.run([*kvpool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def issue(certs, name: str, san: str):
    """A certificate for `san` signed by the fixture's CA: (cert path, key path, DER bytes)."""
    cert, key = issue_cert(certs, name, san)
    return cert, key, ssl.PEM_cert_to_DER_cert(cert.read_text())


def kubelet_mount(target, version: str, cert, key) -> None:
    """Files as a Secret volume presents them: `tls.crt -> ..data/tls.crt`, `..data -> ..<version>`;
    an update writes a new version directory and swaps `..data` atomically."""
    (target / version).mkdir()
    shutil.copy(cert, target / version / "tls.crt")
    shutil.copy(key, target / version / "tls.key")
    os.symlink(version, target / "..data_tmp")
    os.replace(target / "..data_tmp", target / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (target / name).is_symlink():
            os.symlink(f"..data/{name}", target / name)


def served_cert(port: int, alpn: str | None = None) -> bytes:
    """The certificate a new TLS connection to 127.0.0.1:port is shown (not verified: we compare it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        return sock.getpeercert(binary_form=True)


def test_renewed_certificate_is_served_without_a_restart(certs, tmp_path):
    """cert-manager renews, the kubelet swaps the files: new connections on all three ports get the
    new certificate from the same process, and clients trusting the CA keep working."""
    cert_a, key_a, der_a = issue(certs, "cert-a", "IP:127.0.0.1,DNS:localhost")
    cert_b, key_b, der_b = issue(certs, "cert-b", "IP:127.0.0.1,DNS:localhost")
    mount = tmp_path / "tls"
    mount.mkdir()
    kubelet_mount(mount, "..v1", cert_a, key_a)
    ca = str(certs / "ca.crt")
    with run_node("--tls-cert-file", str(mount / "tls.crt"), "--tls-key-file", str(mount / "tls.key")) as n:
        grpc_port = int(n.url.rsplit(":", 1)[1])
        with Client(n.url, tls_ca_file=ca) as client:
            data_port = client.hello().data_port
            client.put(b"before", b"a")
        ports = {"grpc": (grpc_port, "h2"), "http": (n.http_port, None), "data": (data_port, None)}
        assert {k: served_cert(p, a) for k, (p, a) in ports.items()} == dict.fromkeys(ports, der_a)
        kubelet_mount(mount, "..v2", cert_b, key_b)
        deadline = time.monotonic() + 20
        seen = {}
        while time.monotonic() < deadline:
            seen = {k: served_cert(p, a) for k, (p, a) in ports.items()}
            if seen == dict.fromkeys(ports, der_b):
                break
            time.sleep(0.3)
        assert seen == dict.fromkeys(ports, der_b), {k: v == der_a for k, v in seen.items()}
        with Client(n.url, tls_ca_file=ca) as client:
            assert client.get(b"before") == b"a"
        assert n.alive


def test_a_bad_renewal_keeps_the_certificate_in_use(certs, tmp_path):
    cert_a, key_a, der_a = issue(certs, "keep-a", "IP:127.0.0.1,DNS:localhost")
    mount = tmp_path / "tls"
    mount.mkdir()
    kubelet_mount(mount, "..v1", cert_a, key_a)
    tls = load_server_tls(mount / "tls.crt", mount / "tls.key")
    tls._check_every = 0
    kubelet_mount(mount, "..v2", cert_a, certs / "other.key")  # a key that does not fit the certificate
    assert not tls.refresh()
    assert ssl.PEM_cert_to_DER_cert(tls.cert_pem.decode()) == der_a and tls.generation == 0


def test_tls_peers_found_through_a_name_verify_that_name(certs, monkeypatch):
    """Nodes find each other by resolving the peers' name (the headless Service) to addresses, and
    the certificate names no address: each probe verifies the name it resolved, not the IP."""
    cert, key, _ = issue(certs, "dns-only", "DNS:localhost")
    tls = load_server_tls(cert, key)
    ports = [free_port(), free_port()]
    peers = ",".join(f"localhost:{p}" for p in ports)
    monkeypatch.setenv("KVPOOL_TLS_CA_FILE", str(certs / "ca.crt"))
    started = []
    try:
        for i, port in enumerate(ports):
            settings = NodeSettings(
                host="127.0.0.1", port=port, http_port=0, data_port=0, memory=64 << 20,
                node_id=f"pod-{i}", peers=peers, advertise_host="localhost", tls=tls,
            )  # fmt: skip
            node = CacheNode(settings)
            node.start()
            started.append(node)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(n.peers.view == {"pod-0", "pod-1"} for n in started):
            time.sleep(0.2)
        assert [n.peers.view for n in started] == [{"pod-0", "pod-1"}] * 2
    finally:
        for node in started:
            node.stop(handoff=False)
