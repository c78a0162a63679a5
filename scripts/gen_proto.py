"""Regenerate the checked-in gRPC stubs under ``ultramem_dist/proto/`` from ``proto/``.

Usage::

    python scripts/gen_proto.py          # rewrite the stubs
    python scripts/gen_proto.py --check  # exit 1 if the checked-in stubs are stale

Import-path fix: ``grpc_tools.protoc`` writes ``import <proto dir as package>.gather_pb2`` into
``gather_pb2_grpc.py``.  We stage each ``proto/<p>.proto`` as ``ultramem_dist/proto/<p>.proto`` in a
scratch include root, so the generated import is the real, absolute package path
(``from ultramem_dist.proto.ultramem.v1 import gather_pb2``) and nothing needs ``sys.path`` hacks
or post-editing.  (The descriptor's file name becomes ``ultramem_dist/proto/ultramem/v1/
gather.proto``; the proto package, and therefore every wire/service name, stays ``ultramem.v1``.)
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_SRC = ROOT / "proto"
PACKAGE_DIR = Path("ultramem_dist") / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT_TEXT = '"""Generated gRPC stubs (do not edit; run scripts/gen_proto.py)."""\n'


def _protos() -> list[Path]:
    return sorted(p.relative_to(PROTO_SRC) for p in PROTO_SRC.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Generate stubs for every proto under ``proto/`` into ``out_root/ultramem_dist/proto``.

    Returns the generated files relative to ``out_root``.
    """
    from grpc_tools import protoc  # noqa: PLC0415  (dev-only dependency)

    with tempfile.TemporaryDirectory() as scratch:
        include = Path(scratch)
        rels = _protos()
        for rel in rels:
            staged = include / PACKAGE_DIR / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PROTO_SRC / rel, staged)
        args = [
            "grpc_tools.protoc",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *[str(PACKAGE_DIR / rel) for rel in rels],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    files: list[Path] = []
    for rel in rels:
        pkg = PACKAGE_DIR / rel.parent
        # Every directory from ultramem_dist/proto down to the proto's package needs __init__.py.
        d = pkg
        while d != PACKAGE_DIR.parent:
            init = out_root / d / "__init__.py"
            init.write_text(INIT_TEXT)
            files.append(d / "__init__.py")
            d = d.parent
        stem = rel.stem
        files += [pkg / f"{stem}{sfx}" for sfx in GENERATED_SUFFIXES]
    return sorted(set(files))


def check() -> bool:
    """True when the checked-in stubs equal freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [
            str(rel)
            for rel in fresh
            if not (ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, False)
        ]
    for rel in stale:
        print(f"stale generated file: {rel}", file=sys.stderr)
    return not stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify, do not write")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check() else 1)
    for rel in generate(ROOT):
        print(f"wrote {rel}")


if __name__ == "__main__":
    main()
