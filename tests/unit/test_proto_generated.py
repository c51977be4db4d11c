"""The committed generated code must be exactly what `./dev proto` produces from proto/csi.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    generated = sorted(p.name for p in (tmp_path / "csi_luks" / "csi").iterdir())
    assert generated == ["csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "csi_luks" / "csi" / name).read_text()
        committed = (ROOT / "csi_luks" / "csi" / name).read_text()
        assert fresh == committed, f"csi_luks/csi/{name} is stale: run `./dev proto` and commit the result"


def test_wire_contract_essentials() -> None:
    from csi_luks.csi import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    fields = csi_pb2.NodeStageVolumeRequest.DESCRIPTOR.fields_by_name
    assert {name: f.number for name, f in fields.items()} == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3,
        "volume_capability": 4, "secrets": 5, "volume_context": 6,
    }  # fmt: skip
    mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert mode.Value("SINGLE_NODE_SINGLE_WRITER") == 6 and mode.Value("SINGLE_NODE_MULTI_WRITER") == 7
    assert csi_pb2.ControllerServiceCapability.RPC.Type.Value("MODIFY_VOLUME") == 14
    services = set(csi_pb2.DESCRIPTOR.services_by_name)
    assert services == {"Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"}
