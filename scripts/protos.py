"""Regenerate the committed protobuf/gRPC code, or (``--check``) prove it is fresh.

Every ``<package>/[**/]api/v1/*.proto`` is compiled with the repository root as the include
path, so imports read ``proxy/api/v1/discovery.proto`` and generated modules import
each other as ``proxy.api.v1.discovery_pb2``. ``--check`` compiles into a temporary
folder and fails on any difference from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "federation", "health", "gateway", "snapbright")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _protos() -> list[Path]:
    found: list[Path] = []
    for package in PACKAGES:
        found.extend(sorted((ROOT / package).glob("**/api/v*/*.proto")))
    return found


def _generate(protos: list[Path], out: Path) -> None:
    # protoc finds the mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH.
    scripts = str(Path(sys.executable).parent)
    os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def _generated(tree: Path, protos: list[Path]) -> set[Path]:
    names: set[Path] = set()
    for proto in protos:
        rel = proto.relative_to(ROOT).with_suffix("")
        for suffix in SUFFIXES:
            candidate = rel.parent / (rel.name + suffix)
            if (tree / candidate).exists():
                names.add(candidate)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    protos = _protos()
    if not protos:
        print("protos: no .proto files found", file=sys.stderr)
        return 1
    if not args.check:
        _generate(protos, ROOT)
        print(f"protos: generated code for {len(protos)} files")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _generate(protos, fresh)
        expected = _generated(fresh, protos)
        stale = sorted(
            str(rel)
            for rel in expected
            if not (ROOT / rel).exists() or not filecmp.cmp(fresh / rel, ROOT / rel, shallow=False)
        )
    if stale:
        print("protos: generated code is stale; run `make protos`:", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"protos: generated code for {len(protos)} files is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
