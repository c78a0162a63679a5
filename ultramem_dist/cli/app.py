"""The shared Typer application every ``ultramem_dist.cli.*`` module adds its commands to."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="ultramem-dist",
    help="Train UltraMem models and serve their value tables as a sharded gRPC service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear sentence to stderr and exit with ``code`` (2 = bad input, 1 = runtime)."""
    # one unwrapped line (logs are grepped), the message never read as markup
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)
