"""Restores and clones on real dm-crypt (in the VM): readable with their own DEK entries, grown at stage."""

from __future__ import annotations

import os
from pathlib import Path

from csi_luks.csi import csi_pb2
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.volume_metadata import STATE
from tests.support.plugin import MiB, mount_capability, running_plugin
from tests.vm.test_node_lifecycle import stage, unstage

DEK = "csi-luks/dek"
LOCAL_1 = {"encrypted": "true", "encryptionKMSID": "local-1"}
LOCAL_2 = {"encrypted": "true", "encryptionKMSID": "local-2"}


def filesystem_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_blocks * info.f_frsize


def test_restore_into_a_larger_volume_and_clone_open_with_their_own_dek_entries(tmp_path: Path) -> None:
    capability = mount_capability("ext4")
    with running_plugin(tmp_path / "plugin") as plugin:
        source = plugin.create("pvc-source", size=64 * MiB, capability=capability).volume_id
        stage(plugin, source, tmp_path / "source", capability)
        (tmp_path / "source" / "data.txt").write_text("written before the snapshot")
        source_size = filesystem_bytes(tmp_path / "source")
        unstage(plugin, source, tmp_path / "source")

        snapshot = plugin.snapshot("snap-1", source).snapshot_id
        # Restored under another KMS id and larger; cloned under the source's KMS id at the same size.
        restored = plugin.copy("pvc-restored", 192 * MiB, LOCAL_2, snapshot_id=snapshot).volume_id
        clone = plugin.copy("pvc-clone", None, LOCAL_1, volume_id=source).volume_id
        wrapped = {i: plugin.backend.get(i).metadata[DEK] for i in (source, snapshot, restored, clone)}
        assert len(set(wrapped.values())) == 4, "every copy holds its own wrapped DEK"
        assert plugin.backend.get(restored).metadata[STATE] == "encrypted"  # never reformatted

        # The source is gone before its copies are opened: they depend on nothing of it.
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source))

        stage(plugin, restored, tmp_path / "restored", capability)
        assert (tmp_path / "restored" / "data.txt").read_text() == "written before the snapshot"
        # The LUKS mapping spans the larger device and ext4 was grown to it at stage.
        mapped = Cryptsetup().status(mapper_name(restored))
        assert mapped.size_sectors is not None and mapped.size_sectors * 512 >= 192 * MiB
        assert filesystem_bytes(tmp_path / "restored") > source_size + 100 * MiB
        (tmp_path / "restored" / "data.txt").write_text("changed in the restore")
        unstage(plugin, restored, tmp_path / "restored")

        stage(plugin, clone, tmp_path / "clone", capability)
        assert (tmp_path / "clone" / "data.txt").read_text() == "written before the snapshot"
        unstage(plugin, clone, tmp_path / "clone")

        # The snapshot still restores the original content after the restore changed its copy.
        again = plugin.copy("pvc-again", None, LOCAL_1, snapshot_id=snapshot).volume_id
        stage(plugin, again, tmp_path / "again", capability)
        assert (tmp_path / "again" / "data.txt").read_text() == "written before the snapshot"
        unstage(plugin, again, tmp_path / "again")
