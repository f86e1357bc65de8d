"""The `kvpool` command. Errors in flags print one line and exit with code 2, never a traceback."""

from __future__ import annotations

import sys

import click

from . import (
    agent_cmd,
    demo_cmd,
    lookup_cmd,
    node_cmd,
    operator_cmd,
    payload_cmd,
    status_cmd,
)
from .bench import bench


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kvpool", prog_name="kvpool")
def cli() -> None:
    """kvpool: a Kubernetes-native distributed KV cache for LLM serving."""


cli.add_command(node_cmd.node)
cli.add_command(node_cmd.up)
cli.add_command(lookup_cmd.lookup)
cli.add_command(agent_cmd.agent)
cli.add_command(status_cmd.status)
cli.add_command(demo_cmd.demo)
cli.add_command(operator_cmd.operator)
cli.add_command(payload_cmd.payload)
cli.add_command(bench)  # lazy: a bench module is imported only when its command is asked for


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="kvpool", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"kvpool: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"kvpool: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("kvpool: aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
