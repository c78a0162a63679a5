"""Chart-test helpers: render the ultramem chart with the real Helm SDK once per variant.

Variants are the chart's own ``helm/ultramem/ci/*-values.yaml`` files (also usable by chart-testing
in CI). Rendering costs ~30 ms per variant; the session cache keeps every test cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ultramem"
CI_VALUES = CHART / "ci"
KUBERAY_CRD = REPO / "schemas" / "kuberay" / "ray.io_rayclusters.yaml"  # vendored (see its README)
OUR_CRD = REPO / "operators" / "crds" / "valuestore.yaml"
RELEASE, NAMESPACE = "um", "ml"
FULLNAME = "um-ultramem"

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
helm = pytest.importorskip("helm_python", reason="helm-python-sdk (helm_python) is not installed")


def variant_names() -> list[str]:
    return sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES.glob("*-values.yaml"))


def variant_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_VALUES / f"{name}-values.yaml").read_text()) or {}


@dataclass
class Rendered:
    """One rendered release: documents by template plus the NOTES text."""

    values: dict[str, Any]
    templates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: str = ""

    @property
    def docs(self) -> list[dict[str, Any]]:
        return [d for docs in self.templates.values() for d in docs]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def pod_templates(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(owner description, pod spec) of everything that runs containers."""
        for d in self.docs:
            name = f"{d['kind']}/{d['metadata']['name']}"
            if d["kind"] in ("StatefulSet", "Deployment", "Job"):
                yield name, d["spec"]["template"]["spec"]
            elif d["kind"] == "Pod":
                yield name, d["spec"]
            elif d["kind"] == "RayCluster":
                yield f"{name}/head", d["spec"]["headGroupSpec"]["template"]["spec"]
                for g in d["spec"]["workerGroupSpecs"]:
                    yield f"{name}/{g['groupName']}", g["template"]["spec"]


def render(values: dict[str, Any]) -> Rendered:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    out = Rendered(values=values)
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            out.notes = text
            continue
        docs = [d for d in yaml.load_all(text, Loader=_LOADER) if d]
        if docs:
            out.templates[path.split("/templates/", 1)[-1]] = docs
    return out


@functools.cache
def render_variant(name: str) -> Rendered:
    return render(variant_values(name))


def load_crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = yaml.load(path.read_text(), Loader=_LOADER)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{path} has no version {version}")


def strict_schema(schema: Any) -> Any:
    """Copy of an openAPIV3Schema where objects with declared properties reject unknown
    fields (the API server would prune them; `kubectl --validate=strict` rejects them)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


# ---------------------------------------------------------------------------- shared data
# Plain cached functions rather than conftest fixtures: a tests/helm/conftest.py would be
# importable as "conftest" and shadow tests/conftest.py for the other test folders.
@functools.cache
def all_variants() -> dict[str, Rendered]:
    """Every ci/ variant, rendered once per test session."""
    return {name: render_variant(name) for name in variant_names()}


@functools.cache
def _kuberay_schema() -> dict[str, Any]:
    return load_crd_schema(KUBERAY_CRD, "v1")


def kuberay_schema() -> dict[str, Any]:
    """The KubeRay RayCluster v1 openAPIV3Schema (vendored in the repository: never skipped)."""
    return _kuberay_schema()


@functools.cache
def valuestore_schema() -> dict[str, Any]:
    return load_crd_schema(OUR_CRD, "v1alpha1")
