"""values.schema.json and the templates' own checks reject bad values before anything deploys."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from ultramem_chart import CHART, helm, variant_names, variant_values


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(str(CHART)) as c:
        yield c


def test_values_schema_is_a_valid_json_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = helm.values_from_yaml((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)


@pytest.mark.parametrize("variant", variant_names())
def test_every_ci_variant_passes_the_schema(chart: Any, variant: str) -> None:
    chart.validate_schema(variant_values(variant))


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"store": {"shards": -1}}, "/store/shards"),
        ({"store": {"shards": 0}}, "/store/shards"),
        ({"store": {"shards": 1000}}, "/store/shards"),
        ({"store": {"replicas": 0}}, "/store/replicas"),
        ({"mode": "kubernetes"}, "/mode"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"repository": ""}}, "/image/repository"),
        ({"image": {"shardCpuTag": "0.1.0 cpu"}}, "/image/shardCpuTag"),
        ({"store": {"version": "V1.0"}}, "/store/version"),
        ({"store": {"sharding": "column"}}, "/store/sharding"),
        ({"store": {"replicaOverrides": {"zero": 2}}}, "/store/replicaOverrides"),
        ({"store": {"replicaOverrides": {"0": 0}}}, "/store/replicaOverrides/0"),
        ({"store": {"pvc": {"claimName": "x", "mountPath": "relative"}}}, "/store/pvc/mountPath"),
        ({"ports": {"grpc": 70000}}, "/ports/grpc"),
        ({"shard": {"gpus": -1}}, "/shard/gpus"),
        ({"shard": {"resources": {"limits": {"memory": "lots"}}}}, "/shard/resources"),
        ({"standalone": {"managedBy": "flux"}}, "/standalone/managedBy"),
        ({"ray": {"auth": {"mode": "password"}}}, "/ray/auth/mode"),
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
        ({"podDisruptionBudget": {"maxUnavailable": 0}}, "/podDisruptionBudget/maxUnavailable"),
        ({"autoscaling": {"targetCPUUtilizationPercentage": 150}}, "/autoscaling"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"fullnameOverride": "9-lives"}, "/fullnameOverride"),
        ({"storee": {"shards": 2}}, "storee"),
        ({"store": {"shard": 2}}, "shard"),
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=where.replace("/", r"/")):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):  # an install would refuse them as well
        chart.render(values, name="um", namespace="ml")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "standalone", "store": {"shards": 2, "replicaOverrides": {"5": 3}}},
         "shard 5 does not exist"),
        ({"store": {"replicaOverrides": {"0": 3}}}, "needs mode=standalone"),
        ({"ray": {"auth": {"mode": "token"}}}, "ray.auth.secretName"),
        ({"store": {"pvc": {"claimName": "", "mountPath": "/x"}, "path": ""}},
         "store.pvc.claimName"),
        ({"autoscaling": {"enabled": True}}, "autoscaling.enabled needs mode=standalone"),
        ({"mode": "standalone", "autoscaling": {"enabled": True, "minReplicas": 5,
                                                "maxReplicas": 2}}, "minReplicas"),
        ({"fullnameOverride": "", "nameOverride": "", "mode": "standalone",
          "standalone": {"managedBy": "operator"}}, None),
    ],
)
def test_templates_reject_inconsistent_values(chart: Any, values: dict[str, Any],
                                              message: str | None) -> None:
    if message is None:  # control: a consistent combination renders
        chart.render(values, name="um", namespace="ml")
        return
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name="um", namespace="ml")


def test_valuestore_name_must_start_with_a_letter(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="must start with a letter"):
        chart.render({}, name="1st", namespace="ml")
    chart.render({"mode": "standalone"}, name="1st", namespace="ml")  # no ValueStore: fine
