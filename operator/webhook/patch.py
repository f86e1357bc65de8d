"""The admission decision for one pod, as a JSON Patch (RFC 6902) against the pod as submitted.

Pure: the server hands in the pod and the pool it names (or None when there is none) and sends back
what this returns. An opted-in vLLM pod gets, without an image rebuild:

- an init container `kvpool-connector` that copies the connector into the volume `kvpool-python`,
  which the vLLM container mounts and finds on `PYTHONPATH`;
- the agent `kvpool-agent` as a native sidecar (an init container with `restartPolicy: Always`)
  whose shared-memory arena lives in the memory-backed volume `kvpool-arena`, mounted into vLLM too;
- on the vLLM container: `--kv-transfer-config` naming KVPoolConnector by module path (kv_role from
  the annotation `kvpool.io/kv-role`, `both` by default), and only the
  client settings (`KVPOOL_URL`, `KVPOOL_CHUNK_SIZE`, the token by Secret reference, the CA);
  `--shutdown-timeout` too when the container sets none (``shutdown_timeout_args``);
- the pool's `imagePullSecrets` the pod lacks (the injected containers run the pool's image).

The pod's own security settings are never changed: the token file is world-readable (mode 0444, in
a volume only the agent mounts) because without an `fsGroup` the kubelet writes it as root:root.
A pool in another namespace that uses auth or TLS is a skip: its Secrets are not the pod's to use.

Anything it will not or cannot do is a skip: the pod is admitted as it came, with the reason in
the annotation `kvpool.io/skip-reason`. A pod already injected is admitted unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .. import naming
from ..builders.common import (
    AUTH_DIR,
    CA_KEY,
    LOOKUP_PORT,
    TLS_DIR,
    endpoints,
    env,
    restricted_security_context,
)
from ..settings import InvalidSpec, PoolSettings, effective_spec, parse
from ..sizing import MiB, quantity
from . import vllm_command

INJECT_LABEL = "kvpool.io/inject"
POOL_ANNOTATION = "kvpool.io/pool"
CONTAINER_ANNOTATION = "kvpool.io/container"
INJECTED_ANNOTATION = "kvpool.io/injected"
SKIP_ANNOTATION = "kvpool.io/skip-reason"
ROLE_ANNOTATION = "kvpool.io/kv-role"
ROLES = {"both": "kv_both", "producer": "kv_producer", "consumer": "kv_consumer"}
"""The annotation's values → vLLM's kv_role: disaggregated prefill runs prefill pods as producers
(they store and never load) and decode pods as consumers (docs/disaggregated.md)."""

CONNECTOR = {
    "kv_connector": "KVPoolConnector",
    "kv_connector_module_path": "kvpool.connector.vllm",
    "kv_role": "kv_both",
}
PAYLOAD_DIR = "/kvpool/python"
ARENA_DIR = "/var/run/kvpool"
AGENT_PORT, AGENT_HTTP_PORT = 7420, 7421  # DESIGN.md §1
AGENT_URL = f"grpc://127.0.0.1:{AGENT_PORT}"
ARENA_MODE = "0666"
"""The arena volume is this pod's own emptyDir: any user the vLLM container runs as may map the file."""
ARENA_SLACK = 64 * MiB
"""Room in the arena volume beyond the arena itself (the agent's small files beside it)."""
RUN_AS = 10001
SHUTDOWN_TIMEOUT_S = 10
"""vLLM's `--shutdown-timeout` for an injected pod that sets none. vLLM's default, 0, kills the engine
the moment the pod gets SIGTERM: chunks the connector is still writing then never reach the pool.
Given time, the engine shuts down and the connector flushes them (`shutdown_flush_ms`, 5 s)."""
SHUTDOWN_MARGIN_S = 5
"""Seconds of the pod's termination grace period left for vLLM's own teardown after that."""

PAYLOAD_VOLUME, ARENA_VOLUME, TMP_VOLUME = "kvpool-python", "kvpool-arena", "kvpool-tmp"
CA_VOLUME, AUTH_VOLUME = "kvpool-ca", "kvpool-auth"
CONNECTOR_CONTAINER, AGENT_CONTAINER = "kvpool-connector", "kvpool-agent"


