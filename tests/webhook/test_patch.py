"""The admission decision, pure: every real-world pod shape patched into a valid pod (or skipped with
a reason), and admitting the result again changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvpool.operator import settings
from kvpool.operator.webhook import patch, vllm_command

from .shapes import EXPECTED, K8S, SECURE_SPEC, apply, container, env_of, pod, pool

CONNECTOR = '{"kv_connector":"KVPoolConnector","kv_connector_module_path":"kvpool.connector.vllm","kv_role":"kv_both"}'


def admit(obj: dict[str, Any], p: dict[str, Any] | None) -> tuple[patch.Decision, dict[str, Any]]:
    decision = patch.admit(obj, obj["metadata"]["namespace"], p)
    return decision, apply(obj, decision.patch)


@pytest.mark.parametrize("shape", sorted(EXPECTED))
def test_each_shape_is_injected_or_skipped_with_its_reason(shape: str) -> None:
    vllm_name, reason = EXPECTED[shape]
    original = pod(shape)
    ns = original["metadata"]["namespace"]
    ref = original["metadata"]["annotations"]["kvpool.io/pool"]
    decision, patched = admit(original, pool("infra" if "/" in ref else ns))
    notes = patched["metadata"]["annotations"]
    if reason is not None:
        assert not decision.injected and reason in decision.reason
        assert notes[patch.SKIP_ANNOTATION] == decision.reason and patch.INJECTED_ANNOTATION not in notes
        # Nothing but the annotation changed: the user's command and transfer config stay as written.
        assert {**patched, "metadata": {}} == {**original, "metadata": {}}
    else:
        assert decision.injected and decision.reason is None
        assert notes[patch.INJECTED_ANNOTATION] == (ref if "/" in ref else f"{ns}/{ref}")
        vllm = container(patched, vllm_name)
        words = vllm_command.argv(vllm)
        assert words[-2:] == ["--kv-transfer-config", CONNECTOR]
        before = vllm_command.argv(container(original, vllm_name))
        added = words[len(before) : -2]  # appended, nothing rewritten
        assert words[: len(before)] == before
        assert added in ([], ["--shutdown-timeout", "10"]) and (added == []) == (
            "--shutdown-timeout" in " ".join(before)
        )
        env = env_of(vllm)
        assert env["KVPOOL_URL"] == "grpc://127.0.0.1:7420" and env["KVPOOL_CHUNK_SIZE"] == "256"
        assert env["PYTHONPATH"].split(":")[0] == patch.PAYLOAD_DIR
        # Only client settings reach vLLM: nothing a node reads (memory, peers, tiers...).
        assert {k for k in env if k.startswith("KVPOOL_")} == {"KVPOOL_URL", "KVPOOL_CHUNK_SIZE"}
        mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
        assert mounts["kvpool-python"] == "/kvpool/python" and mounts["kvpool-arena"] == "/var/run/kvpool"
        inits = patched["spec"]["initContainers"]
        assert [c["name"] for c in inits][-2:] == ["kvpool-connector", "kvpool-agent"]
        assert inits[:-2] == original["spec"].get("initContainers", [])  # the user's run first, unchanged
        agent = inits[-1]
        assert agent["restartPolicy"] == "Always" and agent["command"] == ["kvpool", "agent"]
        others = [c for c in original["spec"]["containers"] if c["name"] != vllm_name]
        assert [c for c in patched["spec"]["containers"] if c["name"] != vllm_name] == others
    again = patch.admit(patched, ns, pool(ns))
    assert again.patch == [], f"admitting the patched pod again changed it: {again.patch}"


def test_agent_sidecar_follows_the_contract() -> None:
    _decision, patched = admit(pod("bare-vllm-serve"), pool(agent={"memory": "3GiB"}))
    agent = patched["spec"]["initContainers"][-1]
    args = agent["args"]
    assert args[:10] == ["--port", "7420", "--http-port", "7421", "--memory", str(3 << 30), "--lookup-url",
                         "grpc://kvpool-lookup.serving.svc:7410", "--pool-url", "grpc://kvpool.serving.svc:7400"]  # fmt: skip
    # 0666: the arena volume is the pod's own, and a non-root vLLM container is rarely in the agent's group.
    assert args[10:] == ["--arena-dir", "/var/run/kvpool", "--arena-mode", "0666"]
    env = env_of(agent)
    assert env["KVPOOL_AGENT_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KVPOOL_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    arena = next(v for v in patched["spec"]["volumes"] if v["name"] == "kvpool-arena")
    assert arena["emptyDir"]["medium"] == "Memory"
    from kvpool.operator.settings import parse_quantity

    assert parse_quantity(arena["emptyDir"]["sizeLimit"]) >= 3 << 30
    # Memory request = limit = arena + the agent's overhead (the arena's pages are charged to the agent).
    limit = parse_quantity(agent["resources"]["limits"]["memory"])
    assert (
        agent["resources"]["requests"]["memory"] == agent["resources"]["limits"]["memory"] and limit > 3 << 30
    )
    assert {m["mountPath"] for m in agent["volumeMounts"]} >= {"/var/run/kvpool"}
    assert "startupProbe" not in agent and "readinessProbe" not in agent  # vLLM never waits for the cache
    connector = patched["spec"]["initContainers"][-2]
    assert connector["command"] == ["kvpool", "payload"] and connector["args"] == ["/kvpool/python"]


def test_auth_and_tls_pool_gives_token_by_reference_and_the_ca_only() -> None:
    _decision, patched = admit(pod("production-stack"), pool(**SECURE_SPEC))
    vllm = container(patched, "vllm")
    env = env_of(vllm)
    assert env["KVPOOL_AUTH_TOKEN"] == {"secretKeyRef": {"name": "kvpool-token", "key": "token"}}
    assert env["KVPOOL_TLS_CA_FILE"] == "/etc/kvpool/tls/ca.crt"
    ca = next(v for v in patched["spec"]["volumes"] if v["name"] == "kvpool-ca")
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the key
    agent = patched["spec"]["initContainers"][-1]
    assert "--pool-url" in agent["args"] and agent["args"][agent["args"].index("--pool-url") + 1] == (
        "grpcs://kvpool.serving.svc:7400"
    )
    assert agent["args"][-2:] == ["--auth-token-file", "/etc/kvpool/auth/token"]
    assert env_of(agent)["KVPOOL_TLS_CA_FILE"] == "/etc/kvpool/tls/ca.crt"


@pytest.mark.parametrize("spec", [{"agent": {"enabled": False}}, {"lookup": {"replicas": 0}}])
def test_without_agent_vllm_talks_to_the_pool(spec: dict[str, Any]) -> None:
    decision, patched = admit(pod("llm-d-decode"), pool("infra", **spec))
    assert decision.injected
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["routing-proxy", "kvpool-connector"]
    env = env_of(container(patched, "vllm"))
    assert env["KVPOOL_URL"] == "grpc://kvpool.infra.svc:7400"
    assert "kvpool-arena" not in {v["name"] for v in patched["spec"]["volumes"]}


def test_pythonpath_of_the_pod_is_kept_behind_the_connector() -> None:
    _decision, patched = admit(pod("bare-vllm-serve"), pool())
    assert env_of(container(patched, "server"))["PYTHONPATH"] == "/kvpool/python:/plugins"


def test_user_settings_win_over_the_pools() -> None:
    obj = pod("production-stack")
    container(obj, "vllm")["env"].append({"name": "KVPOOL_CHUNK_SIZE", "value": "512"})
    _decision, patched = admit(obj, pool())
    names = [e["name"] for e in container(patched, "vllm")["env"]]
    assert (
        names.count("KVPOOL_CHUNK_SIZE") == 1
        and env_of(container(patched, "vllm"))["KVPOOL_CHUNK_SIZE"] == "512"
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["metadata"]["annotations"].pop("kvpool.io/pool"), "no kvpool.io/pool annotation"),
        (lambda p: p["metadata"]["annotations"].update({"kvpool.io/pool": "a/b/c"}), "is not a pool name"),
        (lambda p: container(p, "server").update(args=["--block-size", "48"]), "not a multiple of"),
        (lambda p: container(p, "server").update(args=["--block-size=96"]), "--block-size 96"),
        (lambda p: p["metadata"]["annotations"].update({"kvpool.io/container": "nope"}), "'nope'"),
        (lambda p: (p["metadata"]["annotations"].update({"kvpool.io/container": "log-shipper"}),
                    container(p, "log-shipper").update(command=["/fluent-bit/bin/fluent-bit"])),
         "does not run `vllm serve`"),
        (lambda p: p["spec"]["containers"].append({**container(p, "server"), "name": "second"}),
         "several containers run vLLM (server, second)"),
        (lambda p: p["spec"]["containers"].pop(0), "no container runs"),
        (lambda p: container(p, "server")["env"].__setitem__(0, {"name": "PYTHONPATH", "valueFrom": {
            "configMapKeyRef": {"name": "x", "key": "y"}}}), "PYTHONPATH from valueFrom"),
        (lambda p: p["spec"].update(volumes=[{"name": "kvpool-python", "emptyDir": {}}]), "kvpool-python"),
    ],
)  # fmt: skip
def test_skip_reasons(change: Any, reason: str) -> None:
    obj = pod("bare-vllm-serve")
    change(obj)
    decision, patched = admit(obj, pool())
    assert not decision.injected and reason in decision.reason, decision.reason
    assert patched["metadata"]["annotations"][patch.SKIP_ANNOTATION] == decision.reason


def test_pool_not_found_or_invalid_is_a_skip() -> None:
    obj = pod("bare-vllm-serve")
    decision, _ = admit(obj, None)
    assert decision.reason == "KVCachePool serving/kvpool not found"
    decision, _ = admit(obj, pool(chunkSize=100))
    assert "invalid spec" in decision.reason and "multiple of 16" in decision.reason


def test_a_skipped_pod_admitted_again_gets_no_patch_and_injection_clears_the_reason() -> None:
    obj = pod("bare-vllm-serve")
    _, skipped = admit(obj, None)
    assert patch.admit(skipped, "serving", None).patch == []
    decision, patched = admit(skipped, pool())  # the pool exists now (e.g. the pod was recreated)
    assert decision.injected and patch.SKIP_ANNOTATION not in patched["metadata"]["annotations"]


def test_pod_without_annotations_or_args_gets_them_created() -> None:
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "serving",
           "labels": {"kvpool.io/inject": "true"}},
           "spec": {"containers": [{"name": "v", "image": "vllm/vllm-openai", "command": ["vllm", "serve", "m"]}]}}  # fmt: skip
    decision, patched = admit(obj, None)
    assert patched["metadata"]["annotations"] == {patch.SKIP_ANNOTATION: decision.reason}
    obj["metadata"]["annotations"] = {"kvpool.io/pool": "kvpool"}
    decision, patched = admit(obj, pool())
    assert container(patched, "v")["args"] == ["--shutdown-timeout", "10", "--kv-transfer-config", CONNECTOR]
    assert json.loads(CONNECTOR)["kv_connector_module_path"] == "kvpool.connector.vllm"


@pytest.mark.parametrize(
    ("grace", "args", "expected"),
    [
        (None, [], ["--shutdown-timeout", "10"]),  # Kubernetes' default grace period, 30 s
        (12, [], ["--shutdown-timeout", "7"]),  # 5 s of the grace period left for vLLM's teardown
        (3, [], ["--shutdown-timeout", "1"]),
        (None, ["--shutdown-timeout", "60"], []),  # the user's own value is kept
        (None, ["--shutdown_timeout=0"], []),
    ],
)
def test_the_engine_gets_time_to_flush_its_saves_on_sigterm(grace, args, expected) -> None:
    """vLLM's default --shutdown-timeout 0 kills the engine the moment the pod gets SIGTERM, before
    the connector can write the chunks it holds: injected pods get time unless they chose."""
    cmd = vllm_command.parse({"command": ["vllm", "serve", "m", *args]})
    spec = {} if grace is None else {"terminationGracePeriodSeconds": grace}
    assert patch.shutdown_timeout_args(cmd, spec) == expected


@pytest.mark.parametrize(
    ("words", "options"),
    [
        (["vllm", "serve", "m", "--port", "1"], ["m", "--port", "1"]),
        (["/opt/venv/bin/vllm", "serve"], []),
        (["python3.12", "-m", "vllm.entrypoints.openai.api_server", "--model=x"], ["--model=x"]),
        (["env", "A=b", "vllm", "serve", "m"], ["m"]),
        (["tini", "--", "vllm", "serve"], []),
        (["vllm", "chat"], None),
        (["python", "-m", "vllm.entrypoints.api_server"], None),
        (["bash", "-c", "vllm serve m"], None),
        (["sglang", "serve", "vllm", "serve"], None),
    ],
)
def test_vllm_command_recognition(words: list[str], options: list[str] | None) -> None:
    cmd = vllm_command.parse({"command": words})
    assert (None if cmd is None else list(cmd.options)) == options
    assert vllm_command.shell_wrapped({"command": words}) == (words[0] == "bash")


def test_k8s_version_is_pinned() -> None:
    assert K8S == "1.35.0"


def _file_mode(volume: dict[str, Any], key: str) -> int:
    """The mode the kubelet gives a Secret item's file: the item's own, else defaultMode (0644)."""
    secret = volume["secret"]
    item = next((i for i in secret.get("items") or [] if i["key"] == key), {})
    return item.get("mode", secret.get("defaultMode", 0o644))


def test_secret_files_are_readable_by_the_agent_without_changing_the_pods_security() -> None:
    """Without an fsGroup the kubelet writes Secret files as root:root; the agent runs as 10001, so
    the token must be readable by others (the webhook never adds an fsGroup to the user's pod)."""
    original = pod("production-stack")
    _decision, patched = admit(original, pool(**SECURE_SPEC))
    assert patched["spec"].get("securityContext") == original["spec"].get("securityContext")
    agent = patched["spec"]["initContainers"][-1]
    assert agent["securityContext"]["runAsUser"] == patch.RUN_AS
    volumes = {v["name"]: v for v in patched["spec"]["volumes"]}
    mounted = {m["name"] for m in agent["volumeMounts"]}
    assert {"kvpool-auth", "kvpool-ca"} <= mounted
    assert _file_mode(volumes["kvpool-auth"], "token") & 0o004, "the agent cannot read the token"
    assert _file_mode(volumes["kvpool-ca"], "ca.crt") & 0o004
    assert "kvpool-auth" not in {m["name"] for m in container(patched, "vllm")["volumeMounts"]}


@pytest.mark.parametrize(
    ("own", "expected"),
    [
        (None, [{"name": "regcred"}, {"name": "mirror"}]),
        ([{"name": "mine"}], [{"name": "mine"}, {"name": "regcred"}, {"name": "mirror"}]),
        ([{"name": "regcred"}], [{"name": "regcred"}, {"name": "mirror"}]),  # no duplicate
    ],
)
def test_the_pools_pull_secrets_reach_the_pod(own: list[dict[str, str]] | None, expected: list[Any]) -> None:
    """The injected init containers run the pool's image: without its pull secrets the pod would be
    stuck in Init:ImagePullBackOff."""
    obj = pod("bare-vllm-serve")
    obj["spec"].pop("imagePullSecrets", None)
    if own is not None:
        obj["spec"]["imagePullSecrets"] = own
    decision, patched = admit(obj, pool(imagePullSecrets=[{"name": "regcred"}, {"name": "mirror"}]))
    assert decision.injected and patched["spec"]["imagePullSecrets"] == expected


def test_a_pool_without_pull_secrets_leaves_the_pods_alone() -> None:
    obj = pod("bare-vllm-serve")
    obj["spec"].pop("imagePullSecrets", None)
    _decision, patched = admit(obj, pool())
    assert "imagePullSecrets" not in patched["spec"]


@pytest.mark.parametrize(
    ("spec", "secrets"),
    [
        (SECURE_SPEC, "kvpool-token, kvpool-tls"),
        ({"auth": SECURE_SPEC["auth"]}, "kvpool-token"),
        ({"tls": SECURE_SPEC["tls"]}, "kvpool-tls"),
    ],
)
def test_a_pool_elsewhere_with_auth_or_tls_is_a_skip(spec: dict[str, Any], secrets: str) -> None:
    """Secret references resolve in the pod's namespace only: a token or CA from the pool's namespace
    would keep the pod from starting."""
    obj = pod("bare-vllm-serve")
    obj["metadata"]["annotations"]["kvpool.io/pool"] = "infra/kvpool"
    decision, patched = admit(obj, pool("infra", **spec))
    assert not decision.injected
    assert f"Secrets ({secrets}) live in namespace infra" in decision.reason
    assert "reference a KVCachePool in namespace serving" in decision.reason
    assert {**patched, "metadata": {}} == {**obj, "metadata": {}}
    # The same pool named with the pod's own namespace is injected.
    obj["metadata"]["annotations"]["kvpool.io/pool"] = "serving/kvpool"
    assert admit(obj, pool("serving", **spec))[0].injected


def test_injected_containers_run_the_image_the_pool_is_pinned_to() -> None:
    """A pool without spec.image runs the image it was created with, not this operator's default."""
    pinned = pool()
    pinned["spec"].pop("image", None)
    pinned["metadata"]["annotations"] = {settings.PINNED_IMAGE: "registry.example/kvpool:0.0.9"}
    _decision, patched = admit(pod("bare-vllm-serve"), pinned)
    images = {c["name"]: c["image"] for c in patched["spec"]["initContainers"]}
    assert images == {
        "kvpool-connector": "registry.example/kvpool:0.0.9",
        "kvpool-agent": "registry.example/kvpool:0.0.9",
    }
