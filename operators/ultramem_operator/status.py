"""ValueStore ``status``: phase, per-shard readiness, endpoints and standard conditions (pure).

Condition types: ``Ready`` (the target layout serves with every desired replica ready),
``Progressing`` (a rollout, reshard, drain or placement is under way), ``Degraded``
(the serving layout is below its desired replicas or placement failed) and ``SpecValid``.
``lastTransitionTime`` only moves when a condition's status flips.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from ultramem_operator import manifests
from ultramem_operator.reconcile import DEGRADED, FAILED, PROGRESSING, READY, Plan, format_time
from ultramem_operator.spec import GRPC_PORT, ValueStoreSpec

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "SpecValid")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: dt.datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``type_`` upserted; keeps lastTransitionTime if unchanged."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != value
        new = {
            "type": type_,
            "status": value,
            "reason": reason or "None",
            "message": message,
            "lastTransitionTime": format_time(now) if changed else cond.get(
                "lastTransitionTime", format_time(now)),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {"type": type_, "status": value, "reason": reason or "None", "message": message,
               "lastTransitionTime": format_time(now)}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(str(c.get("type")), len(order)))


def get_condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def endpoints(spec: ValueStoreSpec) -> dict[str, Any]:
    """Where clients connect: per-shard headless Services, or the RayCluster's Ray Client."""
    domain = f"{spec.namespace}.svc"
    if spec.runtime == "ray":
        return {"front": f"ray://{spec.ray_cluster}-head-svc.{domain}:{spec.ray_client_port}",
                "shards": []}
    return {
        "front": f"{manifests.front_service_name(spec.name)}.{domain}:{GRPC_PORT}",
        "shards": [f"{manifests.shard_service_name(spec.name, k)}.{domain}:{GRPC_PORT}"
                   for k in range(spec.shards)],
    }


def build_status(
    spec: ValueStoreSpec, plan: Plan, previous: Mapping[str, Any], now: dt.datetime,
) -> dict[str, Any]:
    """The full ``status`` for a successfully planned reconciliation."""
    gen = spec.generation
    conds: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or []]
    target = f"{plan.target[0]}/{plan.target[1]}"
    ready_ok = plan.phase == READY
    conds = set_condition(conds, "Ready", ready_ok, plan.reason if ready_ok else (
        plan.reason or "NotReady"), plan.message, now, gen)
    progressing = plan.phase == PROGRESSING
    conds = set_condition(conds, "Progressing", progressing,
                          plan.reason if progressing else "Complete",
                          plan.message if progressing else f"{target} rolled out", now, gen)
    degraded = plan.phase == DEGRADED
    conds = set_condition(conds, "Degraded", degraded, plan.reason if degraded else "AsExpected",
                          plan.message if degraded else "", now, gen)
    conds = set_condition(conds, "SpecValid", True, "Valid", "", now, gen)
    ready = sum(min(s.ready, s.desired) for s in plan.shards)
    desired = sum(s.desired for s in plan.shards)
    status: dict[str, Any] = {
        "phase": plan.phase,
        "targetVersion": plan.target[0],
        "targetLayout": plan.target[1],
        "servingVersion": plan.serving[0] if plan.serving else None,
        "servingLayout": plan.serving[1] if plan.serving else None,
        "ready": f"{ready}/{desired}",
        "shards": [{"index": s.index, "desired": s.desired, "ready": s.ready,
                    "workload": s.workload} for s in plan.shards],
        "endpoints": endpoints(spec),
        "conditions": conds,
    }
    if gen is not None:
        status["observedGeneration"] = gen
    return status


def failed_status(
    message: str, previous: Mapping[str, Any], now: dt.datetime, generation: int | None,
) -> dict[str, Any]:
    """Status for a spec the operator refuses (kopf.PermanentError follows)."""
    conds: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or []]
    conds = set_condition(conds, "SpecValid", False, "InvalidSpec", message, now, generation)
    conds = set_condition(conds, "Ready", False, "InvalidSpec", message, now, generation)
    conds = set_condition(conds, "Progressing", False, "InvalidSpec", message, now, generation)
    status: dict[str, Any] = {"phase": FAILED, "conditions": conds}
    if generation is not None:
        status["observedGeneration"] = generation
    return status
