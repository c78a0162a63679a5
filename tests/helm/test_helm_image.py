"""The Dockerfile the chart runs: CPU/CUDA base by build arg, torch first, non-root 10001,
and a .dockerignore that keeps every COPY source in the build context."""

from __future__ import annotations

import fnmatch
import re

from ultramem_chart import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
IGNORED = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def instructions() -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_base_image_is_selectable_and_defaults_to_python_slim() -> None:
    lines = instructions()
    assert lines[0] == "ARG BASE=python:3.11-slim"
    assert "FROM ${BASE}" in lines


def test_torch_cpu_is_installed_before_the_package() -> None:
    lines = instructions()
    torch = next(i for i, line in enumerate(lines) if 'torch==${TORCH_VERSION}' in line)
    package = next(i for i, line in enumerate(lines) if 'pip install ".[operator]"' in line)
    assert torch < package
    assert "ARG TORCH_VERSION=2.13.0" in lines
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines


def test_runs_as_non_root_10001_like_the_chart_expects() -> None:
    lines = instructions()
    user_at = lines.index("USER 10001:10001")
    assert not any(line.startswith("RUN") for line in lines[user_at:])
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
