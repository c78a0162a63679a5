"""Entry point for ``kopf run -m ultramem_operator.main`` (what the Helm chart's Deployment runs).

    kopf run --standalone --namespace=<ns> --liveness=http://0.0.0.0:8080/healthz \
        -m ultramem_operator.main
"""

from __future__ import annotations

import kopf

from ultramem_operator.handlers import OperatorConfig, register
from ultramem_operator.kube import KubeApi


async def _refresh() -> kopf.ConnectionInfo:
    from ultramem_operator.handlers import default_login

    return await default_login()


API = KubeApi(refresh=_refresh)
CONFIG = OperatorConfig.from_env()
register(kopf.get_default_registry(), API, CONFIG)
