"""Pure unit tests of the planner: spec parsing, child manifests, blue/green, reshard, ray."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import operator_path  # noqa: F401  (puts operators/ on sys.path)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ultramem_operator import manifests
from ultramem_operator.reconcile import (
    DEGRADED,
    PENDING,
    PROGRESSING,
    READY,
    Action,
    Observed,
    Plan,
    plan,
)
from ultramem_operator.spec import (
    ANNOTATION_SWITCHED_AT,
    GRPC_PORT,
    LABEL_LAYOUT,
    LABEL_VERSION,
    METRICS_PORT,
    InvalidSpec,
    ValueStoreSpec,
    parse_spec,
)
from ultramem_operator.status import build_status, failed_status, get_condition

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
UID = "uid-1"


def body(name: str = "mem", **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"store": {"pvc": {"claimName": "tables"}}, "version": "v1",
                         "shards": 2, "replicas": 2, "rollout": {"drainSeconds": 0}}
    s.update(spec)
    return {"metadata": {"name": name, "namespace": "ml", "uid": UID, "generation": 3},
            "spec": s}


def make(**spec: Any) -> ValueStoreSpec:
    return parse_spec(body(**spec), default_image="img:1")


class FakeWorld:
    """Applies plans to an in-memory set of children (owner refs set like kopf.adopt does)."""

    def __init__(self) -> None:
        self.objs: dict[tuple[str, str], dict[str, Any]] = {}

    def observed(self) -> Observed:
        def of(kind: str) -> list[dict[str, Any]]:
            return [copy.deepcopy(o) for (k, _), o in self.objs.items() if k == kind]
        return Observed(statefulsets=of("StatefulSet"), services=of("Service"), jobs=of("Job"))

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            key = (a.kind, a.name)
            if a.verb == "create":
                assert key not in self.objs, f"create of existing {key}"
                obj = copy.deepcopy(a.body)
                assert obj is not None
                obj["metadata"]["ownerReferences"] = [{"uid": UID, "controller": True}]
                self.objs[key] = obj
            elif a.verb == "patch":
                assert key in self.objs, f"patch of missing {key}"
                self.objs[key] = _merge(self.objs[key], a.body or {})
            else:
                assert key in self.objs, f"delete of missing {key}"
                del self.objs[key]

    def set_ready(self, version: str | None = None) -> None:
        for (kind, _), obj in self.objs.items():
            if kind == "StatefulSet" and (
                version is None or obj["metadata"]["labels"][LABEL_VERSION] == version
            ):
                obj["status"] = {"readyReplicas": obj["spec"]["replicas"]}

    def names(self, kind: str) -> set[str]:
        return {n for k, n in self.objs if k == kind}

    def front_selects(self) -> tuple[str, str] | None:
        front = self.objs.get(("Service", "mem"))
        if front is None:
            return None
        sel = front["spec"]["selector"]
        return (sel[LABEL_VERSION], sel[LABEL_LAYOUT])

    def step(self, spec: ValueStoreSpec, now: dt.datetime = T0) -> Plan:
        p = plan(spec, self.observed(), now)
        self.apply(p.actions)
        return p


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------- spec
def test_parse_spec_applies_crd_defaults() -> None:
    spec = parse_spec({"metadata": {"name": "mem", "namespace": "ml", "uid": "u"},
                       "spec": {"store": {"path": "/stores/llm/"}, "version": "v7",
                                "shards": 4}}, default_image="img:1")
    defaults = (spec.replicas, spec.sharding, spec.runtime, spec.drain_seconds)
    assert defaults == (1, "row", "standalone", 30)
    assert spec.layout == "s4"
    assert spec.store_dir == "/stores/llm"
    assert spec.image == "img:1"


def test_layout_names_the_shard_count_and_sharding() -> None:
    assert make(sharding="dim", shards=8).layout == "s8-dim"
    assert make(store={"pvc": {"claimName": "t", "mountPath": "/data"}}).store_dir == "/data"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"shards": 0}, "spec.shards"),
        ({"shards": -3}, "spec.shards"),
        ({"shards": 257}, "spec.shards"),
        ({"replicas": 0}, "spec.replicas"),
        ({"version": "V1"}, "spec.version"),
        ({"version": "v1.2"}, "spec.version"),
        ({"sharding": "column"}, "spec.sharding"),
        ({"runtime": "k8s"}, "spec.runtime"),
        ({"replicaOverrides": {"2": 3}}, "replicaOverrides"),
        ({"replicaOverrides": {"x": 3}}, "replicaOverrides"),
        ({"replicaOverrides": {"0": 0}}, "replicaOverrides"),
        ({"store": {}}, "spec.store"),
        ({"store": {"uri": "s3://b/p"}}, "uri is not supported"),
        ({"store": {"path": "relative/dir"}}, "absolute"),
        ({"runtime": "ray"}, "clusterName"),
        ({"runtime": "ray", "ray": {"clusterName": "rc"}, "replicaOverrides": {"0": 2}},
         "standalone"),
        ({"runtime": "ray", "ray": {"clusterName": "rc", "port": 70000}}, "spec.ray.port"),
        ({"runtime": "ray", "ray": {"clusterName": "rc", "port": "50051"}}, "spec.ray.port"),
        ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy"),
        ({"podLabels": {"ultramem.io/store": "x"}}, "podLabels"),
    ],
)
def test_parse_spec_rejects_bad_specs(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidSpec, match=needle):
        make(**change)


@pytest.mark.parametrize("name", ["9lives", "Mem", "a" * 60, ""])
def test_parse_spec_rejects_names_that_cannot_name_services(name: str) -> None:
    with pytest.raises(InvalidSpec, match="metadata.name"):
        parse_spec(body(name=name), default_image="img")


def test_parse_spec_rejects_generated_names_that_are_too_long() -> None:
    long_body = body(name="a" * 30, version="b" * 24, shards=200)
    with pytest.raises(InvalidSpec, match="StatefulSet name"):
        parse_spec(long_body, default_image="img")


def test_parse_spec_needs_an_image() -> None:
    with pytest.raises(InvalidSpec, match="image"):
        parse_spec(body())


# ----------------------------------------------------------------------------- manifests
def test_statefulset_runs_serve_shard_with_grpc_probes_and_hardening() -> None:
    spec = make(replicaOverrides={"1": 5}, resources={"limits": {"nvidia.com/gpu": 1}},
                placement={"nodeSelector": {"gpu": "a100"},
                           "tolerations": [{"key": "gpu", "operator": "Exists"}]})
    sts = manifests.statefulset(spec, 1)
    assert sts["metadata"]["name"] == "mem-v1-s2-1"
    assert sts["spec"]["replicas"] == 5
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["ultramem-dist", "serve-shard", "/var/lib/ultramem/store",
                            "--shard", "1", "--host", "0.0.0.0", "--port", str(GRPC_PORT),
                            "--metrics-port", str(METRICS_PORT), "--version", "v1"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": GRPC_PORT, "service": ""}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["spec"]["nodeSelector"] == {"gpu": "a100"}
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
    assert mounts["/var/lib/ultramem/store"] is True


def test_services_select_the_pods_of_their_layout() -> None:
    spec = make()
    pod_labels = manifests.statefulset(spec, 1)["spec"]["template"]["metadata"]["labels"]
    headless = manifests.shard_service(spec, 1, "v1", "s2")
    front = manifests.front_service(spec, "v1", "s2")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    assert front["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in headless["spec"]["ports"]} == {"grpc", "metrics"}


# ----------------------------------------------------------------------------- standalone plans
def test_fresh_store_creates_statefulsets_then_services() -> None:
    world = FakeWorld()
    p = world.step(make(shards=3))
    kinds = [(a.verb, a.kind) for a in p.actions]
    assert kinds == [("create", "StatefulSet")] * 3 + [("create", "Service")] * 4
    assert world.names("Service") == {"mem", "mem-shard-0", "mem-shard-1", "mem-shard-2"}
    assert p.phase == PENDING and p.serving == ("v1", "s3")
    assert p.wait_seconds == 5.0  # first start: poll until the shards are ready


def test_steady_state_is_a_no_op_and_ready() -> None:
    world = FakeWorld()
    spec = make()
    world.step(spec)
    world.set_ready()
    p = world.step(spec)
    assert p.actions == [] and p.phase == READY
    assert [(s.index, s.ready, s.desired) for s in p.shards] == [(0, 2, 2), (1, 2, 2)]


def test_partial_readiness_is_degraded_once_it_was_serving() -> None:
    world = FakeWorld()
    world.step(make())
    world.set_ready()
    world.objs[("StatefulSet", "mem-v1-s2-0")]["status"]["readyReplicas"] = 1
    p = plan(make(), world.observed(), T0, previous_phase=READY)
    assert p.phase == DEGRADED and "shard(s) 0" in p.message


def test_scaling_one_shard_patches_only_its_replicas() -> None:
    world = FakeWorld()
    world.step(make(shards=4))
    world.set_ready()
    p = world.step(make(shards=4, replicaOverrides={"2": 5}))
    assert [(a.verb, a.kind, a.name, a.body) for a in p.actions] == [
        ("patch", "StatefulSet", "mem-v1-s4-2", {"spec": {"replicas": 5}})
    ]
    assert p.actions[0].reason == "ShardScaled"


def test_image_change_updates_templates_in_place() -> None:
    world = FakeWorld()
    world.step(make())
    world.set_ready()
    p = world.step(make(image="img:2"))
    assert {(a.verb, a.name) for a in p.actions} == {("patch", "mem-v1-s2-0"),
                                                      ("patch", "mem-v1-s2-1")}
    patch = p.actions[0].body
    assert patch is not None
    assert patch["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
    assert "selector" not in patch["spec"]  # immutable field never patched


def test_version_roll_is_blue_green() -> None:
    world = FakeWorld()
    world.step(make())
    world.set_ready()

    waiting = world.step(make(version="v2"))
    assert [(a.verb, a.kind) for a in waiting.actions] == [("create", "StatefulSet")] * 2
    assert waiting.phase == PROGRESSING and waiting.wait_seconds is not None
    assert world.front_selects() == ("v1", "s2")
    assert world.names("StatefulSet") == {
        "mem-v1-s2-0", "mem-v1-s2-1", "mem-v2-s2-0", "mem-v2-s2-1"}

    world.set_ready("v2")
    switch = world.step(make(version="v2"), T0 + dt.timedelta(seconds=5))
    verbs = [(a.verb, a.kind, a.name) for a in switch.actions]
    assert verbs == [
        ("patch", "Service", "mem-shard-0"),
        ("patch", "Service", "mem-shard-1"),
        ("patch", "Service", "mem"),
        ("delete", "StatefulSet", "mem-v1-s2-0"),
        ("delete", "StatefulSet", "mem-v1-s2-1"),
    ]
    assert world.front_selects() == ("v2", "s2")
    assert switch.phase == READY
    assert world.step(make(version="v2")).actions == []


def test_switch_waits_for_every_shard_of_the_new_version() -> None:
    world = FakeWorld()
    world.step(make(shards=3))
    world.set_ready()
    world.step(make(shards=3, version="v2"))
    world.set_ready("v2")
    world.objs[("StatefulSet", "mem-v2-s3-2")]["status"]["readyReplicas"] = 1
    p = world.step(make(shards=3, version="v2"))
    assert p.actions == [] and "5/6 replicas ready" in p.message
    assert world.front_selects() == ("v1", "s3")


def test_drain_keeps_old_layout_until_the_drain_period_ends() -> None:
    spec = make(version="v2", rollout={"drainSeconds": 30})
    world = FakeWorld()
    world.step(make())
    world.set_ready()
    world.step(spec)
    world.set_ready("v2")
    switched = world.step(spec, T0)
    assert not [a for a in switched.actions if a.verb == "delete"]
    front = world.objs[("Service", "mem")]
    assert front["metadata"]["annotations"][ANNOTATION_SWITCHED_AT] == "2026-01-01T00:00:00Z"
    assert switched.phase == PROGRESSING and switched.wait_seconds == pytest.approx(30)
    assert switched.retiring == [("v1", "s2")]
    mid = world.step(spec, T0 + dt.timedelta(seconds=10))
    assert mid.actions == [] and mid.wait_seconds == pytest.approx(20)
    done = world.step(spec, T0 + dt.timedelta(seconds=31))
    assert [a.name for a in done.actions] == ["mem-v1-s2-0", "mem-v1-s2-1"]
    assert done.phase == READY


@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 4), (1, 8)])
def test_reshard_builds_new_layout_beside_old_then_switches(old: int, new: int) -> None:
    world = FakeWorld()
    world.step(make(shards=old))
    world.set_ready()
    p = world.step(make(shards=new))
    assert {a.name for a in p.actions} == {f"mem-v1-s{new}-{k}" for k in range(new)}
    assert world.front_selects() == ("v1", f"s{old}")
    world.set_ready()
    world.step(make(shards=new))
    assert world.front_selects() == ("v1", f"s{new}")
    assert world.names("StatefulSet") == {f"mem-v1-s{new}-{k}" for k in range(new)}
    assert world.names("Service") == {"mem"} | {f"mem-shard-{k}" for k in range(new)}
    assert world.step(make(shards=new)).actions == []


def test_superseded_target_that_never_served_is_deleted_at_once() -> None:
    world = FakeWorld()
    world.step(make())
    world.set_ready()
    world.step(make(version="v2"))  # v2 starting, never ready
    p = world.step(make(version="v3"))
    deleted = {a.name for a in p.actions if a.verb == "delete"}
    assert deleted == {"mem-v2-s2-0", "mem-v2-s2-1"}
    assert world.front_selects() == ("v1", "s2")


def test_objects_owned_by_someone_else_are_never_touched() -> None:
    spec = make()
    foreign = manifests.statefulset(make(version="v0"), 0)
    foreign["metadata"]["ownerReferences"] = [{"uid": "helm-or-other", "controller": True}]
    p = plan(spec, Observed(statefulsets=[foreign]), T0)
    assert all(a.name != foreign["metadata"]["name"] for a in p.actions)


def test_restart_after_headless_switched_but_front_not_yet_finishes_the_switch() -> None:
    world = FakeWorld()
    world.step(make())
    world.set_ready()
    world.step(make(version="v2"))
    world.set_ready("v2")
    p = plan(make(version="v2"), world.observed(), T0)
    world.apply([a for a in p.actions if a.name.startswith("mem-shard")])  # crash here
    resumed = world.step(make(version="v2"))
    assert [(a.verb, a.name) for a in resumed.actions][0] == ("patch", "mem")
    assert world.front_selects() == ("v2", "s2")


# ----------------------------------------------------------------------------- property
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["v1", "v2", "v3"]), st.integers(1, 4),
                          st.booleans(), st.integers(0, 2)), min_size=1, max_size=8))
def test_front_never_selects_a_layout_that_is_missing_and_rollouts_converge(
    steps: list[tuple[str, int, bool, int]],
) -> None:
    world = FakeWorld()
    now = T0
    spec = make()
    for version, shards, ready, repeat in steps:
        spec = make(version=version, shards=shards, rollout={"drainSeconds": 5})
        for _ in range(repeat + 1):
            before = world.front_selects()
            p = plan(spec, world.observed(), now)
            switched = any(a.kind == "Service" and a.name == "mem" and a.verb == "patch"
                           and a.body and "selector" in a.body.get("spec", {})
                           for a in p.actions)
            if switched:
                assert p.target_ready, "switched to a layout that was not ready"
            world.apply(p.actions)
            sel = world.front_selects()
            if sel is not None:
                n = int(sel[1][1:])
                have = world.names("StatefulSet")
                assert {f"mem-{sel[0]}-{sel[1]}-{k}" for k in range(n)} <= have, (before, sel)
            now += dt.timedelta(seconds=2)
        if ready:
            world.set_ready()
    for _ in range(6):  # everything ready and the drain over: converge to the last spec
        world.set_ready()
        now += dt.timedelta(seconds=10)
        world.step(spec, now)
    assert world.front_selects() == spec.target
    assert world.names("StatefulSet") == {
        manifests.statefulset_name("mem", spec.version, spec.layout, k) for k in range(spec.shards)
    }
    assert plan(spec, world.observed(), now).actions == []


# ----------------------------------------------------------------------------- ray runtime
def ray_spec(**kw: Any) -> ValueStoreSpec:
    return make(runtime="ray", ray={"clusterName": "umem", "authSecret": {"name": "ray-token"},
                                    "numGpus": 1, "replicaResources": {"ultramem_shard_slot": 1}},
                **kw)


def test_ray_runtime_creates_a_placement_job_running_up() -> None:
    world = FakeWorld()
    p = world.step(ray_spec(shards=4, replicas=3))
    (action,) = p.actions
    assert (action.verb, action.kind, action.name) == ("create", "Job", "mem-up-v1-s4-r3")
    assert action.body is not None
    (c,) = action.body["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["ultramem-dist", "up", "/var/lib/ultramem/store", "--shards", "4",
                            "--replicas", "3", "--address", "auto", "--version", "v1",
                            "--by", "row", "--host", "node", "--port", str(GRPC_PORT),
                            "--num-gpus", "1", "--resource", "ultramem_shard_slot=1"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RAY_ADDRESS"] == "ray://umem-head-svc.ml.svc:10001"
    assert env["RAY_AUTH_MODE"] == "token"
    assert p.phase == PENDING and p.wait_seconds is not None


def ray_port_of(spec: ValueStoreSpec) -> str | None:
    cmd = manifests.up_command(spec)
    return cmd[cmd.index("--port") + 1] if "--port" in cmd else None


def test_ray_runtime_binds_a_fixed_port_only_with_one_replica_per_worker() -> None:
    # replicaResources (one slot per worker) -> the standalone gRPC port by default.
    assert ray_port_of(ray_spec()) == str(GRPC_PORT) == "50051"
    # No per-replica resource: several replicas may share a worker, so free ports by default.
    bare = make(runtime="ray", ray={"clusterName": "umem"})
    assert bare.ray_port == 0 and ray_port_of(bare) is None
    # Explicit values win both ways.
    assert ray_port_of(make(runtime="ray", ray={"clusterName": "umem", "port": 6000})) == "6000"
    assert ray_port_of(make(runtime="ray", ray={
        "clusterName": "umem", "port": 0, "replicaResources": {"ultramem_shard_slot": 1}})) is None
    assert make().ray_port == 0  # standalone ignores it


def test_ray_runtime_retires_old_jobs_after_the_new_placement_succeeds() -> None:
    world = FakeWorld()
    world.step(ray_spec())
    world.objs[("Job", "mem-up-v1-s2-r2")]["status"] = {"succeeded": 1}
    assert world.step(ray_spec()).phase == READY
    p = world.step(ray_spec(version="v2"))
    assert p.phase == PROGRESSING and p.serving == ("v1", "s2")
    assert [(a.verb, a.name) for a in p.actions] == [("create", "mem-up-v2-s2-r2")]
    world.objs[("Job", "mem-up-v2-s2-r2")]["status"] = {
        "conditions": [{"type": "Complete", "status": "True"}]}
    done = world.step(ray_spec(version="v2"))
    assert [(a.verb, a.name) for a in done.actions] == [("delete", "mem-up-v1-s2-r2")]
    assert done.serving == ("v2", "s2") and done.phase == READY


def test_ray_runtime_reports_failed_placement_as_degraded() -> None:
    world = FakeWorld()
    world.step(ray_spec())
    world.objs[("Job", "mem-up-v1-s2-r2")]["status"] = {
        "conditions": [{"type": "Failed", "status": "True"}]}
    p = world.step(ray_spec())
    assert p.phase == DEGRADED and p.wait_seconds is None and p.actions == []


# ----------------------------------------------------------------------------- status
def test_status_conditions_keep_transition_times_until_they_flip() -> None:
    world = FakeWorld()
    spec = make()
    first = build_status(spec, world.step(spec), {}, T0)
    assert first["phase"] == PENDING and first["observedGeneration"] == 3
    assert get_condition(first, "Ready")["status"] == "False"  # type: ignore[index]
    world.set_ready()
    later = T0 + dt.timedelta(minutes=1)
    second = build_status(spec, world.step(spec), first, later)
    ready = get_condition(second, "Ready")
    assert ready is not None and ready["status"] == "True"
    assert ready["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    spec_valid = get_condition(second, "SpecValid")
    assert spec_valid is not None and spec_valid["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert second["ready"] == "4/4"
    assert second["endpoints"]["front"] == "mem.ml.svc:50051"
    assert second["endpoints"]["shards"] == ["mem-shard-0.ml.svc:50051", "mem-shard-1.ml.svc:50051"]


def test_failed_status_marks_spec_invalid() -> None:
    status = failed_status("spec.shards must be in [1, 256], got 0", {}, T0, 4)
    assert status["phase"] == "Failed"
    cond = get_condition(status, "SpecValid")
    assert cond is not None and cond["status"] == "False" and cond["reason"] == "InvalidSpec"
