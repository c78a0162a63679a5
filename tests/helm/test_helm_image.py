"""The Dockerfile the chart runs: CPU/CUDA base by build arg, torch first, non-root 10001,
a torch-free ``shard-cpu`` target whose requirement list covers what ``serve-shard`` imports,
and a .dockerignore that keeps every COPY source in the build context."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from ultramem_chart import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
IGNORED = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def instructions() -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def stages() -> dict[str, list[str]]:
    """Instructions of each ``FROM ... AS name`` stage."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in instructions():
        if line.startswith("FROM "):
            current = out.setdefault(line.split()[-1], [])
        current.append(line)
    return out


def test_base_image_is_selectable_and_defaults_to_python_slim() -> None:
    lines = instructions()
    assert lines[0] == "ARG BASE=python:3.11-slim"
    assert "FROM ${BASE} AS base" in lines
    assert list(stages()) == ["base", "shard-cpu", "full"]  # full: the default (last) target


def test_torch_cpu_is_installed_before_the_package() -> None:
    lines = instructions()
    torch = next(i for i, line in enumerate(lines) if 'torch==${TORCH_VERSION}' in line)
    package = next(i for i, line in enumerate(lines) if 'pip install ".[operator]"' in line)
    assert torch < package
    assert "ARG TORCH_VERSION=2.13.0" in lines
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines


def test_runs_as_non_root_10001_like_the_chart_expects() -> None:
    for name in ("shard-cpu", "full"):
        lines = stages()[name]
        user_at = lines.index("USER 10001:10001")
        assert not any(line.startswith("RUN") for line in lines[user_at:]), name
    values = (REPO / "helm" / "ultramem" / "values.yaml").read_text()
    assert "runAsUser: 10001" in values


def test_every_copy_source_survives_the_dockerignore() -> None:
    sources = [src for line in instructions() if line.startswith("COPY ")
               for src in line.split()[1:-1]]
    assert {"pyproject.toml", "README.md", "ultramem_dist", "operators/ultramem_operator"} <= set(
        sources)
    for src in sources:
        assert (REPO / src).exists(), src
        for pattern in IGNORED:
            ignored = fnmatch.fnmatch(src, pattern) or src.startswith(pattern.rstrip("/") + "/")
            assert not ignored, f"{src} is excluded from the build context by {pattern!r}"
    assert ".venv" in IGNORED and ".git" in IGNORED


SHARD_REQS = REPO / "docker" / "shard-cpu-requirements.txt"


def _shard_requirements() -> list[Requirement]:
    lines = SHARD_REQS.read_text().splitlines()
    return [Requirement(x) for x in lines if x.strip() and not x.startswith("#")]


def test_the_shard_cpu_target_installs_no_torch_and_the_same_constraints() -> None:
    lines = stages()["shard-cpu"]
    assert not any("torch==" in line or "TORCH_INDEX_URL" in line for line in lines)
    assert not {"torch", "ray", "kubernetes"} & {r.name for r in _shard_requirements()}
    assert any("pip install --no-deps ." in line for line in lines)
    assert "COPY docker/shard-cpu-requirements.txt ./" in lines
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    for req in _shard_requirements():
        assert req.name in declared, f"{req.name} is not a dependency in pyproject.toml"
        assert req.specifier == declared[req.name].specifier, req.name


def test_serve_shard_imports_only_what_the_shard_cpu_image_installs() -> None:
    code = (
        "import sys, json, importlib.metadata as md\n"
        "from ultramem_dist.cli import load_commands\n"
        "load_commands()\n"
        "import ultramem_dist.serving.app, ultramem_dist.serving.supervisor\n"
        "dists = md.packages_distributions()\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "print(json.dumps({t: dists[t] for t in sorted(tops) if t in dists}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120).stdout  # fmt: skip
    loaded = json.loads(out)
    assert "torch" not in loaded and "ray" not in loaded and "kubernetes" not in loaded
    from importlib.metadata import requires

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    allowed = {norm(r.name) for r in _shard_requirements()} | {"ultramem-dist"}
    todo = list(allowed)
    while todo:  # what pip installs with them
        for r in requires(todo.pop()) or []:
            req = Requirement(r)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and (
                norm(req.name) not in allowed
            ):
                allowed.add(norm(req.name))
                todo.append(norm(req.name))
    for top, names in loaded.items():
        # a namespace ("google") maps to several distributions; one installed is enough
        assert {norm(n) for n in names} & allowed, f"serve-shard imports {top} from {names}"