@dataclasses.dataclass(frozen=True)
class Decision:
    patch: list[dict[str, Any]]
    """JSON Patch operations; empty when the pod is admitted exactly as it came."""
    injected: bool = False
    reason: str | None = None
    """Why the pod was not injected (also in the annotation), None when it was or is already."""


class Skip(Exception):
    """The pod is admitted unchanged; the message says why (it goes to `kvpool.io/skip-reason`)."""


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def annotations(pod: dict[str, Any]) -> dict[str, str]:
    return dict((pod.get("metadata") or {}).get("annotations") or {})


def pool_reference(pod: dict[str, Any], namespace: str) -> tuple[str, str]:
    """(namespace, name) of the pool the pod asks for: `name` (the pod's namespace) or `namespace/name`."""
    ref = annotations(pod).get(POOL_ANNOTATION, "").strip()
    if not ref:
        raise Skip(f"no {POOL_ANNOTATION} annotation: name the KVCachePool (name or namespace/name)")
    ns, _, name = ref.rpartition("/")
    if not name or "/" in ns:
        raise Skip(f"{POOL_ANNOTATION} {ref!r} is not a pool name or namespace/name")
    return ns or namespace, name


def kv_role(pod: dict[str, Any]) -> str:
    """vLLM's kv_role for the pod's connector: `both` unless the role annotation says otherwise
    (vLLM's own names, e.g. `kv_producer`, are taken too)."""
    value = annotations(pod).get(ROLE_ANNOTATION, "both").strip()
    role = ROLES.get(value) or (value if value in ROLES.values() else None)
    if role is None:
        raise Skip(f"{ROLE_ANNOTATION} {value!r} is not one of {', '.join(ROLES)}")
    return role


def _annotate(
    pod: dict[str, Any], values: dict[str, str], remove: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):  # absent or null: the patch must create it to apply
        return [{"op": "add", "path": "/metadata", "value": {"annotations": values}}]
    current = metadata.get("annotations")
    if not isinstance(current, dict):  # absent, null (or not a map): set the whole map
        return [{"op": "add", "path": "/metadata/annotations", "value": values}]
    ops: list[dict[str, Any]] = [
        {"op": "add", "path": _pointer("metadata", "annotations", k), "value": v} for k, v in values.items()
    ]
    ops += [{"op": "remove", "path": _pointer("metadata", "annotations", k)} for k in remove if k in current]
    return ops


def skipped(pod: dict[str, Any], reason: str) -> Decision:
    """Admit unchanged but for the reason; a pod already carrying the same reason gets no patch."""
    if annotations(pod).get(SKIP_ANNOTATION) == reason:
        return Decision([], reason=reason)
    return Decision(_annotate(pod, {SKIP_ANNOTATION: reason}), reason=reason)


def _vllm_container(pod: dict[str, Any]) -> tuple[int, vllm_command.VllmCommand]:
    containers = list((pod.get("spec") or {}).get("containers") or [])
    named = annotations(pod).get(CONTAINER_ANNOTATION)
    if named:
        index = next((i for i, c in enumerate(containers) if c.get("name") == named), None)
        if index is None:
            raise Skip(f"{CONTAINER_ANNOTATION} names container {named!r}, which the pod does not have")
        c = containers[index]
        cmd = vllm_command.parse(c)
        if cmd is not None:
            return index, cmd
        if vllm_command.shell_wrapped(c):
            raise Skip(_shell_reason(named))
        if not c.get("command"):  # the image's entrypoint runs vLLM (vllm/vllm-openai: `vllm serve`)
            return index, vllm_command.VllmCommand(tuple(vllm_command.argv(c)), 0)
        raise Skip(
            f"container {named!r} does not run `vllm serve` or `python -m {vllm_command.API_SERVER_MODULE}`"
        )
    found = [(i, cmd) for i, c in enumerate(containers) if (cmd := vllm_command.parse(c)) is not None]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(containers[i].get("name", "?") for i, _ in found)
        raise Skip(
            f"several containers run vLLM ({names}); name one in the {CONTAINER_ANNOTATION} annotation"
        )
    shells = [c.get("name", "?") for c in containers if vllm_command.shell_wrapped(c)]
    if shells:
        raise Skip(_shell_reason(shells[0]))
    raise Skip(
        f"no container runs `vllm serve` or `python -m {vllm_command.API_SERVER_MODULE}`; "
        f"name it in the {CONTAINER_ANNOTATION} annotation if the image's entrypoint starts vLLM"
    )


