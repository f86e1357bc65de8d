"""Helpers of the e2e suite (fixtures are in conftest.py): waiting, namespaces, the operator process."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvpool"
GROUP, VERSION, PLURAL = "kvpool.io", "v1alpha1", "kvcachepools"
NOT_RBAC = r"urllib3\.connectionpo|being terminated|NamespaceTerminating"
STATUS_INTERVAL = 2
"""The operator's status and repair interval in this suite (production default: 10 s)."""


def wait_for(what: Callable[[], Any], timeout: float = 60, message: str = "", interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def absent(fn: Callable[[], Any]) -> Any:
    """`fn()`, or None when the API server answers 404."""
    import kubernetes

    try:
        return fn()
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pool_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KVCachePool",
        "metadata": {"name": name},
        "spec": spec,
    }


def make_namespace(k8s: Any, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    k8s.client.CoreV1Api().create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    return name


def delete_namespace(k8s: Any, name: str) -> None:
    absent(lambda: k8s.client.CoreV1Api().delete_namespace(name))


class Operator:
    """`kvpool operator` as its own process, with the chart's ServiceAccount token."""

    def __init__(
        self, kubeconfig: pathlib.Path, webhook_config: str, workdir: pathlib.Path, host: str
    ) -> None:
        self.kubeconfig, self.webhook_config, self.workdir, self.host = (
            kubeconfig,
            webhook_config,
            workdir,
            host,
        )
        self.webhook_port = free_port()
        self.log = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KVPOOL_STATUS_INTERVAL": str(STATUS_INTERVAL),
        }
        for key in ("KVPOOL_NAMESPACE", "REQUESTS_CA_BUNDLE"):
            env.pop(key, None)
        command = [
            sys.executable, "-m", "kvpool.cli.main", "operator", "--all-namespaces", "--standalone",
            "--health-port", "0", "--metrics-port", "0", "--log-level", "debug",
            "--webhook-port", str(self.webhook_port), "--webhook-cert-dir", str(self.workdir / "certs"),
            "--webhook-dns-name", self.host, "--webhook-config-name", self.webhook_config,
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def forbidden(self, since: int = 0) -> list[str]:
        """Lines after byte `since` where the API server refused the operator (RBAC). Every refusal
        surfaces as an exception or a refusal the operator or kopf logs with the server's reason;
        urllib3's request lines carry no reason, and a 403 for a namespace being deleted is none of
        RBAC's doing."""
        lines = self.text()[since:].splitlines()
        return [
            line
            for line in lines
            if re.search(r"\(403\)|: 403 |Forbidden|forbidden", line) and not re.search(NOT_RBAC, line)
        ]
