"""Every rendered object validated like an API server would: built-in kinds with
kubernetes-validate (strict, 1.30 and 1.37), RayCluster against the KubeRay CRD schema,
ValueStore against our CRD schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import ultramem_chart
from ultramem_chart import Rendered, all_variants, strict_schema


@pytest.fixture(scope="module")
def variants() -> dict[str, Rendered]:
    return all_variants()


@pytest.fixture(scope="module")
def kuberay_schema() -> dict[str, Any]:
    return ultramem_chart.kuberay_schema()


@pytest.fixture(scope="module")
def valuestore_schema() -> dict[str, Any]:
    return ultramem_chart.valuestore_schema()


kubernetes_validate = pytest.importorskip("kubernetes_validate")

# Custom kinds and where their schema comes from (None: no schema available offline).
CUSTOM_KINDS = {"RayCluster": "kuberay", "ValueStore": "ultramem", "ServiceMonitor": None,
                "ScaledObject": None}
K8S_VERSIONS = ("1.30.0", "1.37.0")


def unique_docs(variants: dict[str, Rendered], kinds: set[str] | None = None,
                exclude: set[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(variant/kind/name, doc) with identical documents across variants validated once."""
    seen: set[str] = set()
    out = []
    for name, r in sorted(variants.items()):
        for d in r.docs:
            if (kinds is not None and d["kind"] not in kinds) or (exclude and d["kind"] in exclude):
                continue
            key = json.dumps(d, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append((f"{name}: {d['kind']}/{d['metadata']['name']}", d))
    return out


def test_only_known_custom_kinds_are_rendered(variants: dict[str, Rendered]) -> None:
    custom = {d["kind"] for r in variants.values() for d in r.docs
              if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].startswith(
                  ("apps/", "batch/", "policy/", "autoscaling/", "networking.k8s.io/",
                   "rbac.authorization.k8s.io/"))}
    assert custom == set(CUSTOM_KINDS)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_builtin_object_is_valid_kubernetes(
    variants: dict[str, Rendered], k8s_version: str,
) -> None:
    docs = unique_docs(variants, exclude=set(CUSTOM_KINDS))
    assert len(docs) > 40
    errors = []
    for where, doc in docs:
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_validation_catches_a_broken_object(variants: dict[str, Rendered]) -> None:
    import copy

    sts = copy.deepcopy(variants["standalone"].kind("StatefulSet")[0])
    sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, "1.30.0", strict=True)
    sts = copy.deepcopy(variants["standalone"].kind("StatefulSet")[0])
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, "1.30.0", strict=True)


def test_ray_clusters_match_the_kuberay_crd(
    variants: dict[str, Rendered], kuberay_schema: dict[str, Any],
) -> None:
    validator = jsonschema.Draft4Validator(strict_schema(kuberay_schema))
    docs = unique_docs(variants, kinds={"RayCluster"})
    assert len(docs) >= 3
    for where, doc in docs:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(doc)]
        assert not errors, f"{where}:\n" + "\n".join(errors[:10])
    broken = json.loads(json.dumps(docs[0][1]))
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 3  # typo: pruned by the API server
    assert list(validator.iter_errors(broken))


def test_rendered_valuestores_match_our_crd_and_the_operator(
    variants: dict[str, Rendered], valuestore_schema: dict[str, Any],
) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operators"))
    from ultramem_operator import parse_spec

    validator = jsonschema.Draft4Validator(strict_schema(valuestore_schema))
    docs = unique_docs(variants, kinds={"ValueStore"})
    assert {d["spec"]["runtime"] for _, d in docs} == {"ray", "standalone"}
    for where, doc in docs:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(doc)]
        assert not errors, f"{where}:\n" + "\n".join(errors)
        parse_spec({**doc, "metadata": {**doc["metadata"], "uid": "u"}})
