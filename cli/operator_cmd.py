"""`kvpool operator`: run the KVCachePool operator (kopf). Needs the `operator` extra."""

from __future__ import annotations

import pathlib

import click

from .options import PORT, log_level_option, option


@click.command("operator")
@option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to watch (repeatable; KVPOOL_NAMESPACE is space-separated).",
)
@option(
    "--all-namespaces", is_flag=True, help="Watch every namespace (the default when no --namespace is given)."
)
@option(
    "--health-port",
    type=PORT,
    default=8080,
    show_default=True,
    help="Port of the /healthz liveness endpoint (0 = off).",
)
@option(
    "--peering-name",
    default="kvpool-operator",
    show_default=True,
    help="kopf peering object shared by the operator's replicas (used when the kopf.dev CRDs are installed).",
)
@option("--standalone", is_flag=True, help="Never peer, even where the kopf.dev peering CRDs are installed.")
@option(
    "--require-peering",
    is_flag=True,
    help="Wait for the kopf.dev peering CRDs instead of running alone without them (several replicas).",
)
@option(
    "--priority",
    type=int,
    default=0,
    show_default=True,
    help="Peering priority: the highest-priority replica is active.",
)
@option(
    "--webhook-port",
    type=PORT,
    default=9443,
    show_default=True,
    help="HTTPS port of the pod-injection webhook (/mutate-pods); 0 turns the webhook off.",
)
@option(
    "--webhook-cert-dir",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    default="/tmp/kvpool-webhook",
    show_default=True,
    help="Directory with tls.crt and tls.key (e.g. a cert-manager Secret); the operator writes and "
    "renews its own there when they are missing.",
)
@option(
    "--webhook-dns-name",
    "webhook_dns_names",
    multiple=True,
    help="DNS name for the operator's own certificate (repeatable; the webhook Service's "
    "<service>.<namespace>.svc). Default: localhost. KVPOOL_WEBHOOK_DNS_NAME is space-separated.",
)
@option(
    "--webhook-config-name",
    default="",
    help="MutatingWebhookConfiguration whose caBundle gets the operator's own CA (empty: leave it to "
    "cert-manager).",
)
@option(
    "--metrics-port",
    type=PORT,
    default=8081,
    show_default=True,
    help="HTTP port of the operator's /metrics (reconciles, webhook admissions, certificate expiry); 0 = off.",
)
@log_level_option
def operator(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    health_port: int,
    peering_name: str,
    standalone: bool,
    require_peering: bool,
    priority: int,
    webhook_port: int,
    webhook_cert_dir: pathlib.Path,
    webhook_dns_names: tuple[str, ...],
    webhook_config_name: str,
    metrics_port: int,
    log_level: str,
) -> None:
    """Reconcile KVCachePool resources into running cache pools."""
    if all_namespaces and namespaces:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    if standalone and require_peering:
        raise click.UsageError("--standalone and --require-peering exclude each other")
    try:
        import kopf

        from kvpool.operator import runner
    except ImportError as exc:  # kopf and kubernetes come with the `operator` extra
        raise click.ClickException(f"{exc}; install kvpool[operator]") from exc
    level = log_level.lower()
    kopf.configure(debug=level == "debug", quiet=level in ("warning", "error"), log_prefix=True)
    runner.run(
        () if all_namespaces else namespaces,
        health_port=health_port or None,
        peering_name=peering_name,
        standalone=standalone,
        require_peering=require_peering,
        priority=priority,
        metrics_port=metrics_port or None,
        webhook=runner.WebhookOptions(
            port=webhook_port,
            cert_dir=webhook_cert_dir,
            dns_names=webhook_dns_names or ("localhost",),
            config_name=webhook_config_name or None,
            metrics_port=metrics_port or None,
        )
        if webhook_port
        else None,
    )
