"""The annotation `kvpool.io/kv-role` sets the injected connector's kv_role (disaggregated
prefill: prefill pods produce, decode pods consume); a value the webhook does not know is a skip
with the reason, never a guess."""

from __future__ import annotations

import json

import pytest

from kvpool.operator.webhook import patch, vllm_command

from .shapes import apply, container, pod, pool


def _transfer_config(annotation: str | None) -> tuple[patch.Decision, dict]:
    original = pod("bare-vllm-serve")
    if annotation is not None:
        original["metadata"]["annotations"][patch.ROLE_ANNOTATION] = annotation
    decision = patch.admit(original, original["metadata"]["namespace"], pool())
    patched = apply(original, decision.patch)
    words = vllm_command.argv(container(patched, "server"))
    config = json.loads(words[-1]) if "--kv-transfer-config" in words else None
    return decision, config


@pytest.mark.parametrize(
    ("annotation", "role"),
    [(None, "kv_both"), ("both", "kv_both"), ("producer", "kv_producer"), ("consumer", "kv_consumer"),
     (" consumer ", "kv_consumer"), ("kv_producer", "kv_producer")],
)  # fmt: skip
def test_the_role_annotation_sets_kv_role(annotation, role):
    decision, config = _transfer_config(annotation)
    assert decision.injected
    assert config == {**patch.CONNECTOR, "kv_role": role}


@pytest.mark.parametrize("annotation", ["prefill", "Producer", "", "kv_prefill"])
def test_an_unknown_role_is_a_skip_with_the_reason(annotation):
    decision, config = _transfer_config(annotation)
    assert not decision.injected and config is None
    assert decision.reason == f"kvpool.io/kv-role {annotation!r} is not one of both, producer, consumer"
