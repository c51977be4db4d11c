#!/usr/bin/env python3
"""Generate csi_luks/csi/csi_pb2{.py,.pyi,_grpc.py} from proto/csi.proto (run by `./dev proto`).

The proto directory is mapped to the package path (-Icsi_luks/csi=proto), so the generated gRPC module
imports `csi_luks.csi.csi_pb2` rather than a top-level `csi_pb2`.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-Icsi_luks/csi={ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "proto" / "csi.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
