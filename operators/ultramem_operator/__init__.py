"""Kopf operator for ``ValueStore`` (ultramem.io/v1alpha1): sharded UltraMem value-table services.

Layout: ``spec`` parses and validates a ValueStore, ``manifests`` builds child objects,
``reconcile`` plans the actions (pure), ``status`` builds status/conditions, ``kube`` is a small
async API client and ``handlers`` wires everything into kopf (``main`` for ``kopf run``).
"""

from ultramem_operator.spec import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    InvalidSpec,
    ValueStoreSpec,
    parse_spec,
)

__all__ = ["GROUP", "KIND", "PLURAL", "VERSION", "InvalidSpec", "ValueStoreSpec", "parse_spec"]
