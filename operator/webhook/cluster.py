"""What the webhook asks of the API server: the pool a pod names, and its CA in the caBundle."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from .. import naming
from ..kube import Kube
from . import certs

WEBHOOK_CONFIG = ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration")


def get_pool(namespace: str, name: str) -> dict[str, Any] | None:
    with Kube() as kube:
        return kube.get(naming.API_VERSION, naming.KIND, namespace, name)


def ca_injector(config_name: str) -> Callable[[bytes], None]:
    """Keeps the operator's CA in every webhook of MutatingWebhookConfiguration `config_name`."""

    def inject(ca_pem: bytes) -> None:
        with Kube() as kube:
            config = kube.get(*WEBHOOK_CONFIG, None, config_name)
            if config is None:
                raise LookupError(f"MutatingWebhookConfiguration {config_name!r} not found")
            hooks = [dict(h) for h in config.get("webhooks") or []]
            changed = False
            for hook in hooks:
                client = dict(hook.get("clientConfig") or {})
                current = base64.b64decode(client.get("caBundle") or "")
                merged = certs.merge_bundle(current, ca_pem)
                if merged != current:
                    hook["clientConfig"] = {**client, "caBundle": base64.b64encode(merged).decode()}
                    changed = True
            if changed:  # a merge patch replaces the list; resourceVersion makes a concurrent write fail
                version = (config.get("metadata") or {}).get("resourceVersion")
                kube.merge_patch(*WEBHOOK_CONFIG, None, config_name,
                                 {"metadata": {"resourceVersion": version}, "webhooks": hooks})  # fmt: skip

    return inject
