"""Plan one reconciliation step: (ValueStore spec, observed children, now) -> actions + state.

Pure: no API calls, no clocks, no kopf. Everything the plan needs is derived from the cluster:

* the target layout is ``(spec.version, spec.layout)``;
* the serving layout is whatever the front Service selects (its ``ultramem.io/version`` and
  ``ultramem.io/layout`` selector labels), so an operator restarted at any point re-derives it;
* StatefulSets are grouped by their version/layout labels; only objects whose controller
  owner reference points at this ValueStore are ever touched.

Blue/green (new version or new shard count) for the standalone runtime:

1. create the target layout's StatefulSets beside the serving ones;
2. wait until every target StatefulSet reports ``readyReplicas >= desired``;
3. patch the headless per-shard Services, then the front Service, to select the target;
4. after ``rollout.drainSeconds`` (timed from the front Service's ``switched-at`` annotation)
   delete the previous layout's StatefulSets and headless Services of shards that no longer exist.

The handlers apply ``Plan.actions`` in order, so "create new" precedes "switch" precedes "delete".
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ultramem_operator import manifests
from ultramem_operator.spec import (
    ANNOTATION_SWITCHED_AT,
    ANNOTATION_TEMPLATE_HASH,
    LABEL_ENDPOINT,
    LABEL_LAYOUT,
    LABEL_SHARD,
    LABEL_VERSION,
    ValueStoreSpec,
)

Verb = Literal["create", "patch", "delete"]
Kind = Literal["StatefulSet", "Service", "Job"]
LayoutKey = tuple[str, str]

PENDING, PROGRESSING, READY = "Pending", "Progressing", "Ready"
DEGRADED, FAILED = "Degraded", "Failed"


@dataclass(frozen=True)
class Action:
    """One API call. ``reason``/``message`` become a Kubernetes Event on the ValueStore."""

    verb: Verb
    kind: Kind
    name: str
    body: dict[str, Any] | None = None
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class Observed:
    """Children as listed from the API (any owner; the planner filters by owner uid)."""

    statefulsets: Sequence[Mapping[str, Any]] = ()
    services: Sequence[Mapping[str, Any]] = ()
    jobs: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class ShardState:
    index: int
    desired: int
    ready: int
    workload: str


@dataclass
class Plan:
    target: LayoutKey
    serving: LayoutKey | None  # what the Services select once the actions are applied
    phase: str
    reason: str  # CamelCase reason for the Progressing/Ready conditions
    message: str
    actions: list[Action] = field(default_factory=list)
    shards: list[ShardState] = field(default_factory=list)
    retiring: list[LayoutKey] = field(default_factory=list)
    wait_seconds: float | None = None  # re-run this soon (waiting for readiness or a drain)

    @property
    def target_ready(self) -> bool:
        return all(s.ready >= s.desired for s in self.shards)


def is_owned(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid and r.get("controller") for r in refs)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _layout_key(labels: Mapping[str, str]) -> LayoutKey | None:
    version, layout = labels.get(LABEL_VERSION), labels.get(LABEL_LAYOUT)
    return (version, layout) if version and layout else None


def layout_shards(layout: str) -> int:
    match = re.match(r"^s(\d+)", layout)
    return int(match.group(1)) if match else 0


def ready_replicas(sts: Mapping[str, Any]) -> int:
    return int((sts.get("status") or {}).get("readyReplicas") or 0)


def _owned(objs: Iterable[Mapping[str, Any]], uid: str) -> dict[str, Mapping[str, Any]]:
    return {_name(o): o for o in objs if is_owned(o, uid)}


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def format_time(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- StatefulSets
def statefulset_patch(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any] | None:
    """Merge patch that brings ``have`` to ``want``; only mutable fields; None if equal."""
    patch: dict[str, Any] = {}
    if (have.get("spec") or {}).get("replicas") != want["spec"]["replicas"]:
        patch.setdefault("spec", {})["replicas"] = want["spec"]["replicas"]
    have_annotations = (have.get("metadata") or {}).get("annotations") or {}
    have_hash = have_annotations.get(ANNOTATION_TEMPLATE_HASH)
    if have_hash != want["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH]:
        patch.setdefault("metadata", {})["annotations"] = dict(want["metadata"]["annotations"])
        patch["metadata"]["labels"] = dict(want["metadata"]["labels"])
        spec = patch.setdefault("spec", {})
        spec["template"] = want["spec"]["template"]
        spec["updateStrategy"] = want["spec"]["updateStrategy"]
    return patch or None


# ----------------------------------------------------------------------------- Services
def service_patch(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any] | None:
    """Merge patch for selector/ports/labels drift; None if ``have`` already matches."""
    patch: dict[str, Any] = {}
    have_spec = have.get("spec") or {}
    if dict(have_spec.get("selector") or {}) != want["spec"]["selector"]:
        # Selector keys never change between layouts, so a merge patch replaces all values.
        patch.setdefault("spec", {})["selector"] = want["spec"]["selector"]

    def port_view(ports: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        return [(p.get("name"), p.get("port"), p.get("targetPort")) for p in ports]

    if port_view(have_spec.get("ports") or []) != port_view(want["spec"]["ports"]):
        patch.setdefault("spec", {})["ports"] = want["spec"]["ports"]
    have_labels = _labels(have)
    if any(have_labels.get(k) != v for k, v in want["metadata"]["labels"].items()):
        patch.setdefault("metadata", {})["labels"] = want["metadata"]["labels"]
    return patch or None


def _ensure(
    actions: list[Action], kind: Kind, have: Mapping[str, Any] | None, want: dict[str, Any],
    *, create_reason: str, patch_reason: str, message: str,
    extra_patch: Mapping[str, Any] | None = None,
) -> None:
    name = want["metadata"]["name"]
    if have is None:
        if extra_patch:
            want = _merge(want, extra_patch)
        actions.append(Action("create", kind, name, want, create_reason, message))
        return
    patch = service_patch(have, want) if kind == "Service" else statefulset_patch(have, want)
    if patch is not None and extra_patch:
        patch = _merge(patch, extra_patch)
    if patch is not None:
        actions.append(Action("patch", kind, name, patch, patch_reason, message))


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- planning
def plan(
    spec: ValueStoreSpec,
    observed: Observed,
    now: dt.datetime,
    *,
    previous_phase: str | None = None,
    poll_seconds: float = 5.0,
) -> Plan:
    """Decide the next actions for ``spec`` given the observed children at time ``now``."""
    if spec.runtime == "ray":
        return _plan_ray(spec, observed, poll_seconds=poll_seconds)
    return _plan_standalone(spec, observed, now, previous_phase=previous_phase,
                            poll_seconds=poll_seconds)


def _plan_standalone(
    spec: ValueStoreSpec, observed: Observed, now: dt.datetime, *,
    previous_phase: str | None, poll_seconds: float,
) -> Plan:
    target = spec.target
    version, layout = target
    statefulsets = _owned(observed.statefulsets, spec.uid)
    services = _owned(observed.services, spec.uid)
    actions: list[Action] = []

    # 1. The target layout: create what is missing, scale or update what drifted.
    shards: list[ShardState] = []
    for k in range(spec.shards):
        want = manifests.statefulset(spec, k)
        name = want["metadata"]["name"]
        have = statefulsets.get(name)
        desired = spec.replicas_for(k)
        if have is None:
            actions.append(Action("create", "StatefulSet", name, want, "ShardCreated",
                                  f"shard {k} of {version}/{layout}: {desired} replicas"))
            ready = 0
        else:
            patch = statefulset_patch(have, want)
            if patch is not None:
                only_scale = set(patch) == {"spec"} and set(patch["spec"]) == {"replicas"}
                actions.append(Action(
                    "patch", "StatefulSet", name, patch,
                    "ShardScaled" if only_scale else "ShardUpdated",
                    f"shard {k}: {desired} replicas" if only_scale else f"shard {k}: pod template",
                ))
            ready = ready_replicas(have)
        shards.append(ShardState(k, desired, ready, name))
    target_ready = all(s.ready >= s.desired for s in shards)

    # 2. Services: the front's selector records which layout is serving.
    front_name = manifests.front_service_name(spec.name)
    front = services.get(front_name)
    serving: LayoutKey | None = None
    switched_at: dt.datetime | None = None
    if front is not None:
        serving = _layout_key((front.get("spec") or {}).get("selector") or {})
        switched_at = _parse_time(
            ((front.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SWITCHED_AT)
        )

    wait: float | None = None
    reason, message = "", ""
    switching = serving is not None and serving != target and target_ready
    if serving is None or serving == target or target_ready:
        for k in range(spec.shards):
            _ensure(actions, "Service", services.get(manifests.shard_service_name(spec.name, k)),
                    manifests.shard_service(spec, k, version, layout),
                    create_reason="ServiceCreated", patch_reason="ServiceSwitched",
                    message=f"shard {k} -> {version}/{layout}")
        stamp = {"metadata": {"annotations": {ANNOTATION_SWITCHED_AT: format_time(now)}}}
        _ensure(actions, "Service", front, manifests.front_service(spec, version, layout),
                create_reason="ServiceCreated", patch_reason="Switched",
                message=(f"serving {version}/{layout}" if not switching
                         else f"switched from {serving[0]}/{serving[1]} to {version}/{layout}"),
                extra_patch=stamp if switching else None)
        if switching:
            switched_at = now
        serving = target
    else:
        ready_total = sum(min(s.ready, s.desired) for s in shards)
        desired_total = sum(s.desired for s in shards)
        reason = "WaitingForReadiness"
        message = (f"starting {version}/{layout} beside {serving[0]}/{serving[1]}: "
                   f"{ready_total}/{desired_total} replicas ready")
        wait = poll_seconds
        # Keep the serving layout's headless Services whole while we wait.
        for k in range(layout_shards(serving[1])):
            _ensure(actions, "Service", services.get(manifests.shard_service_name(spec.name, k)),
                    manifests.shard_service(spec, k, *serving),
                    create_reason="ServiceCreated", patch_reason="ServiceRepaired",
                    message=f"shard {k} -> {serving[0]}/{serving[1]}")

    # 3. Retire every other layout once the target serves (after the drain period).
    groups: dict[LayoutKey, list[str]] = {}
    for name, obj in statefulsets.items():
        key = _layout_key(_labels(obj))
        if key is not None and key != target:
            groups.setdefault(key, []).append(name)
    retiring = sorted(k for k in groups if k != serving)
    draining = False
    if retiring and serving == target:
        drain_left = 0.0
        if switched_at is not None:
            drain_end = switched_at + dt.timedelta(seconds=spec.drain_seconds)
            drain_left = (drain_end - now).total_seconds()
        if drain_left > 0:
            draining = True
            reason = "Draining"
            message = (f"serving {version}/{layout}; keeping "
                       f"{', '.join(f'{v}/{lay}' for v, lay in retiring)} for {drain_left:.0f}s")
            wait = min(wait, drain_left) if wait is not None else drain_left
        else:
            for key in retiring:
                for name in sorted(groups[key]):
                    actions.append(Action("delete", "StatefulSet", name, None, "LayoutRetired",
                                          f"deleted {name} ({key[0]}/{key[1]})"))
            retiring = []
    elif retiring:  # abandoned targets (neither serving nor target) can go right away
        for key in retiring:
            for name in sorted(groups[key]):
                actions.append(Action("delete", "StatefulSet", name, None, "LayoutRetired",
                                      f"deleted {name} ({key[0]}/{key[1]}, never served)"))
        retiring = []
    if serving == target and not draining:
        for name, obj in services.items():
            idx = _labels(obj).get(LABEL_SHARD)
            if (_labels(obj).get(LABEL_ENDPOINT) == "shard" and idx is not None and idx.isdigit()
                    and int(idx) >= spec.shards):
                actions.append(Action("delete", "Service", name, None, "ServiceRetired",
                                      f"shard {idx} no longer exists in {layout}"))

    # 4. Phase.
    if serving != target or draining:
        phase = PROGRESSING
    elif target_ready:
        phase, reason = READY, "AllShardsReady"
        message = f"serving {version}/{layout} with {sum(s.desired for s in shards)} replicas"
    else:
        nothing_ready = all(s.ready == 0 for s in shards)
        phase = PENDING if nothing_ready and previous_phase in (None, PENDING, FAILED) else DEGRADED
        reason = "ShardsStarting" if phase == PENDING else "ShardsUnavailable"
        if phase == PENDING:  # first start: keep polling so Ready shows up promptly
            wait = poll_seconds
        short = [str(s.index) for s in shards if s.ready < s.desired]
        message = f"{version}/{layout}: shard(s) {', '.join(short)} below desired replicas"
    return Plan(target=target, serving=serving, phase=phase, reason=reason, message=message,
                actions=actions, shards=shards, retiring=retiring, wait_seconds=wait)


def job_state(job: Mapping[str, Any]) -> str:
    """'succeeded', 'failed' or 'running' from a Job's status."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if int(status.get("succeeded") or 0) >= 1 or conditions.get("Complete") == "True":
        return "succeeded"
    if conditions.get("Failed") == "True":
        return "failed"
    return "running"


