"""Shard actors on a real local Ray: up/lookup/down, restarts, reshard and roll under traffic."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
from conftest import init_local_ray

ray = pytest.importorskip("ray")

from ultramem_dist.cluster import ClusterValueStore, Deployer, PlacementOptions  # noqa: E402
from ultramem_dist.cluster.health import check_health  # noqa: E402
from ultramem_dist.cluster.registry import NAMESPACE  # noqa: E402
from ultramem_dist.errors import UltraMemError  # noqa: E402
from ultramem_dist.model import MemoryLM, preset, save_pretrained  # noqa: E402
from ultramem_dist.store.export import TableSpec, export_checkpoint, export_tables  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model() -> MemoryLM:
    torch.manual_seed(0)
    return MemoryLM(preset("micro")).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    """Version v1 (the model's tables, 2 row shards) and v2 (the same tables × 2)."""
    root = tmp_path_factory.mktemp("store")
    ckpt = save_pretrained(model, root / "ckpt")
    export_checkpoint(ckpt, root / "store", shards=2, by="row", version="v1")
    specs = {
        layer.table_id: TableSpec(
            values=layer.values.detach() * 2,
            expansion=layer.cfg.expansion,
            num_cores=layer.cfg.num_cores,
            topm=layer.cfg.topm,
            heads=layer.cfg.heads,
            d_model=layer.d_model,
            ive_perm=layer.ive_perm,
            layer=i,
        )
        for i, layer in enumerate(model.ultramem_layers())
    }
    export_tables(specs, root / "store", shards=2, by="row", version="v2", set_latest=False)
    return root


@pytest.fixture(scope="module")
def cluster():
    init_local_ray()
    deployer = Deployer(PlacementOptions(drain_s=1.5))
    yield deployer
    deployer.down()
    ray.shutdown()


@pytest.fixture(scope="module")
def deployed(cluster, store):
    cluster.up(store / "store", replicas=2, version="v1")
    return cluster


@dataclass
class Traffic:
    """A bounded background lookup loop that checks every answer against references."""

    backend: ClusterValueStore
    sel: object
    references: dict[str, torch.Tensor]
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                out = self.backend.submit("mem0", self.sel).result(timeout=10)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.errors.append(repr(exc))
                continue
            for name, ref in self.references.items():
                if torch.allclose(out, ref, atol=1e-5, rtol=1e-5):
                    self.answers.append(name)
                    break
            else:
                self.answers.append("WRONG")
            self.ok += 1
            time.sleep(0.005)

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _selection(model, tokens=6):
    layer = model.ultramem_layers()[0]
    with torch.no_grad():
        return layer.select(torch.randn(tokens, model.cfg.d_model))


def test_up_serves_every_replica_and_matches_local(deployed, model):
    snap = deployed.status()
    dep = snap["deployments"][snap["active"]]
    assert dep["num_shards"] == 2 and dep["version"] == "v1"
    replicas = [rec for reps in dep["replicas"].values() for rec in reps.values()]
    assert len(replicas) == 4 and all(r["alive"] for r in replicas)
    assert all(r["endpoint"].startswith("127.0.0.1:") for r in replicas)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        local = model(tokens)
    remote_model = MemoryLM(model.cfg).eval()
    remote_model.load_state_dict(model.state_dict())
    remote_model.drop_value_tables()
    with ClusterValueStore() as backend:
        remote_model.set_value_backend(backend)
        with torch.no_grad():
            remote = remote_model(tokens)
        assert backend.version == "v1"
        # greedy decoding with the remote tables gives the local model's tokens
        prompt = torch.randint(0, 256, (1, 5))
        assert torch.equal(remote_model.generate(prompt, 12), model.generate(prompt, 12))
    torch.testing.assert_close(remote, local, atol=1e-5, rtol=1e-5)


def test_cpu_shard_actors_never_import_torch(deployed, model):
    """A CPU shard actor serves with numpy + the native kernel: after answering lookups, no
    replica's worker process has imported torch (asked through Ray's ``__ray_call__``)."""
    from ultramem_dist.cluster.registry import NAMESPACE
    from ultramem_dist.kernels import native

    if native.library() is None:
        pytest.skip("no C compiler: shards use the torch path")
    with ClusterValueStore() as backend:  # every replica answers a few lookups first
        for _ in range(8):
            backend.submit("mem0", _selection(model)).result(timeout=30)
    snap = deployed.status()
    dep_id = snap["active"]
    dep = snap["deployments"][dep_id]
    loaded = {}
    for shard, reps in dep["replicas"].items():
        for replica in reps:
            handle = ray.get_actor(f"ultramem-{dep_id}-s{shard}-r{replica}", namespace=NAMESPACE)
            loaded[(shard, replica)] = ray.get(
                handle.__ray_call__.remote(lambda self: "torch" in __import__("sys").modules),
                timeout=30,
            )
    assert len(loaded) == 4 and not any(loaded.values()), loaded


def test_killed_replica_restarts_while_traffic_keeps_succeeding(deployed, model):
    sel = _selection(model)
    ref = model.ultramem_layers()[0].pool_local(sel).detach()
    snap = deployed.status()
    dep_id = snap["active"]
    victim = ray.get_actor(f"ultramem-{dep_id}-s0-r0", namespace=NAMESPACE)
    old_endpoint = snap["deployments"][dep_id]["replicas"][0][0]["endpoint"]
    with ClusterValueStore() as backend, Traffic(backend, sel, {"v1": ref}) as traffic:
        time.sleep(0.5)
        ray.kill(victim, no_restart=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            rec = deployed.status()["deployments"][dep_id]["replicas"][0][0]
            if rec.get("alive") and rec["info"]["restarts"] >= 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the killed replica did not come back and re-register")
        time.sleep(0.5)
    assert rec["endpoint"] == old_endpoint  # restarted on its old port: channels reconnect
    assert traffic.errors == [] and traffic.ok > 10
    assert set(traffic.answers) == {"v1"}


def test_reshard_two_to_three_under_traffic_loses_nothing(deployed, model):
    sel = _selection(model)
    ref = model.ultramem_layers()[0].pool_local(sel).detach()
    with ClusterValueStore() as backend, Traffic(backend, sel, {"v1": ref}) as traffic:
        time.sleep(0.3)
        deployed.reshard(3, by="dim")
        time.sleep(1.0)
        assert backend.switches >= 1
        assert backend.version.startswith("v1-s3")
    assert traffic.errors == [] and traffic.ok > 10
    assert set(traffic.answers) == {"v1"}
    snap = deployed.status()
    assert len(snap["deployments"]) == 1
    assert snap["deployments"][snap["active"]]["num_shards"] == 3


def test_roll_to_a_new_version_never_mixes_versions(deployed, model, store):
    sel = _selection(model)
    ref = model.ultramem_layers()[0].pool_local(sel).detach()
    with (
        ClusterValueStore() as backend,
        Traffic(backend, sel, {"v1": ref, "v2": 2 * ref}) as traffic,
    ):
        time.sleep(0.3)
        deployed.roll(store / "store", version="v2")
        time.sleep(1.0)
    assert traffic.errors == []
    assert "WRONG" not in traffic.answers  # every answer is wholly v1 or wholly v2
    assert traffic.answers[-1] == "v2" and "v1" in traffic.answers
    assert deployed.active()["version"].startswith("v2")  # v2, re-split to the active layout


def test_scale_one_shard_and_dead_single_replica_gives_clear_error(deployed, model):
    dep = deployed.active()
    deployed.scale_replicas(1, 1)
    dep = deployed.active()
    assert len(dep["replicas"][1]) == 1 and len(dep["replicas"][0]) == 2
    deployed.scale_replicas(1, 2)
    assert len(deployed.active()["replicas"][1]) == 2
    deployed.scale_replicas(1, 1)
    sel = _selection(model)
    with ClusterValueStore(deadline_s=2.0) as backend:
        backend.submit("mem0", sel).result(timeout=10)
        (rep,) = deployed.active()["replicas"][1]
        victim = ray.get_actor(f"ultramem-{dep['deployment_id']}-s1-r{rep}", namespace=NAMESPACE)
        endpoint = deployed.active()["replicas"][1][rep]["endpoint"]
        ray.kill(victim, no_restart=True)
        deadline = time.monotonic() + 30  # ray.kill is asynchronous: wait until it is gone
        while check_health(endpoint, timeout_s=0.5) != "UNREACHABLE":
            assert time.monotonic() < deadline, "killed replica still answers"
            time.sleep(0.1)
        with pytest.raises(UltraMemError, match="shard 1"):
            backend.submit("mem0", sel).result(timeout=15)


def test_bad_scale_requests_are_refused(deployed):
    with pytest.raises(ValueError, match="shard 7"):
        deployed.scale_replicas(7, 2)
    with pytest.raises(ValueError, match=">= 1"):
        deployed.scale_replicas(0, 0)


def test_fixed_port_replicas_bind_the_requested_port(cluster, store, model):
    """`up --port P` (one replica per node, as in the Kubernetes chart) binds exactly P."""
    import socket

    from ultramem_dist.store.export import export_checkpoint

    export_checkpoint(store / "ckpt", store / "store1", shards=1, by="row", version="one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fixed = Deployer(PlacementOptions(drain_s=0.5, port=port))
    fixed.up(store / "store1", replicas=1)
    dep = fixed.active()
    assert dep["replicas"][0][0]["endpoint"] == f"127.0.0.1:{port}"
    sel = _selection(model)
    with ClusterValueStore() as backend:
        got = backend.submit("mem0", sel).result(timeout=10)
    torch.testing.assert_close(got, model.ultramem_layers()[0].pool_local(sel).detach())