def _shell_reason(name: str) -> str:
    return (
        f"container {name!r} starts vLLM inside a shell line (sh -c); kvpool does not rewrite scripts: "
        "run vllm serve as the command, or add --kv-transfer-config to the script yourself"
    )


def _check_command(cmd: vllm_command.VllmCommand, name: str, s: PoolSettings) -> None:
    if cmd.has(vllm_command.TRANSFER_CONFIG_FLAGS):
        raise Skip(f"container {name!r} already has a --kv-transfer-config; kvpool never overwrites one")
    block = cmd.value(vllm_command.BLOCK_SIZE_FLAGS)
    if block is not None:
        try:
            size = int(block)
        except ValueError:
            raise Skip(f"container {name!r}: --block-size {block!r} is not a number") from None
        if size <= 0 or s.chunk_size % size:
            raise Skip(
                f"the pool's chunk size {s.chunk_size} is not a multiple of container {name!r}'s "
                f"--block-size {size}; use a block size that divides it"
            )


def uses_agent(s: PoolSettings) -> bool:
    """The agent needs the pool's lookup service; without it (or with spec.agent.enabled false)
    vLLM talks to the pool's nodes directly."""
    return s.agent_enabled and s.lookup_replicas > 0


def connector_container(s: PoolSettings) -> dict[str, Any]:
    """Copies the connector into the shared volume (`kvpool payload`, docs/install.md)."""
    return {
        "name": CONNECTOR_CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["kvpool", "payload"],
        "args": [PAYLOAD_DIR],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": PAYLOAD_VOLUME, "mountPath": PAYLOAD_DIR}],
        "securityContext": {**restricted_security_context(), "runAsUser": RUN_AS, "runAsGroup": RUN_AS},
    }


def agent_args(s: PoolSettings) -> list[str]:
    urls = endpoints(s)
    lookup = urls.get("lookup") or f"grpc://{naming.lookup_name(s.name)}.{s.namespace}.svc:{LOOKUP_PORT}"
    args = [
        "--port", str(AGENT_PORT), "--http-port", str(AGENT_HTTP_PORT), "--memory", str(s.agent_memory),
        "--lookup-url", lookup, "--pool-url", urls["grpc"], "--arena-dir", ARENA_DIR,
        "--arena-mode", ARENA_MODE,
    ]  # fmt: skip
    if s.auth_token:
        args += ["--auth-token-file", f"{AUTH_DIR}/{s.auth_token.key}"]
    return args