def _plan_ray(spec: ValueStoreSpec, observed: Observed, *, poll_seconds: float) -> Plan:
    target = spec.target
    version, layout = target
    jobs = _owned(observed.jobs, spec.uid)
    want = manifests.placement_job(spec)
    name = want["metadata"]["name"]
    actions: list[Action] = []
    have = jobs.get(name)
    state = "running"
    if have is None:
        actions.append(Action("create", "Job", name, want, "PlacementStarted",
                              f"placing {spec.shards}x{spec.replicas} shard actors of {version}"))
    # Every placement Job records one target; the newest succeeded one is what serves.
    else:
        state = job_state(have)

    placed = {
        key: obj for obj in jobs.values()
        if (key := _layout_key(_labels(obj))) is not None and job_state(obj) == "succeeded"
    }
    serving: LayoutKey | None = target if state == "succeeded" else None
    if serving is None and placed:
        newest = max(placed.items(), key=lambda kv: str(
            (kv[1].get("metadata") or {}).get("creationTimestamp", "")))
        serving = newest[0]
    keys = {_layout_key(_labels(obj)) for obj in jobs.values()}
    retiring = sorted(k for k in keys if k is not None and k != target)
    wait: float | None = None
    if state == "succeeded":
        for other in sorted(jobs):
            if other != name:
                actions.append(Action("delete", "Job", other, None, "LayoutRetired",
                                      f"{other} superseded by {version}/{layout}"))
        retiring = []
        phase, reason, message = READY, "Placed", f"shard actors of {version}/{layout} placed"
    elif state == "failed":
        phase, reason = DEGRADED, "PlacementFailed"
        message = f"Job {name} failed; fix the cause and delete the Job to retry"
    else:
        wait = poll_seconds
        phase = PROGRESSING if serving is not None else PENDING
        reason, message = "Placing", f"Job {name} is placing shard actors of {version}/{layout}"
    ready = spec.replicas if state == "succeeded" else 0
    shards = [ShardState(k, spec.replicas, ready, name) for k in range(spec.shards)]
    return Plan(target=target, serving=serving, phase=phase, reason=reason, message=message,
                actions=actions, shards=shards, retiring=retiring, wait_seconds=wait)
