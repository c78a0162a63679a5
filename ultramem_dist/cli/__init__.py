"""``ultramem-dist`` command line. Each module below adds its subcommands to the shared app."""

from __future__ import annotations

import importlib

from ultramem_dist.cli.app import app

# One module per command group; importing it registers its commands on ``app``.
_COMMAND_MODULES = (
    "ultramem_dist.cli.model_cmds",
    "ultramem_dist.cli.demo_cmd",
    "ultramem_dist.cli.store_cmds",
    "ultramem_dist.cli.serve_cmds",
    "ultramem_dist.cli.cluster_cmds",
    "ultramem_dist.cli.router_cmds",
    "ultramem_dist.cli.reliability_cmds",
)


def main() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(name)
    app()


__all__ = ["app", "main"]
