"""Choice types of CLI options, so that help lists the values (``<row|dim|auto>``) and the
parser rejects anything else with exit code 2 before any heavy import."""

from __future__ import annotations

from enum import StrEnum


class Layout(StrEnum):
    """How a table is split over shards."""

    row = "row"
    dim = "dim"
    auto = "auto"


class ModelKind(StrEnum):
    dense = "dense"
    pkm = "pkm"
    moe = "moe"
    ultramem = "ultramem"
    ultramemv2 = "ultramemv2"


class Preset(StrEnum):
    tiny = "tiny"
    micro = "micro"


class Lookup(StrEnum):
    """Where the gRPC client of remote lookups runs (``client.process_store.TRANSPORTS``)."""

    process = "process"
    thread = "thread"
