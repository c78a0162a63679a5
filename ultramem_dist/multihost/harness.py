"""N "hosts" on one Linux box: network namespaces on a bridge, a memory cgroup each, real Ray.

Every host is a network namespace joined to one bridge by a veth pair, with its own address in
198.18.0.0/15 (the benchmarking range; the harness refuses any other), loopback up, and its
processes in their own memory cgroup (v1 ``memory`` controller) with a configurable limit. Host 0
runs a real Ray head (``ray start --head``), the others ``ray start --address`` workers, each
with a private ``--temp-dir`` so no other ``ray.init()`` on the box ever finds this cluster.

The bridge itself carries the last address of the subnet, so the process that owns the harness
(a test, the benchmark) can drive the cluster from the root namespace; clients "on host 0" run
inside host 0's namespace (:meth:`Host.popen`).

Teardown (processes killed by the cgroups' own PID lists and the namespaces' PIDs, cgroups,
namespaces, bridge, temp dirs) runs when the context manager exits, at interpreter exit
(``atexit``) and on SIGINT/SIGTERM. Needs root (:func:`skip_reason` says why not).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
RAY_PORT = 6379
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "8",
}
"""Token auth off inside the private test cluster: it is reachable only over the harness's own
bridge (198.18.x), and the workers would otherwise need the head's token file copied. Node
health checks every second, a node declared dead after 8 missed ones (~8-10 s instead of Ray's
default ~15-30 s), so a killed host's actors restart within a bounded test; a partition shorter
than that is not a node death."""

_LIVE: list[MultiHost] = []


def skip_reason() -> str | None:
    """Why the harness cannot run here (a sentence), or None when it can."""
    if os.geteuid() != 0:
        return "the multi-host harness needs root (network namespaces, veth, cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the multi-host harness needs the `{tool}` command (iproute2)"
    if not (CGROUP_MEMORY / "cgroup.procs").is_file():
        return (
            "the multi-host harness needs the cgroup v1 memory controller at /sys/fs/cgroup/memory"
        )
    return None


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@dataclass
class Host:
    """One namespace-host: its name, address, cgroup and Ray temp dir."""

    index: int
    netns: str
    ip: str
    veth: str
    """Root-namespace end of its veth pair (``link down`` here partitions the host)."""
    cgroup: Path
    temp_dir: Path
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def exec_args(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace and memory cgroup."""
        # join the cgroup first: inside `ip netns exec` /sys is remounted without cgroups
        enter = f'echo $$ > {self.cgroup}/cgroup.procs && exec ip netns exec {self.netns} "$@"'
        return ["sh", "-c", enter, "sh", *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 180, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.exec_args(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(kw.pop("env", None)),
            **kw,
        )

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.exec_args(argv), env=_env(kw.pop("env", None)), **kw)
        self.procs.append(proc)
        return proc

    def reaches(self, ip: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connect from this host to ``ip:port`` succeeds within ``timeout``."""
        code = (
            "import socket,sys;"
            "socket.create_connection((sys.argv[1],int(sys.argv[2])),float(sys.argv[3]))"
        )
        proc = self.run(
            [sys.executable, "-c", code, ip, str(port), str(timeout)], timeout=timeout + 30
        )
        return proc.returncode == 0

    def listen(self, port: int) -> subprocess.Popen[Any]:
        """A TCP listener on ``port`` in this host (accepts for 60 s; ended by teardown)."""
        code = (
            "import socket,time,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
            "socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',int(sys.argv[1])));s.listen(16);"
            "print('ready',flush=True);time.sleep(60)"
        )
        proc = self.popen(
            [sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        return proc

    def pids(self) -> set[int]:
        """Every process of this host: its cgroup's members and its namespace's PIDs."""
        pids: set[int] = set()
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()}
        out = _sh("ip", "netns", "pids", self.netns, check=False).stdout
        pids |= {int(p) for p in out.split()}
        pids.discard(os.getpid())
        return pids

    def kill(self) -> int:
        """SIGKILL every process of this host (a host crash); returns how many."""
        n = 0
        for _ in range(5):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    n += 1
            time.sleep(0.2)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.procs.clear()
        return n

    def memory_usage(self) -> int:
        return int((self.cgroup / "memory.usage_in_bytes").read_text())

    def memory_max_usage(self) -> int:
        return int((self.cgroup / "memory.max_usage_in_bytes").read_text())


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {**os.environ, **RAY_ENV, **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


class MultiHost:
    """``hosts`` namespace-hosts with a Ray cluster across them; use as a context manager."""

    def __init__(
        self,
        hosts: int = 3,
        memory_limit_bytes: int | None = 4 << 30,
        subnet: int | None = None,
        num_cpus: int = 2,
        object_store_bytes: int = 80 << 20,
        ray: bool = True,
    ) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be in 1..200")
        self.tag = f"um{os.getpid() % 100000}"
        third = subnet if subnet is not None else 1 + os.getpid() % 250
        self.net = ipaddress.ip_network(f"198.18.{third}.0/24")
        if not self.net.subnet_of(BENCH_NET):  # type: ignore[arg-type]
            raise ValueError(f"{self.net} is outside 198.18.0.0/15")
        self.bridge = f"{self.tag}br"
        self.bridge_ip = str(self.net[254])
        self.memory_limit_bytes = memory_limit_bytes
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes
        self.with_ray = ray
        self.root = Path(tempfile.mkdtemp(prefix=f"ultramem-multihost-{self.tag}-"))
        self.hosts: list[Host] = [
            Host(
                index=i,
                netns=f"{self.tag}h{i}",
                ip=str(self.net[i + 1]),
                veth=f"{self.tag}v{i}",
                cgroup=CGROUP_MEMORY / f"ultramem-{self.tag}-h{i}",
                temp_dir=self.root / f"h{i}",
            )
            for i in range(hosts)
        ]
        self._up = False
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ addresses
    @property
    def ray_address(self) -> str:
        return f"{self.hosts[0].ip}:{RAY_PORT}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> MultiHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def start(self) -> None:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        _LIVE.append(self)
        self._install_handlers()
        self._up = True
        try:
            self._network()
            for h in self.hosts:
                self._cgroup(h)
            if self.with_ray:
                self._ray()
        except BaseException:
            self.teardown()
            raise

    def _install_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: atexit still covers
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.teardown()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    def _network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for h in self.hosts:
            _sh("ip", "netns", "add", h.netns)
            peer = f"{h.veth}p"
            _sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", peer)
            _sh("ip", "link", "set", peer, "netns", h.netns)
            _sh("ip", "link", "set", h.veth, "master", self.bridge)
            _sh("ip", "link", "set", h.veth, "up")
            ns = ["ip", "netns", "exec", h.netns]
            _sh(*ns, "ip", "link", "set", "lo", "up")
            _sh(*ns, "ip", "link", "set", peer, "name", "eth0")
            _sh(*ns, "ip", "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _sh(*ns, "ip", "link", "set", "eth0", "up")

    def _cgroup(self, h: Host) -> None:
        h.cgroup.mkdir(exist_ok=True)
        if self.memory_limit_bytes is not None:
            (h.cgroup / "memory.limit_in_bytes").write_text(str(self.memory_limit_bytes))

    def _ray(self) -> None:
        common = [
            "--disable-usage-stats",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
        ]
        for h in self.hosts:
            h.temp_dir.mkdir(parents=True, exist_ok=True)
            role = (
                ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
                if h.index == 0
                else [f"--address={self.ray_address}"]
            )
            cmd = [
                _ray_cli(),
                "start",
                *role,
                f"--node-ip-address={h.ip}",
                f"--temp-dir={h.temp_dir}",
                f"--resources={json.dumps({f'host{h.index}': 1, 'slot': 1})}",
                *common,
            ]
            proc = h.run(cmd, timeout=240)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"`ray start` on host {h.index} ({h.ip}) failed:\n{proc.stderr[-2000:]}"
                )
        self.wait_nodes(len(self.hosts))

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        """Wait until ``n`` Ray nodes are alive (asked from host 0)."""
        code = (
            "import ray,sys;ray.init(address=sys.argv[1],logging_level='ERROR');"
            "print(sum(1 for x in ray.nodes() if x['Alive']))"
        )
        deadline = time.monotonic() + timeout
        seen = "?"
        while time.monotonic() < deadline:
            proc = self.hosts[0].run([sys.executable, "-c", code, self.ray_address], timeout=120)
            seen = (
                proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
            )
            if seen == str(n):
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout}s (saw {seen})")

    # ------------------------------------------------------------------ faults
    def partition(self, index: int) -> None:
        """Cut host ``index`` off the bridge (its veth link down)."""
        _sh("ip", "link", "set", self.hosts[index].veth, "down")

    def heal(self, index: int) -> None:
        _sh("ip", "link", "set", self.hosts[index].veth, "up")

    def netem_available(self) -> str | None:
        """None if ``tc netem`` works on this kernel, else why not (a sentence)."""
        h = self.hosts[-1]
        proc = _sh(
            "tc", "qdisc", "replace", "dev", h.veth, "root", "netem", "delay", "1ms", check=False
        )
        if proc.returncode != 0:
            return (
                f"this kernel ({os.uname().release}) has no netem qdisc (sch_netem): "
                f"{proc.stderr.strip()}"
            )
        _sh("tc", "qdisc", "del", "dev", h.veth, "root", check=False)
        return None

    def set_delay(self, delay_ms: float, hosts: Sequence[int] | None = None) -> None:
        """``tc netem`` delay on the links of ``hosts`` (default: all but host 0, the Ray
        head). The qdisc sits on the bridge side of the veth, so it delays every packet *to*
        that host once: a round trip from the root namespace or another host gains
        ``delay_ms``. 0 removes it."""
        for i in range(1, len(self.hosts)) if hosts is None else hosts:
            h = self.hosts[i]
            if delay_ms > 0:
                _sh(
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    h.veth,
                    "root",
                    "netem",
                    "delay",
                    f"{delay_ms}ms",
                )
            else:
                _sh("tc", "qdisc", "del", "dev", h.veth, "root", check=False)

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Kill every process of every host, remove cgroups, namespaces, bridge, temp dirs.
        Idempotent; never touches anything the harness did not create."""
        if not self._up:
            return
        self._up = False
        self._disconnect_driver()
        for h in reversed(self.hosts):
            h.kill()
        for h in self.hosts:
            for _ in range(50):
                try:
                    if h.cgroup.exists():
                        h.cgroup.rmdir()
                    break
                except OSError:  # members still exiting
                    h.kill()
                    time.sleep(0.1)
            _sh("ip", "link", "del", h.veth, check=False)
            _sh("ip", "netns", "del", h.netns, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old_handlers.clear()
        if self in _LIVE:
            _LIVE.remove(self)

    def _disconnect_driver(self) -> None:
        """``ray.shutdown()`` if this process is a driver of *this* cluster: a driver whose GCS
        disappears under it aborts the whole process (Ray's C++ check), hiding the error that
        led to the teardown."""
        try:
            import ray
        except ImportError:
            return
        if not ray.is_initialized():
            return
        with contextlib.suppress(Exception):
            node = ray._private.worker.global_worker.node  # noqa: SLF001 - no public accessor
            if node is None or node.gcs_address != self.ray_address:
                return
            ray.shutdown()

    def leftovers(self) -> list[str]:
        """What of this harness still exists (empty after a clean teardown)."""
        found: list[str] = []
        names = set(_sh("ip", "netns", "list", check=False).stdout.split())
        links = _sh("ip", "-o", "link", "show", check=False).stdout
        for h in self.hosts:
            if h.netns in names:
                found.append(f"netns {h.netns}")
            if h.cgroup.exists():
                found.append(f"cgroup {h.cgroup}")
            if f" {h.veth}@" in links or f" {h.veth}:" in links:
                found.append(f"veth {h.veth}")
        if f" {self.bridge}:" in links:
            found.append(f"bridge {self.bridge}")
        if self.root.exists():
            found.append(f"dir {self.root}")
        for h in self.hosts:
            for pid in _pids_with_temp_dir(h.temp_dir):
                found.append(f"process {pid}")
        return found


def _pids_with_temp_dir(temp_dir: Path) -> list[int]:
    """Processes whose command line names ``temp_dir`` (Ray daemons of one harness host)."""
    out = []
    needle = str(temp_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
    return out


@atexit.register
def _teardown_all() -> None:
    for mh in list(_LIVE):
        with contextlib.suppress(Exception):
            mh.teardown()


@contextlib.contextmanager
def multihost(**kw: Any) -> Iterator[MultiHost]:
    """``with multihost(hosts=3, memory_limit_bytes=4 << 30) as mh: ...``"""
    mh = MultiHost(**kw)
    with mh:
        yield mh


def pin_registry(host_index: int = 0) -> Any:
    """Create the deployment registry on host ``host_index`` (call after ``ray.init``, before
    ``up``). The registry keeps its state in memory and is not restarted by Ray, so it must not
    live on a host that a fault test kills or cuts off; on a real cluster it lands wherever Ray
    puts it (usually the head, which has the most free resources at first)."""
    from ultramem_dist.cluster.registry import NAMESPACE, REGISTRY_NAME, Registry

    return Registry.options(
        name=REGISTRY_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        resources={f"host{host_index}": 0.01},
    ).remote()
