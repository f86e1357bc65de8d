"""Admission reviews (operator/webhook/server.py, patch.py) through the real webhook server over
HTTPS: real-world pods with parts replaced by arbitrary JSON, and bodies that are not JSON at all.
The webhook fails open: every review is answered 200 with `allowed: true` (or 400 for a body
that is no JSON object), and any patch it returns applies cleanly to the pod it was given (a
patch that did not apply would make the API server refuse the pod: a failed admission)."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import ssl
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.cli.devtools.local_servers import free_port
from kvpool.operator.webhook.server import WebhookServer

from ..webhook.shapes import EXPECTED, pod, pool
from .profiles import socket_examples

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)


class Webhook:
    """The real server, and one kept-alive HTTPS connection to it (as the API server keeps one)."""

    def __init__(self, cert_dir) -> None:
        self.server = WebhookServer(
            lambda ns, name: pool(ns), port=free_port(), host="127.0.0.1", cert_dir=cert_dir,
            dns_names=["localhost"],
        ).start()  # fmt: skip
        self._context = ssl.create_default_context()
        self._context.check_hostname = False
        self._context.verify_mode = ssl.CERT_NONE
        self._conn: http.client.HTTPSConnection | None = None

    def post(self, body: bytes) -> tuple[int, dict]:
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.server.port, timeout=30, context=self._context
                )
            try:
                self._conn.request("POST", "/mutate-pods", body, {"Content-Type": "application/json"})
                response = self._conn.getresponse()
                return response.status, json.loads(response.read() or b"{}")
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None  # the server closed a kept connection: once more on a new one
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.server.stop()


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    hook = Webhook(tmp_path_factory.mktemp("webhook-certs"))
    yield hook
    hook.close()


def post(hook: Webhook, body: bytes) -> tuple[int, dict]:
    return hook.post(body)


def review(obj: Any) -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"kind": "Pod"}, "operation": "CREATE", "namespace": "serving",
                        "object": obj}}  # fmt: skip


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def _leaf_like(draw, value: Any) -> Any:
    """Another value of the same JSON type (what a schema-valid pod may hold there)."""
    if isinstance(value, bool):
        return draw(st.booleans())
    if isinstance(value, int):
        return draw(st.integers(-(1 << 31), 1 << 31))
    if isinstance(value, str):
        return draw(
            st.one_of(
                st.text(max_size=30), st.sampled_from(["", "/", "a/b", "sh", "-c", "--kv-transfer-config"])
            )
        )
    if isinstance(value, list):
        return value[: draw(st.integers(0, len(value)))]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if draw(st.booleans())}
    return value


@st.composite
def mutated_pods(draw, same_types: bool):
    """A real-world pod with one to three of its values (at any depth) replaced: by a value of
    the same JSON type (`same_types`: what the API server can send, having decoded the pod into
    its schema), or by any JSON at all (what anyone who reaches the port can send)."""
    obj = pod(draw(st.sampled_from(sorted(EXPECTED))))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(obj)))
        if not where:
            if not same_types:
                obj = draw(json_values)
            continue
        parent = obj
        try:
            for part in where[:-1]:
                parent = parent[part]
            old = parent[where[-1]]
            parent[where[-1]] = _leaf_like(draw, old) if same_types else draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier replacement changed the shape above this path
    return obj


def check_answer(status: int, answer: dict, obj: Any) -> None:
    assert status == 200, answer
    response = answer["response"]
    assert response["allowed"] is True and response["uid"] == "u-1"
    if "patch" in response:
        ops = json.loads(base64.b64decode(response["patch"]))
        jsonpatch.apply_patch(copy.deepcopy(obj), ops)  # raises if it would not apply


@settings(max_examples=socket_examples(100), deadline=None)  # HTTPS round trips
@given(mutated_pods(same_types=True))
def test_mutated_pods_are_admitted_with_a_patch_that_applies(webhook, obj):
    status, answer = post(webhook, json.dumps(review(obj)).encode())
    check_answer(status, answer, obj)


@settings(max_examples=socket_examples(100), deadline=None)
@given(mutated_pods(same_types=False))
def test_pods_of_any_shape_are_admitted(webhook, obj):
    status, answer = post(webhook, json.dumps(review(obj)).encode())
    assert status == 200 and answer["response"]["allowed"] is True


@settings(max_examples=socket_examples(100), deadline=None)
@given(json_values)
def test_reviews_of_any_shape_are_answered(webhook, body):
    status, answer = post(webhook, json.dumps(body).encode())
    if isinstance(body, dict):
        assert status == 200 and answer["response"]["allowed"] is True
    else:
        assert status == 400 and "expected an AdmissionReview" in answer["error"]


@settings(max_examples=socket_examples(100), deadline=None)
@given(st.binary(max_size=200))
def test_bodies_that_are_not_json_are_refused_cleanly(webhook, body):
    status, _answer = post(webhook, body)
    try:
        parsed = json.loads(body)
    except ValueError:
        assert status == 400
        return
    assert status == (200 if isinstance(parsed, dict) else 400)


def test_a_real_pod_is_still_injected(webhook):
    """The control: unmutated, the same request gets the injection patch."""
    obj = pod("production-stack")
    status, answer = post(webhook, json.dumps(review(obj)).encode())
    check_answer(status, answer, obj)
    assert "patch" in answer["response"]
