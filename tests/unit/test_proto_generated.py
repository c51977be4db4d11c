"""The committed generated code must be exactly what `./dev proto` produces from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    expected = {
        "csi": ["csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py"],
        "csiaddons": sorted(
            f"{proto}{suffix}"
            for proto in ("encryptionkeyrotation", "identity", "reclaimspace")
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
        ),
    }
    for package, names in expected.items():
        generated = sorted(p.name for p in (tmp_path / "csi_luks" / package).iterdir())
        assert generated == names
        for name in generated:
            fresh = (tmp_path / "csi_luks" / package / name).read_text()
            committed = (ROOT / "csi_luks" / package / name).read_text()
            assert fresh == committed, f"csi_luks/{package}/{name} is stale: run `./dev proto` and commit it"


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


def test_csi_addons_key_rotation_wire_contract() -> None:
    from csi_luks.csiaddons import encryptionkeyrotation_pb2 as pb
    from csi_luks.services.sanitize import sanitized

    assert pb.DESCRIPTOR.package == "encryptionkeyrotation"
    service = pb.DESCRIPTOR.services_by_name["EncryptionKeyRotationController"]
    assert [m.name for m in service.methods] == ["EncryptionKeyRotate"]
    fields = pb.EncryptionKeyRotateRequest.DESCRIPTOR.fields_by_name
    assert {name: f.number for name, f in fields.items()} == {
        "volume_id": 1, "volume_path": 2, "encryption_key": 3, "parameters": 4, "secrets": 5,
    }  # fmt: skip
    request = pb.EncryptionKeyRotateRequest(
        volume_id="v", encryption_key="k3y", secrets={"userKey": "s3cret"}
    )
    logged = sanitized(request)
    assert "k3y" not in logged and "s3cret" not in logged and "userKey" in logged
