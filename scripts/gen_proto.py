#!/usr/bin/env python3
"""Generate csi_luks/csi/csi_pb2{.py,.pyi,_grpc.py} from proto/csi.proto, and
csi_luks/csiaddons/{encryptionkeyrotation,identity,reclaimspace}_pb2{...} from proto/csi-addons/
(run by `./dev proto`).

The proto directories are mapped to package paths (-Icsi_luks/csi=proto), so the generated gRPC modules
import `csi_luks.csi.csi_pb2` rather than a top-level `csi_pb2`.
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
        # csi-addons first: its directory is inside proto/ and must not map to csi_luks/csi/csi-addons.
        f"-Icsi_luks/csiaddons={ROOT / 'proto' / 'csi-addons'}",
        f"-Icsi_luks/csi={ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "proto" / "csi.proto"),
        str(ROOT / "proto" / "csi-addons" / "encryptionkeyrotation.proto"),
        str(ROOT / "proto" / "csi-addons" / "identity.proto"),
        str(ROOT / "proto" / "csi-addons" / "reclaimspace.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
