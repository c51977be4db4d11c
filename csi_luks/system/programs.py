"""Every program the plugin runs, named once: the call sites use these names, and the image carries them all.

PROGRAMS maps each one to the Debian package that ships it. The Dockerfile installs those packages, and
tests/host/test_image.py finds every program (and its shared libraries) in the image's root file system.
"""

from __future__ import annotations

CRYPTSETUP = "cryptsetup"
BLKID = "blkid"
MKFS_EXT4 = "mkfs.ext4"
MKFS_XFS = "mkfs.xfs"
RESIZE2FS = "resize2fs"
XFS_GROWFS = "xfs_growfs"
E2FSCK = "e2fsck"  # `csi-luks fsck` only, read-only
XFS_REPAIR = "xfs_repair"
MOUNT = "mount"
UMOUNT = "umount"
FSTRIM = "fstrim"  # csi-addons NodeReclaimSpace
SYNC = "sync"  # `sync -f` before fstrim
LOSETUP = "losetup"
CP = "cp"
RBD = "rbd"
# Not run by the plugin itself but by rbd on its behalf: `rbd device map --device-type nbd` starts the
# rbd-nbd daemon, and rbd map loads the rbd and nbd kernel modules with modprobe.
RBD_NBD = "rbd-nbd"
MODPROBE = "modprobe"

PROGRAMS: dict[str, str] = {
    CRYPTSETUP: "cryptsetup-bin",
    BLKID: "util-linux",
    MKFS_EXT4: "e2fsprogs",
    RESIZE2FS: "e2fsprogs",
    E2FSCK: "e2fsprogs",
    XFS_REPAIR: "xfsprogs",
    MKFS_XFS: "xfsprogs",
    XFS_GROWFS: "xfsprogs",
    MOUNT: "mount",
    UMOUNT: "mount",
    FSTRIM: "util-linux",
    LOSETUP: "mount",
    CP: "coreutils",
    SYNC: "coreutils",
    RBD: "ceph-common",
    RBD_NBD: "rbd-nbd",
    MODPROBE: "kmod",
}