def agent_container(s: PoolSettings) -> dict[str, Any]:
    """The agent as a native sidecar. No startup or readiness probe on purpose: vLLM must start and
    serve even when the agent cannot (the connector treats a missing agent as misses)."""
    memory = quantity(s.agent_container_memory)
    resources: dict[str, Any] = {"requests": {"memory": memory}, "limits": {"memory": memory}}
    if s.agent_cpu_request:
        resources["requests"]["cpu"] = s.agent_cpu_request
    if s.agent_cpu_limit:
        resources["limits"]["cpu"] = s.agent_cpu_limit
    mounts = [{"name": ARENA_VOLUME, "mountPath": ARENA_DIR}, {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    agent_env: list[dict[str, Any]] = [
        {"name": "KVPOOL_AGENT_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KVPOOL_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if s.auth_token:
        mounts.append({"name": AUTH_VOLUME, "mountPath": AUTH_DIR, "readOnly": True})
    if s.tls_secret:
        mounts.append({"name": CA_VOLUME, "mountPath": TLS_DIR, "readOnly": True})
        agent_env.append({"name": env("tls_ca_file"), "value": f"{TLS_DIR}/{CA_KEY}"})
    return {
        "name": AGENT_CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["kvpool", "agent"],
        "args": agent_args(s),
        "env": agent_env,
        "ports": [
            {"name": "kvp-agent-grpc", "containerPort": AGENT_PORT, "protocol": "TCP"},
            {"name": "kvp-agent-http", "containerPort": AGENT_HTTP_PORT, "protocol": "TCP"},
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {**restricted_security_context(), "runAsUser": RUN_AS, "runAsGroup": RUN_AS},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": AGENT_HTTP_PORT, "scheme": "HTTP"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def volumes(s: PoolSettings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": PAYLOAD_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}}]
    if uses_agent(s):
        out += [
            {"name": ARENA_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": quantity(s.agent_memory + ARENA_SLACK)}},
            {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
        ]  # fmt: skip
        if s.auth_token:  # readable by the agent's uid: the kubelet writes Secret files as root:root
            out.append({"name": AUTH_VOLUME, "secret": {"secretName": s.auth_token.name, "defaultMode": 0o444,
                        "items": [{"key": s.auth_token.key, "path": s.auth_token.key, "mode": 0o444}]}})  # fmt: skip
    if s.tls_secret:  # the CA only, never the key
        out.append({"name": CA_VOLUME, "secret": {"secretName": s.tls_secret, "defaultMode": 0o444,
                    "items": [{"key": CA_KEY, "path": CA_KEY}]}})  # fmt: skip
    return out


def client_env(s: PoolSettings) -> list[dict[str, Any]]:
    """The client settings of the vLLM container; the node settings stay with the nodes."""
    out: list[dict[str, Any]] = [
        {"name": env("url"), "value": AGENT_URL if uses_agent(s) else endpoints(s)["grpc"]},
        {"name": env("chunk_size"), "value": str(s.chunk_size)},
    ]
    if s.auth_token:
        out.append({"name": env("auth_token"),
                    "valueFrom": {"secretKeyRef": {"name": s.auth_token.name, "key": s.auth_token.key}}})  # fmt: skip
    if s.tls_secret:
        out.append({"name": env("tls_ca_file"), "value": f"{TLS_DIR}/{CA_KEY}"})
    return out


def client_mounts(s: PoolSettings) -> list[dict[str, Any]]:
    out = [{"name": PAYLOAD_VOLUME, "mountPath": PAYLOAD_DIR, "readOnly": True}]
    if uses_agent(s):
        out.append({"name": ARENA_VOLUME, "mountPath": ARENA_DIR})
    if s.tls_secret:
        out.append({"name": CA_VOLUME, "mountPath": TLS_DIR, "readOnly": True})
    return out


def _append(ops: list[dict[str, Any]], obj: dict[str, Any], base: tuple[str | int, ...], key: str,
            items: list[Any]) -> None:  # fmt: skip
    """Ops appending `items` to the list obj[key] at JSON pointer `base` (creating it when absent)."""
    if not items:
        return
    if not isinstance(obj.get(key), list):  # absent or null: "add" creates (or replaces) it
        ops.append({"op": "add", "path": _pointer(*base, key), "value": items})
    else:
        ops += [{"op": "add", "path": _pointer(*base, key, "-"), "value": item} for item in items]


def shutdown_timeout_args(cmd: vllm_command.VllmCommand, pod_spec: dict[str, Any]) -> list[str]:
    """`--shutdown-timeout N` unless the container sets one: N is ``SHUTDOWN_TIMEOUT_S``, or less when
    the pod's termination grace period (Kubernetes' default 30 s) leaves less room."""
    if cmd.has(vllm_command.SHUTDOWN_TIMEOUT_FLAGS):
        return []
    grace = pod_spec.get("terminationGracePeriodSeconds")
    grace = 30 if grace is None else int(grace)
    return ["--shutdown-timeout", str(max(1, min(SHUTDOWN_TIMEOUT_S, grace - SHUTDOWN_MARGIN_S)))]


def secret_names(s: PoolSettings) -> list[str]:
    """The Secrets an injected pod references besides pull secrets (the token, the CA)."""
    return [n for n in (s.auth_token.name if s.auth_token else None, s.tls_secret) if n]


def check_namespace(s: PoolSettings, namespace: str) -> None:
    """A pod can use Secrets of its own namespace only: the token and CA of a pool elsewhere would
    leave the pod stuck in ContainerCreating (or CreateContainerConfigError), so such a pod is skipped."""
    names = secret_names(s)
    if s.namespace == namespace or not names:
        return
    raise Skip(
        f"KVCachePool {s.namespace}/{s.name} uses auth or TLS and its Secrets ({', '.join(names)}) live in "
        f"namespace {s.namespace}; a pod can only use Secrets of its own namespace: reference a KVCachePool "
        f"in namespace {namespace} (or a pool without auth and TLS)"
    )


def pull_secret_ops(spec: dict[str, Any], s: PoolSettings) -> list[dict[str, Any]]:
    """Ops adding the pool's pull secrets the pod lacks: the injected containers run the pool's image.
    For a pool in another namespace the same names must exist in the pod's; a missing one costs the
    kubelet only a warning (it pulls with what it has), so they are merged all the same."""
    have = {(r or {}).get("name") for r in spec.get("imagePullSecrets") or []}
    ops: list[dict[str, Any]] = []
    _append(
        ops,
        spec,
        ("spec",),
        "imagePullSecrets",
        [{"name": n} for n in dict.fromkeys(s.image_pull_secrets) if n not in have],
    )
    return ops


def _inject(pod: dict[str, Any], s: PoolSettings, pool_ref: str) -> list[dict[str, Any]]:
    spec = pod.get("spec") or {}
    index, cmd = _vllm_container(pod)
    container = spec["containers"][index]
    name = container.get("name", "?")
    _check_command(cmd, name, s)
    role = kv_role(pod)

    taken_volumes = {v.get("name") for v in spec.get("volumes") or []}
    taken_init = {c.get("name") for c in spec.get("initContainers") or []}
    new_volumes = volumes(s)
    if clash := sorted(taken_volumes & {v["name"] for v in new_volumes}):
        raise Skip(f"the pod already has volumes named {', '.join(clash)}")
    if clash := sorted(taken_init & {CONNECTOR_CONTAINER, AGENT_CONTAINER}):
        raise Skip(f"the pod already has init containers named {', '.join(clash)}")
    mounts = client_mounts(s)
    used_paths = {m.get("mountPath", "").rstrip("/") for m in container.get("volumeMounts") or []}
    if clash := sorted(used_paths & {m["mountPath"] for m in mounts}):
        raise Skip(f"container {name!r} already mounts something at {', '.join(clash)}")

    own_env = {e.get("name"): e for e in container.get("env") or []}
    new_env = [e for e in client_env(s) if e["name"] not in own_env]  # what the user set wins
    base = ("spec", "containers", index)
    ops: list[dict[str, Any]] = []
    pythonpath = own_env.get("PYTHONPATH")
    if pythonpath is None:
        new_env.insert(0, {"name": "PYTHONPATH", "value": PAYLOAD_DIR})
    elif "valueFrom" in pythonpath:
        raise Skip(
            f"container {name!r} takes PYTHONPATH from valueFrom; kvpool cannot put its connector on it"
        )
    elif PAYLOAD_DIR not in str(pythonpath.get("value", "")).split(":"):
        position = [e.get("name") for e in container["env"]].index("PYTHONPATH")
        value = ":".join(p for p in (PAYLOAD_DIR, pythonpath.get("value", "")) if p)
        ops.append({"op": "replace", "path": _pointer(*base, "env", position, "value"), "value": value})

    ops += pull_secret_ops(spec, s)
    _append(ops, spec, ("spec",), "volumes", new_volumes)
    inits = [connector_container(s)] + ([agent_container(s)] if uses_agent(s) else [])
    _append(ops, spec, ("spec",), "initContainers", inits)
    _append(ops, container, base, "env", new_env)
    _append(ops, container, base, "volumeMounts", mounts)
    _append(
        ops,
        container,
        base,
        "args",
        [
            *shutdown_timeout_args(cmd, spec),
            "--kv-transfer-config",
            json.dumps({**CONNECTOR, "kv_role": role}, separators=(",", ":")),
        ],
    )
    ops += _annotate(pod, {INJECTED_ANNOTATION: pool_ref}, remove=(SKIP_ANNOTATION,))
    return ops


def admit(pod: dict[str, Any], namespace: str, pool: dict[str, Any] | None) -> Decision:
    """The decision for `pod` (in `namespace`) given the KVCachePool its annotation names (None: not found)."""
    if INJECTED_ANNOTATION in annotations(pod):
        return Decision([])
    try:
        pool_ns, pool_name = pool_reference(pod, namespace)
        if pool is None:
            raise Skip(f"KVCachePool {pool_ns}/{pool_name} not found")
        try:
            s = parse(pool_name, pool_ns, effective_spec(pool))
        except InvalidSpec as exc:
            raise Skip(f"KVCachePool {pool_ns}/{pool_name} has an invalid spec: {exc}") from None
        check_namespace(s, namespace)
        return Decision(_inject(pod, s, f"{pool_ns}/{pool_name}"), injected=True)
    except Skip as exc:
        return skipped(pod, str(exc))
