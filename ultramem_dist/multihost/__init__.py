"""Multi-host on one box: namespace hosts with a real Ray cluster (see docs/multihost.md)."""

from ultramem_dist.multihost.harness import Host, MultiHost, multihost, skip_reason

__all__ = ["Host", "MultiHost", "multihost", "skip_reason"]
