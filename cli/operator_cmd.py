"""`kvpool operator`: run the KVCachePool operator (kopf). Needs the `operator` extra."""

from __future__ import annotations

import click

from .options import PORT, option


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
    help="kopf peering object shared by the operator's replicas.",
)
@option(
    "--standalone", is_flag=True, help="Skip peering (a single replica, or no KopfPeering CRD installed)."
)
@option(
    "--priority",
    type=int,
    default=0,
    show_default=True,
    help="Peering priority: the highest-priority replica is active.",
)
def operator(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    health_port: int,
    peering_name: str,
    standalone: bool,
    priority: int,
) -> None:
    """Reconcile KVCachePool resources into running cache pools."""
    if all_namespaces and namespaces:
        raise click.UsageError("--namespace and --all-namespaces exclude each other")
    try:
        from kvpool.operator import runner
    except ImportError as exc:  # kopf and kubernetes come with the `operator` extra
        raise click.ClickException(f"{exc}; install kvpool[operator]") from exc
    runner.run(
        () if all_namespaces else namespaces,
        health_port=health_port or None,
        peering_name=peering_name,
        standalone=standalone,
        priority=priority,
    )
