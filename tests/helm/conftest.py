"""Fixtures for the chart tests (helpers live in ultramem_chart.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ultramem_chart import (  # noqa: E402
    KUBERAY_CRD,
    OUR_CRD,
    Rendered,
    load_crd_schema,
    render_variant,
    variant_names,
)


@pytest.fixture(scope="session")
def variants() -> dict[str, Rendered]:
    """Every ci/ variant rendered once per test session."""
    return {name: render_variant(name) for name in variant_names()}


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render_variant("default")


@pytest.fixture(scope="module")
def standalone() -> Rendered:
    return render_variant("standalone")


@pytest.fixture(scope="session")
def kuberay_schema() -> dict[str, Any]:
    if not KUBERAY_CRD.is_file():
        pytest.skip(f"KubeRay RayCluster CRD not found at {KUBERAY_CRD} (../shared/schemas is "
                    "test data kept outside the repository); RayCluster schema checks skipped")
    return load_crd_schema(KUBERAY_CRD, "v1")


@pytest.fixture(scope="session")
def valuestore_schema() -> dict[str, Any]:
    return load_crd_schema(OUR_CRD, "v1alpha1")
