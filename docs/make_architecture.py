"""Draw ``docs/architecture.png``: the request path of ultramem-dist (matplotlib, no other deps).

python docs/make_architecture.py [--out docs/architecture.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"

COLORS = {
    "worker": "#dbe9f6",
    "client": "#e3f1df",
    "shard": "#fdebd3",
    "kernel": "#f3e0ef",
    "router": "#fff6c7",
    "infra": "#eeeeee",
}


def box(ax, x, y, w, h, title, lines, color, *, dashed=False, title_size=10.5, size=8.6):
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            facecolor=color,
            edgecolor="#444444",
            linewidth=1.2,
            linestyle="--" if dashed else "-",
        )
    )
    ax.text(x + 0.15, y + h - 0.17, title, fontsize=title_size, weight="bold", va="top")
    ax.text(
        x + 0.15,
        y + h - 0.55,
        "\n".join(lines),
        fontsize=size,
        va="top",
        linespacing=1.45,
    )


def arrow(ax, a, b, label="", *, dashed=False, rad=0.0, label_xy=None, color="#333333"):
    ax.add_patch(
        FancyArrowPatch(
            a,
            b,
            arrowstyle="-|>",
            mutation_scale=16,
            linewidth=1.6,
            color=color,
            linestyle="--" if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if label:
        x, y = label_xy or ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12)
        ax.text(x, y, label, fontsize=8, ha="center", va="bottom", color=color, style="italic")


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(16, 9))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 9.35)
    ax.axis("off")
    ax.text(
        8,
        9.12,
        "ultramem-dist: UltraMem value tables served as a sharded gRPC gather-pool service",
        ha="center",
        fontsize=14,
        weight="bold",
    )

    box(
        ax,
        0.2,
        4.3,
        3.3,
        4.0,
        "Worker (model process)",
        [
            "decoder blocks 0 .. n-1",
            "UltraMem layer a:b  (skip-layer)",
            "start() at block a:",
            "  TDQKR top-m -> row ids,",
            "  IVE block ids, MCS weights",
            "blocks a .. b run meanwhile",
            "finish() after block b:",
            "  pooled -> projector -> residual",
        ],
        COLORS["worker"],
    )

    box(
        ax,
        4.1,
        4.3,
        3.6,
        4.0,
        "Client (lookup process)",
        [
            "ProcessValueStore.submit() -> Future",
            "  (socketpair; off the model's GIL)",
            "GatherClient (asyncio):",
            "  row tables: split ids by owner",
            "    (CSR), add partial sums",
            "  dim tables: same request to all,",
            "    concatenate column slices",
            "1 GatherStream per replica;",
            "  broken: unary Gather on the shard's",
            "  channel (round_robin, retry),",
            "  deadline, version in every call",
        ],
        COLORS["client"],
        size=8.3,
    )

    shard_lines = [
        "GatherPool (GatherStream, Gather, Info)",
        "grpc.health.v1 + reflection",
        "Prometheus /metrics :9090",
    ]
    for i, (y, name) in enumerate(((6.75, "shard 0"), (5.25, "shard 1"), (3.75, "shard S-1"))):
        box(
            ax,
            8.7,
            y,
            3.45,
            1.35,
            f"{name}  (replicas 0..R-1)",
            shard_lines,
            COLORS["shard"],
            title_size=9.5,
            size=8.2,
        )
        arrow(ax, (12.15, y + 0.68), (12.8, y + 0.68 if i == 1 else 5.9))
    ax.text(
        10.42,
        8.45,
        "one serve-shard server per shard replica:",
        fontsize=8.2,
        ha="center",
        va="bottom",
        style="italic",
    )
    ax.text(
        10.42,
        8.2,
        "Ray ShardActors or StatefulSet pods",
        fontsize=8.2,
        ha="center",
        va="bottom",
        style="italic",
    )

    box(
        ax,
        12.8,
        4.3,
        3.0,
        3.2,
        "Kernel",
        [
            "gather_pool:",
            "  embedding_bag(sum,",
            "  per-core weights)",
            "on a mmap'd safetensors",
            "slice: rows [lo, hi) or",
            "columns [lo, hi)",
            "store: manifest + sha256,",
            "versioned, LATEST",
        ],
        COLORS["kernel"],
        size=8.3,
    )

    arrow(ax, (3.5, 6.6), (4.1, 6.6), "selection")
    arrow(ax, (4.1, 5.5), (3.5, 5.5), "pooled")
    for y in (7.42, 5.92, 4.42):
        arrow(ax, (7.7, 6.3), (8.7, y))
    ax.text(8.2, 6.55, "GatherStream", fontsize=8, ha="center", style="italic")

    # optional router path
    box(
        ax,
        0.2,
        0.35,
        3.3,
        3.3,
        "Other runtimes",
        [
            "Node: clients/node",
            "Go / Java / C++: stubs",
            "  generated from proto/",
            "grpcurl via reflection",
            "-> the router: 1 call, or",
            "-> the shards directly,",
            "   layout read from Info",
            "   (lowest latency)",
        ],
        COLORS["infra"],
    )
    box(
        ax,
        4.1,
        0.35,
        3.6,
        3.0,
        "serve-router (optional)",
        [
            "same ultramem.v1.GatherPool",
            "Info: whole table = 1 shard",
            "fan-out with GatherClient",
            "caller's deadline propagated",
            "health, reflection, /metrics",
            "+1 hop (benchmarks/router_hop)",
        ],
        COLORS["router"],
        dashed=True,
    )
    arrow(ax, (3.5, 2.0), (4.1, 2.0), "1 call")
    arrow(ax, (7.7, 2.9), (8.7, 4.1), "fan-out", label_xy=(7.95, 3.55))

    box(
        ax,
        8.7,
        0.35,
        3.45,
        2.4,
        "Registry",
        [
            "Ray named actor, or the K8s",
            "headless Service:",
            "(deployment, shard) -> endpoints",
            "the Ray backend of the client",
            "discovers the shards here",
        ],
        COLORS["infra"],
        size=8.3,
    )
    arrow(ax, (10.42, 2.75), (10.42, 3.75), "register", dashed=True, label_xy=(10.9, 3.1))

    box(
        ax,
        12.8,
        0.35,
        3.0,
        3.2,
        "Observability",
        [
            "Prometheus scrapes",
            "  :9090/metrics",
            "  (chart ServiceMonitor)",
            "latency by method+code,",
            "rows, bytes, in-flight,",
            "errors, version info",
            "ultramem-dist status:",
            "  QPS + p50 per replica",
        ],
        COLORS["infra"],
        size=8.3,
    )
    arrow(ax, (12.15, 4.1), (13.2, 3.55), "scrape", dashed=True, label_xy=(12.85, 3.9))

    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
