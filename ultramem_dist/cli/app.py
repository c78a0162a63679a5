"""The shared Typer application every ``ultramem_dist.cli.*`` module adds its commands to.

One exit-code rule for every command: bad input (a usage error found by the parser, or a
sentence from :func:`fail`) exits 2 with one ``error: ...`` line on stderr; a runtime failure
(unreachable cluster, dead shard) exits 1 (``fail(..., code=1)``). Help follows click's
conventions: arguments in capitals, flags without a value type (``--merged/--no-merged``).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup


class CliCommand(TyperCommand):
    """A command whose help reads like click's: ``CHECKPOINT`` (not ``{checkpoint}``) in the
    usage line and the arguments panel, and no ``<bool>`` type column for flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _conventional(param)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "ARG").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def get_help_option(self, ctx: Any) -> Any:
        opt = super().get_help_option(ctx)
        if opt is not None:
            _conventional(opt)
        return opt


def _conventional(param: Any) -> None:
    if isinstance(param, TyperArgument):
        if param.metavar is None and param.name:
            param.metavar = param.name.upper()
    elif getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # a flag takes no value: show no type


def _usage_error_line(exc: Any) -> str:
    """``exc`` (a click usage error) as one sentence naming the help command."""
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"{exc.format_message().rstrip('.')}{where}"


class CliGroup(TyperGroup):
    """The ``ultramem-dist`` group: parser errors print one ``error:`` line (exit 2) instead of
    a framework error box; everything else is click's standalone behaviour."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _conventional(param)

    def get_help_option(self, ctx: Any) -> Any:
        opt = super().get_help_option(ctx)
        if opt is not None:
            _conventional(opt)
        return opt

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            console.print(f"[bold red]error:[/] {escape(_usage_error_line(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="ultramem-dist",
    cls=CliGroup,
    help="Train UltraMem models and serve their value tables as a sharded gRPC service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ultramem-dist {version('ultramem-dist')}")
        except PackageNotFoundError:  # a source tree that was never installed
            typer.echo("ultramem-dist (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version."
    ),
) -> None:
    """Train UltraMem models and serve their value tables as a sharded gRPC service."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear sentence to stderr and exit with ``code`` (2 = bad input, 1 = runtime)."""
    # one unwrapped line (logs are grepped), the message never read as markup
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)
