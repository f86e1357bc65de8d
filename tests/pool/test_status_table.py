"""The one error table: what a server answers for each error is what a client raises again."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from kvpool.cachenode.core import errors
from kvpool.cachenode.rpc.channels import bearer_metadata, ca_file
from kvpool.cachenode.rpc.status import status_code, translate


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        (errors.InvalidRequest("bad"), errors.InvalidRequest),
        (errors.Unauthenticated("who"), errors.Unauthenticated),
        (errors.NodeLeaving("going"), errors.NodeLeaving),
        (errors.Unimplemented("no"), errors.Unimplemented),
        (errors.Unavailable("busy"), errors.Unreachable),
        (errors.NoRoom("full"), errors.InvalidRequest),
        (errors.LeaseGone("gone"), errors.NodeLeaving),
    ],
)
def test_a_server_error_comes_back_as_its_client_error(sent, received) -> None:
    error = translate(_Failed(status_code(sent), str(sent)))
    assert type(error) is received
    assert str(sent) in str(error)


def test_codes_and_messages_are_the_ones_clients_have_always_seen() -> None:
    assert status_code(errors.HolderLimit("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(errors.CorruptData("x")) is grpc.StatusCode.DATA_LOSS
    assert status_code(RuntimeError("x")) is grpc.StatusCode.UNKNOWN
    assert str(translate(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "late"))) == "DEADLINE_EXCEEDED: late"
    lost = translate(_Failed(grpc.StatusCode.DATA_LOSS, "bits"))
    assert type(lost) is errors.Unavailable and str(lost) == "DATA_LOSS: bits"
    assert str(translate(_Failed(grpc.StatusCode.INVALID_ARGUMENT, "why"))) == "why"


def test_every_status_name_in_the_table_is_a_grpc_status() -> None:
    names = {name for _, name in errors.STATUS_OF_ERROR} | set(errors.ERROR_OF_STATUS)
    assert names <= {code.name for code in grpc.StatusCode}


def test_core_errors_import_no_grpc() -> None:
    code = "import sys, kvpool.cachenode.core.errors; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bearer_metadata_and_ca_file(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bearer_metadata(None) == ()
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)
    monkeypatch.delenv("KVPOOL_TLS_CA_FILE", raising=False)
    assert ca_file(None) is None
    monkeypatch.setenv("KVPOOL_TLS_CA_FILE", "/env/ca.pem")
    assert ca_file(None) == "/env/ca.pem"
    assert ca_file("/given.pem") == "/given.pem"
