"""A node with --tls-cert-file/--tls-key-file: TLS on gRPC, the data channel and HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest

from kvpool.cachenode import Client, InvalidRequest, Unavailable

from .conftest import run_node

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


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
        Client(tls_node.url, tls_ca_file=str(certs / "ext.cnf"))


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
        (["--tls-cert-file", str(certs / "ext.cnf"), "--tls-key-file", str(certs / "node.key")], "PEM"),
    ):
        result = subprocess.run([*kvpool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
