from __future__ import annotations

from csi_luks.csi import csi_pb2
from csi_luks.services.sanitize import STRIPPED, sanitized


def test_secrets_are_stripped_and_other_fields_kept() -> None:
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id="vol-1",
        staging_target_path="/stage",
        secrets={"encryptionPassphrase": "top-secret-value"},
        volume_context={"encrypted": "true"},
    )
    text = sanitized(request)
    assert "top-secret-value" not in text
    assert STRIPPED in text and "encryptionPassphrase" in text
    assert "vol-1" in text and "encrypted" in text
    assert request.secrets["encryptionPassphrase"] == "top-secret-value"  # the original is untouched


def test_nested_secrets_are_stripped() -> None:
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id="v", secrets={"userKey": "AQBcephkey=="})
    assert "AQBcephkey" not in sanitized(request)


def test_repeated_and_singular_message_fields_are_walked() -> None:
    capability = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"))
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        volume_capabilities=[capability, capability],
        secrets={"encryptionPassphrase": "p4ss-w0rd-xyz"},
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="snap-1")
        ),
    )
    text = sanitized(request)
    assert "p4ss-w0rd-xyz" not in text
    assert text.count("ext4") == 2 and "snap-1" in text
