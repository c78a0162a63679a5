"""The ValueStore CRD: one source, shipped byte-identical in the chart, and a schema that
accepts the examples and rejects bad specs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ultramem_chart
import yaml
from ultramem_chart import CHART, OUR_CRD, REPO, strict_schema


@pytest.fixture(scope="module")
def valuestore_schema() -> dict[str, Any]:
    return ultramem_chart.valuestore_schema()


EXAMPLES = sorted((REPO / "operators" / "examples").glob("*.yaml"))


def test_chart_ships_a_byte_identical_copy_of_the_crd() -> None:
    shipped = CHART / "crds" / "valuestore.yaml"
    assert shipped.read_bytes() == OUR_CRD.read_bytes(), (
        "helm/ultramem/crds/valuestore.yaml drifted from operators/crds/valuestore.yaml: "
        "copy the operator's CRD into the chart"
    )


def test_crd_is_a_valid_apiextensions_object() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = yaml.safe_load(OUR_CRD.read_text())
    for version in ("1.30.0", "1.37.0"):
        kubernetes_validate.validate(crd, version, strict=True)
    (v,) = crd["spec"]["versions"]
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]) \
        == ("ultramem.io", "ValueStore", "valuestores")
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Serving"] == ".status.servingVersion"


@pytest.fixture(scope="module")
def validator(valuestore_schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(strict_schema(valuestore_schema))


def test_examples_exist_and_are_valid(validator: jsonschema.Draft4Validator) -> None:
    import sys

    sys.path.insert(0, str(REPO / "operators"))
    from ultramem_operator import parse_spec

    assert len(EXAMPLES) >= 3
    runtimes = set()
    for path in EXAMPLES:
        doc = yaml.safe_load(Path(path).read_text())
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, f"{path.name}: {errors}"
        runtimes.add(parse_spec({**doc, "metadata": {**doc["metadata"], "uid": "u"}}).runtime)
    assert runtimes == {"standalone", "ray"}


BASE = yaml.safe_load((REPO / "operators" / "examples" / "valuestore-standalone.yaml").read_text())


@pytest.mark.parametrize(
    "change",
    [
        {"shards": 0},
        {"shards": -2},
        {"replicas": 0},
        {"sharding": "column"},
        {"runtime": "lambda"},
        {"version": "V1"},
        {"version": "v1.2"},
        {"version": "x" * 25},
        {"replicaOverrides": {"0": 0}},
        {"imagePullPolicy": "Sometimes"},
        {"store": {}},
        {"store": {"path": "relative"}},
        {"store": {"pvc": {}}},
        {"rollout": {"drainSeconds": -1}},
        {"runtime": "ray", "ray": {"clusterName": "rc", "port": 70000}},
        {"runtime": "ray", "ray": {"clusterName": "rc", "port": "50051"}},
        {"resources": {"requests": {"cpu": True}}},
        {"shard": 3},  # unknown field (pruned by the API server, rejected by strict clients)
    ],
)
def test_crd_schema_rejects_bad_specs(validator: jsonschema.Draft4Validator,
                                      change: dict[str, Any]) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(change)
    assert list(validator.iter_errors(doc)), change


def test_crd_schema_requires_the_core_fields(validator: jsonschema.Draft4Validator) -> None:
    for field in ("store", "version", "shards"):
        doc = copy.deepcopy(BASE)
        del doc["spec"][field]
        assert list(validator.iter_errors(doc)), field
