"""The operator's /metrics in the chart: with or without the webhook, `--metrics-port` is served
(reconcile counts and durations; docs/operator.md), and its Service, ServiceMonitor and NetworkPolicy
rule point at the port the operator listens on."""

from __future__ import annotations

import pytest

from .test_chart import WEBHOOK_VALUES, _pod, helm, render  # noqa: F401 (helm: the fixture)


@pytest.mark.parametrize("case", sorted(WEBHOOK_VALUES))
def test_the_metrics_service_reaches_the_operators_metrics_port(helm: str, case: str) -> None:  # noqa: F811
    objs = render(
        helm, *WEBHOOK_VALUES[case], "--set", "metrics.port=9100", "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "networkPolicy.enabled=true",
    )  # fmt: skip
    (c,) = _pod(objs)["containers"]
    assert c["args"][c["args"].index("--metrics-port") + 1] == "9100"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == 9100
    (service,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics")]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]
    deploy_labels = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert service["spec"]["selector"].items() <= deploy_labels.items()
    (monitor,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    scrapers = [r for r in policy["spec"]["ingress"] if "from" in r]
    assert [p["port"] for r in scrapers for p in r["ports"]] == [9100]
