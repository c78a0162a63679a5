"""A client run *inside* a namespace-host (host 0): parity of the model with remote tables.

``python -m ultramem_dist.multihost.probe RAY_ADDRESS CHECKPOINT`` connects to the cluster,
follows the active deployment through the registry, and prints one JSON line::

    {"endpoints": [...], "tokens_identical": true, "max_abs_diff": 0.0, "version": "v1"}

``tokens_identical``: greedy generation with every value table served by the shards equals the
local model's (the same checkpoint with its own tables).
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> int:
    import ray

    from ultramem_dist.cluster import ClusterValueStore
    from ultramem_dist.model import load_pretrained

    address, ckpt = argv[0], argv[1]
    ray.init(address=address, namespace="ultramem", logging_level="ERROR", log_to_driver=False)
    torch.manual_seed(1)
    local = load_pretrained(ckpt).eval()
    remote = load_pretrained(ckpt).eval()
    remote.drop_value_tables()
    tokens = torch.randint(0, local.cfg.vocab_size, (2, 12))
    prompt = torch.randint(0, local.cfg.vocab_size, (1, 5))
    with ClusterValueStore(transport="thread") as backend:
        remote.set_value_backend(backend)
        with torch.no_grad():
            diff = (remote(tokens) - local(tokens)).abs().max().item()
            same = torch.equal(remote.generate(prompt, 12), local.generate(prompt, 12))
        version = backend.version
    from ultramem_dist.cluster.registry import get_registry

    dep = ray.get(get_registry().active.remote())["deployment"]
    endpoints = sorted(r["endpoint"] for reps in dep["replicas"].values() for r in reps.values())
    print(
        json.dumps(
            {
                "endpoints": endpoints,
                "tokens_identical": same,
                "max_abs_diff": diff,
                "version": version,
            }
        )
    )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
