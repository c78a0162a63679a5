"""The real kopf handlers against a kmock API server: lifecycle, scaling, rolls, restarts.

Every test runs the operator inside ``running_operator`` (always stopped on exit) and fails
with a message naming what it waited for. kmock has no StatefulSet controller and no garbage
collector: tests report readiness with ``set_ready`` and emulate owner-reference GC.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from ultramem_kmock import (
    FAST,
    FakeCluster,
    RunningOperator,
    eventually,
    fake_cluster,
    running_operator,
    valuestore,
)


async def _idle(seconds: float) -> None:
    await asyncio.sleep(seconds)


# No periodic resync: progress must come from the change/resume handlers retrying themselves.
NO_TIMER = dataclasses.replace(FAST, resync_seconds=3600)


def status(c: FakeCluster, name: str = "mem") -> dict[str, Any]:
    vs = c.valuestore(name)
    return (vs or {}).get("status") or {}


def front_selects(c: FakeCluster) -> tuple[str, str] | None:
    front = c.services().get("mem")
    if front is None:
        return None
    sel = front["spec"]["selector"]
    return (sel["ultramem.io/version"], sel["ultramem.io/layout"])


async def deploy_ready(c: FakeCluster, op: RunningOperator, **spec: Any) -> None:
    """Create ``mem``, let every shard report ready and wait for phase Ready."""
    await c.create_valuestore(valuestore(**spec))
    shards = spec.get("shards", 2)
    await eventually(lambda: len(c.statefulsets()) == shards, f"{shards} StatefulSets",
                     operator=op)
    for name in c.statefulsets():
        c.set_ready(name)
    await eventually(lambda: status(c).get("phase") == "Ready", "phase Ready", operator=op)


async def test_create_makes_owned_children_and_reports_readiness() -> None:
    async with fake_cluster() as c, running_operator(c) as op:
        await c.create_valuestore(valuestore(shards=3, replicas=2))
        await eventually(lambda: len(c.statefulsets()) == 3 and len(c.services()) == 4,
                         "3 StatefulSets and 4 Services", operator=op)
        await eventually(lambda: status(c).get("phase") == "Pending", "phase Pending",
                         operator=op)
        uid = c.valuestore("mem")["metadata"]["uid"]  # type: ignore[index]
        for obj in [*c.statefulsets().values(), *c.services().values()]:
            refs = obj["metadata"]["ownerReferences"]
            assert refs == [{"apiVersion": "ultramem.io/v1alpha1", "kind": "ValueStore",
                             "name": "mem", "uid": uid, "controller": True,
                             "blockOwnerDeletion": True}], obj["metadata"]["name"]
        sts = c.statefulsets()["mem-v1-s3-2"]
        command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["ultramem-dist", "serve-shard", "/var/lib/ultramem/store"]
        assert command[3:5] == ["--shard", "2"]
        assert c.services()["mem-shard-2"]["spec"]["clusterIP"] == "None"

        for name in c.statefulsets():
            c.set_ready(name)
        await eventually(lambda: status(c).get("phase") == "Ready", "phase Ready", operator=op)
        st = status(c)
        assert st["ready"] == "6/6" and st["servingVersion"] == "v1"
        assert {e["reason"] for e in c.events()} >= {"ShardCreated", "ServiceCreated"}


async def test_scaling_one_shard_changes_only_that_statefulset() -> None:
    async with fake_cluster() as c, running_operator(c) as op:
        await deploy_ready(c, op, shards=3)
        mark = len(c.emu.writes)
        await c.patch_valuestore("mem", {"spec": {"replicaOverrides": {"1": 5}}})
        await eventually(lambda: c.statefulsets()["mem-v1-s3-1"]["spec"]["replicas"] == 5,
                         "shard 1 scaled to 5", operator=op)
        await eventually(lambda: status(c).get("phase") == "Degraded",
                         "phase Degraded while shard 1 scales", operator=op)
        c.set_ready("mem-v1-s3-1")
        await eventually(lambda: status(c).get("ready") == "9/9", "9/9 ready", operator=op)
        await _idle(1.2)  # two more resync periods: still nothing else may change
        op.check()
        children = [w for w in c.emu.writes[mark:] if w.resource in ("statefulsets", "services")]
        assert [(w.verb, w.name, w.data) for w in children] == [
            ("patch", "mem-v1-s3-1", {"spec": {"replicas": 5}}),
        ]
        replicas = [c.statefulsets()[f"mem-v1-s3-{k}"]["spec"]["replicas"] for k in range(3)]
        assert replicas == [2, 5, 2]


async def test_version_roll_is_blue_green() -> None:
    async with fake_cluster() as c, running_operator(c, NO_TIMER) as op:
        await deploy_ready(c, op)
        await c.patch_valuestore("mem", {"spec": {"version": "v2"}})
        await eventually(lambda: {"mem-v2-s2-0", "mem-v2-s2-1"} <= set(c.statefulsets()),
                         "v2 StatefulSets created", operator=op)
        await eventually(lambda: status(c).get("phase") == "Progressing", "Progressing",
                         operator=op)
        await eventually(lambda: len(c.writes("valuestores", "patch")) > 0, "status written")
        await _idle(1.0)  # ~10 polls while v2 is not ready: nothing may switch or go away
        op.check()
        assert front_selects(c) == ("v1", "s2")
        assert not c.writes("statefulsets", "delete")
        assert {"mem-v1-s2-0", "mem-v1-s2-1"} <= set(c.statefulsets())

        ready_mark = len(c.emu.writes)
        for name in ("mem-v2-s2-0", "mem-v2-s2-1"):
            c.set_ready(name)
        await eventually(lambda: status(c).get("servingVersion") == "v2"
                         and status(c).get("phase") == "Ready"
                         and set(c.statefulsets()) == {"mem-v2-s2-0", "mem-v2-s2-1"},
                         "v2 serving alone", operator=op)
        assert front_selects(c) == ("v2", "s2")
        seq = {(w.verb, w.resource, w.name): w.seq for w in c.emu.writes}
        created_v2 = max(seq["create", "statefulsets", f"mem-v2-s2-{k}"] for k in range(2))
        switches = c.writes("services", "patch")
        deletes = [w.seq for w in c.writes("statefulsets", "delete")]
        assert switches and all(w.seq > c.emu.writes[ready_mark - 1].seq for w in switches)
        assert created_v2 < min(w.seq for w in switches)
        front_switch = max(w.seq for w in switches if w.name == "mem")
        assert min(deletes) > front_switch
        assert {e["reason"] for e in c.events()} >= {"Switched", "LayoutRetired"}


async def test_reshard_keeps_old_layout_serving_until_the_new_one_is_ready() -> None:
    async with fake_cluster() as c, running_operator(c) as op:
        await deploy_ready(c, op, shards=2)
        await c.patch_valuestore("mem", {"spec": {"shards": 4}})
        await eventually(lambda: len([n for n in c.statefulsets() if "-s4-" in n]) == 4,
                         "4 new-layout StatefulSets", operator=op)
        assert front_selects(c) == ("v1", "s2")
        assert set(c.services()) == {"mem", "mem-shard-0", "mem-shard-1"}
        for name in c.statefulsets():
            c.set_ready(name)
        await eventually(lambda: front_selects(c) == ("v1", "s4")
                         and len(c.statefulsets()) == 4 and len(c.services()) == 5,
                         "switched to s4 with 4 headless Services", operator=op)


async def test_deleted_store_leaves_only_garbage_collectable_children() -> None:
    async with fake_cluster() as c, running_operator(c) as op:
        await deploy_ready(c, op)
        uid = c.valuestore("mem")["metadata"]["uid"]  # type: ignore[index]
        await c.delete_valuestore("mem")
        await eventually(lambda: c.valuestore("mem") is None,
                         "ValueStore gone (finalizer released)", operator=op)
        children = {**c.statefulsets(), **c.services()}
        assert children, "children should still exist until the garbage collector runs"
        for obj in children.values():
            assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [uid]
        assert sorted(c.collect_garbage()) == sorted(children)
        mark = len(c.emu.writes)
        await _idle(1.2)  # more than two resync periods
        op.check()
        assert not [w for w in c.emu.writes[mark:] if w.verb == "create"
                    and w.resource != "events"]
        assert not c.statefulsets() and not c.services()


@pytest.mark.parametrize("restart_point", ["new-layout-starting", "old-layout-draining"])
async def test_operator_restart_mid_roll_converges(restart_point: str) -> None:
    async with fake_cluster() as c:
        async with running_operator(c, NO_TIMER) as first:
            await deploy_ready(c, first, rollout={"drainSeconds": 1})
            await c.patch_valuestore("mem", {"spec": {"version": "v2"}})
            await eventually(lambda: {"mem-v2-s2-0", "mem-v2-s2-1"} <= set(c.statefulsets()),
                             "v2 StatefulSets created", operator=first)
            if restart_point == "old-layout-draining":
                for name in ("mem-v2-s2-0", "mem-v2-s2-1"):
                    c.set_ready(name)
                await eventually(lambda: front_selects(c) == ("v2", "s2"), "switched",
                                 operator=first)
                assert "mem-v1-s2-0" in c.statefulsets()  # still draining when we stop
        # The operator is down. The cluster moves on without it.
        if restart_point == "new-layout-starting":
            assert front_selects(c) == ("v1", "s2")
            for name in ("mem-v2-s2-0", "mem-v2-s2-1"):
                c.set_ready(name)
        async with running_operator(c, NO_TIMER) as second:
            await eventually(lambda: status(c).get("phase") == "Ready"
                             and set(c.statefulsets()) == {"mem-v2-s2-0", "mem-v2-s2-1"},
                             "converged on v2 after restart", operator=second)
        created = [w.name for w in c.writes("statefulsets", "create")]
        assert len(created) == len(set(created)) == 4  # nothing recreated after the restart
        assert front_selects(c) == ("v2", "s2")


async def test_invalid_spec_fails_then_recovers_when_fixed() -> None:
    async with fake_cluster() as c, running_operator(c) as op:
        await c.create_valuestore(valuestore(shards=0))  # admission (CRD schema) bypassed
        await eventually(lambda: status(c).get("phase") == "Failed", "phase Failed", operator=op)
        cond = {x["type"]: x for x in status(c)["conditions"]}["SpecValid"]
        assert cond["status"] == "False" and "spec.shards" in cond["message"]
        assert not c.statefulsets()
        await c.patch_valuestore("mem", {"spec": {"shards": 1}})
        await eventually(lambda: set(c.statefulsets()) == {"mem-v1-s1-0"}, "fixed spec deployed",
                         operator=op)


async def test_ray_runtime_places_actors_with_a_job() -> None:
    async with fake_cluster() as c, running_operator(c) as op:
        await c.create_valuestore(valuestore(
            runtime="ray", shards=4, replicas=2,
            ray={"clusterName": "umem", "port": 50051,
                 "replicaResources": {"ultramem_shard_slot": 1}}))
        await eventually(lambda: "mem-up-v1-s4-r2" in c.jobs(), "placement Job", operator=op)
        assert not c.statefulsets()
        (up,) = c.jobs()["mem-up-v1-s4-r2"]["spec"]["template"]["spec"]["containers"]
        cmd = up["command"]
        assert cmd[cmd.index("--port") + 1] == "50051"
        assert cmd[cmd.index("--resource") + 1] == "ultramem_shard_slot=1"
        c.complete_job("mem-up-v1-s4-r2")
        await eventually(lambda: status(c).get("phase") == "Ready", "phase Ready", operator=op)
        assert status(c)["servingVersion"] == "v1"
        assert status(c)["endpoints"]["front"] == "ray://umem-head-svc.ml.svc:10001"
