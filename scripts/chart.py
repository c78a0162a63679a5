"""Lint, render and validate the Helm chart without a cluster (``make chart``).

    python scripts/chart.py [-f VALUES.yaml ...] [--set KEY=VALUE ...] [--out DIR]
                            [--kube-version 1.30.0]

Runs the real Helm v4 engine (``helm-python-sdk``): ``helm lint --strict`` and a render for
the given values (merged in order, ``--set`` last; dotted keys, YAML scalars), then validates
every rendered object: built-in kinds with ``kubernetes-validate`` (strict, offline schemas),
the ``RayCluster`` against KubeRay's CRD schema (vendored in ``schemas/kuberay/``) and
``ValueStore``s against ``operators/crds/valuestore.yaml``. ``--out DIR`` also writes the
rendered manifests. Exit 0 when everything is valid, 1 with the problems listed otherwise,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "ultramem"
CRDS = {
    "RayCluster": (REPO / "schemas" / "kuberay" / "ray.io_rayclusters.yaml", "v1"),
    "ValueStore": (REPO / "operators" / "crds" / "valuestore.yaml", "v1alpha1"),
}
NO_SCHEMA = {"ServiceMonitor", "ScaledObject"}  # no schema available offline: reported, skipped


def crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{path} has no version {version}")


def merged_values(files: list[Path], sets: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    for f in files:
        merge(values, yaml.safe_load(f.read_text()) or {})
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, not {item!r}")
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-f", "--values", type=Path, action="append", default=[])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--kube-version", default="1.30.0")
    ap.add_argument("--out", type=Path, help="also write the rendered manifests here")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.values if not f.is_file()]
    if missing:
        print(f"error: values file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        values = merged_values(args.values, args.set)
    except (ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import helm_python as helm
    import jsonschema
    import kubernetes_validate

    problems: list[str] = []
    lint = helm.lint(str(CHART), values=values, strict=True, kube_version=f"v{args.kube_version}")
    for msg in lint.get("messages") or []:
        if (msg.get("severity") or 0) >= 2:
            problems.append(f"lint: {msg}")
    problems += [f"lint: {e}" for e in lint.get("errors") or []]
    try:
        with helm.Chart.load(str(CHART)) as chart:
            manifests = chart.render(values, name="ultramem", namespace="default")
    except helm.HelmValuesError as exc:  # values.schema.json refuses them: bad input
        print(f"error: values.schema.json rejects these values: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return 2
    except helm.HelmRenderError as exc:
        print(f"error: the chart does not render for these values: {exc}", file=sys.stderr)
        return 1
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append((path.split("/templates/", 1)[-1], d))
        if args.out:
            target = args.out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    validators = {
        kind: jsonschema.Draft4Validator(crd_schema(*where)) for kind, where in CRDS.items()
    }
    skipped = 0
    for where, d in docs:
        name = f"{where}: {d['kind']}/{d['metadata']['name']}"
        if d["kind"] in validators:
            problems += [
                f"{name}: {e.message} at {'/'.join(map(str, e.path))}"
                for e in validators[d["kind"]].iter_errors(d)
            ]
        elif d["kind"] in NO_SCHEMA:
            skipped += 1
        else:
            try:
                kubernetes_validate.validate(d, args.kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{name}: {exc.message} at {'/'.join(map(str, exc.path))}")
    for p in problems:
        print(p, file=sys.stderr)
    kinds = sorted({d["kind"] for _, d in docs})
    print(
        f"chart {CHART.relative_to(REPO)}: lint {'ok' if not lint.get('errors') else 'FAILED'}, "
        f"{len(docs)} objects rendered ({', '.join(kinds)}), "
        f"{len(docs) - skipped} validated against Kubernetes {args.kube_version} / CRD schemas"
        + (f", {skipped} without an offline schema" if skipped else "")
        + (f"; {len(problems)} problem(s)" if problems else "; all valid")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
