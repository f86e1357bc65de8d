"""What the operator renders runs: every container's command exists, every variable has a reader, and
a real `kvpool node` starts from a rendered pod's arguments and environment."""

from __future__ import annotations

import ast
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from kvpool.cachenode import Client, InvalidRequest
from kvpool.cachenode.core import settings as registry
from kvpool.cachenode.core.settings import load_settings
from kvpool.cli.devtools.local_servers import free_port
from kvpool.cli.main import cli
from kvpool.operator import builders, settings
from kvpool.operator.builders import common, configmap, statefulset
from kvpool.operator.webhook import patch

from .test_builders import FULL, OWNER

ROOT = pathlib.Path(__file__).resolve().parents[2]
KVPOOL = [sys.executable, "-P", "-m", "kvpool.cli.main"]
SPECS = {"default": {}, "full": FULL}


def workloads(spec: dict[str, Any]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(ConfigMap data, every container of every workload) of a rendered pool."""
    objs = builders.desired(OWNER, settings.parse("pool", "ns", spec), service_monitors=True)
    data = next(o["data"] for o in objs if o["kind"] == "ConfigMap")
    containers = [
        c for o in objs if o["kind"] in ("StatefulSet", "Deployment") for c in o["spec"]["template"]["spec"]["containers"]
    ]  # fmt: skip
    return data, containers


def test_operator_imports_the_settings_registry_and_nothing_else_of_cachenode() -> None:
    """DESIGN.md §2: the operator may import the settings definitions of cachenode, nothing more;
    and the builders share `common` instead of importing each other."""
    seen: set[str] = set()
    for path in sorted((ROOT / "operator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("kvpool.cachenode")
            ):
                names = [f"{node.module}.{a.name}" if node.module in ("kvpool.cachenode", "kvpool.cachenode.core") else node.module
                         for a in node.names]  # fmt: skip
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("kvpool.cachenode")]
            else:
                names = []
            seen.update(names)
            assert set(names) <= {"kvpool.cachenode.core.settings"}, (
                f"{path.relative_to(ROOT)} imports {names}"
            )
            if (
                path.parent.name == "builders"
                and path.name != "__init__.py"
                and isinstance(node, ast.ImportFrom)
            ) and node.level == 1:  # from .x import ...
                assert node.module == "common", f"{path.name} imports builder {node.module}"
    assert seen == {"kvpool.cachenode.core.settings"}


def test_the_lookup_service_is_on_by_default_as_one_replica() -> None:
    data, containers = workloads({})
    assert [c["command"][:2] for c in containers if c["name"] == "lookup"] == [["kvpool", "lookup"]]
    # the ConfigMap tells nodes and agents where it is; both commands read that variable
    assert data["KVPOOL_LOOKUP_URL"] == "grpc://pool-lookup.ns.svc:7410"
    for command in ("node", "agent"):
        assert "KVPOOL_LOOKUP_URL" in {p.envvar for p in cli.commands[command].params}, command
    assert "KVPOOL_LOOKUP_URL" not in workloads({"lookup": {"replicas": 0}})[0]
    with pytest.raises(settings.InvalidSpec, match=r"lookup\.replicas"):
        settings.parse("p", "ns", {"lookup": {"replicas": 2}})


def injected(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers the webhook adds to a vLLM pod of this pool (init containers, the agent)."""
    s = settings.parse("pool", "ns", spec)
    return [patch.connector_container(s)] + ([patch.agent_container(s)] if patch.uses_agent(s) else [])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_container_runs_a_kvpool_command_that_exists(name: str) -> None:
    spec = SPECS[name]
    data, containers = workloads(spec)
    assert containers
    _check_commands(data, containers)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_webhooks_payload_container_runs_a_kvpool_command_that_exists(name: str) -> None:
    data, _ = workloads(SPECS[name])
    _check_commands(data, [c for c in injected(SPECS[name]) if c["command"][1] != "agent"])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_webhooks_agent_runs_a_kvpool_command_that_exists(name: str) -> None:
    data, _ = workloads(SPECS[name])
    agents = [c for c in injected(SPECS[name]) if c["command"][1] == "agent"]
    assert agents
    _check_commands(data, agents)


def _check_commands(data: dict[str, str], containers: list[dict[str, Any]]) -> None:
    for c in containers:
        assert c["command"][0] == "kvpool", c["name"]
        sub = c["command"][1]
        # The real CLI parses the rendered arguments (an unknown flag fails before --help is seen).
        result = subprocess.run(
            [*KVPOOL, sub, *c["args"], "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"kvpool {sub} {c['args']}: {result.stderr}"
        reads = {p.envvar for p in cli.commands[sub].params if p.envvar}
        own = {e["name"] for e in c.get("env", []) if e["name"].startswith("KVPOOL_")}
        assert own <= reads, f"kvpool {sub} does not read {own - reads}"
        clients = {s.env for s in registry.SETTINGS_LIST if registry.CLIENT in s.readers}
        if c.get("envFrom"):  # the ConfigMap's keys reach this container: each must be read there
            assert set(data) <= reads | clients, f"no reader for {set(data) - reads - clients}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_configmap_key_has_a_reader(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = workloads(SPECS[name])
    node_reads = {p.envvar for p in cli.commands["node"].params if p.envvar}
    for key in data:
        setting = registry.by_env(key)
        assert setting is not None, f"{key} is no kvpool setting"
        assert key in node_reads or registry.CLIENT in setting.readers, key
    # The client-only keys, read for real by the connector and the Client.
    connector = load_settings({}, env=data)
    assert connector.url == data["KVPOOL_URL"] and connector.chunk_size == int(data["KVPOOL_CHUNK_SIZE"])
    if "KVPOOL_TLS_CA_FILE" in data:
        monkeypatch.setenv("KVPOOL_TLS_CA_FILE", data["KVPOOL_TLS_CA_FILE"])
        with pytest.raises(InvalidRequest, match=data["KVPOOL_TLS_CA_FILE"]):
            Client(data["KVPOOL_URL"])  # the CA is not mounted here: the client tried to read it
    assert set(data) - node_reads <= {"KVPOOL_URL", "KVPOOL_CHUNK_SIZE", "KVPOOL_TLS_CA_FILE"}


def test_scaling_changes_no_pod_template_and_no_configmap() -> None:
    one = {
        f"{o['kind']}/{o['metadata']['name']}": o
        for o in builders.desired(
            OWNER, settings.parse("pool", "ns", {**FULL, "replicas": 1}), service_monitors=True
        )
    }
    many = {f"{o['kind']}/{o['metadata']['name']}": o for o in
            builders.desired(OWNER, settings.parse("pool", "ns", {**FULL, "replicas": 7}), service_monitors=True)}  # fmt: skip
    assert one["StatefulSet/pool"]["spec"]["template"] == many["StatefulSet/pool"]["spec"]["template"]
    assert one["ConfigMap/pool-kvpool"] == many["ConfigMap/pool-kvpool"]
    assert (one["StatefulSet/pool"]["spec"]["replicas"], many["StatefulSet/pool"]["spec"]["replicas"]) == (
        1,
        7,
    )


def _http_ready(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def test_a_node_starts_from_a_rendered_pod(tmp_path: pathlib.Path) -> None:
    """The StatefulSet's arguments and environment (ConfigMap + pod env, downward API filled in, the
    Secret mounts pointed at local files) start a real node that takes the pool's settings."""
    spec = {
        "memory": "128MiB",
        "disk": {"size": "1Gi"},
        "auth": {"tokenSecret": {"name": "tok"}},
        "replicationFactor": 2,
        "tiers": {
            "redis": {"url": "redis://127.0.0.1:1/0"},
            "s3": {"url": "s3://kvpool-test/p", "endpoint": "http://127.0.0.1:1"},
        },
    }
    s = settings.parse("pool", "ns", spec)
    builders.check(s)
    sts = statefulset.build(OWNER, s, "h")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = statefulset.node_environment(s, configmap.data(s), pod_name="pool-0", pod_ip="127.0.0.1")
    mounts = {common.AUTH_DIR: tmp_path / "auth", common.DISK_DIR: tmp_path / "data"}
    for mount_path, local in mounts.items():
        local.mkdir()
        env = {k: v.replace(mount_path, str(local)) for k, v in env.items()}
    (tmp_path / "auth" / "token").write_text("s3cret\n")
    ports = {str(common.NODE_PORT): free_port(), str(common.NODE_HTTP_PORT): free_port(),
             str(common.NODE_DATA_PORT): free_port()}  # fmt: skip
    args = [str(ports.get(a, a)) for a in container["args"]]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    proc = subprocess.Popen(
        [*KVPOOL, *container["command"][1:], *args],
        env={**clean, **env, "KVPOOL_HOST": "127.0.0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _http_ready(ports[str(common.NODE_HTTP_PORT)], time.monotonic() + 30), "node never ready"
        url = f"grpc://127.0.0.1:{ports[str(common.NODE_PORT)]}"
        with Client(url, token="s3cret", timeout=5) as client:
            hello = client.hello()
            assert hello.node_id == "pool-0"  # KVPOOL_NODE_ID from the downward API
            assert hello.data_host == "127.0.0.1"  # KVPOOL_ADVERTISE_HOST: the pod IP
            assert hello.max_value_size == s.max_value_size
            client.put(b"k" * 32, b"v" * 100)
            assert client.get(b"k" * 32) == b"v" * 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "Traceback" not in out, out[-3000:]
    assert "disk" in out and any((tmp_path / "data").iterdir()), out[-3000:]
