"""LUKS header backups: a `cryptsetup luksHeaderBackup` image of each encrypted volume, kept by its backend.

The image holds the LUKS2 header and the key-slot area as they are on the device: the volume key only
inside key slots, each wrapped by a DEK (AF-split, PBKDF, AES). It opens nothing without a DEK the KMS
holds, so it needs no encryption of its own, and it is destroyed with the DEK when the volume is deleted.
It is refreshed after the first format and after every key-slot change (a rotation).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from csi_luks.encryption import VolumeEncryption
from csi_luks.kms.base import KMSError
from csi_luks.luks import Cryptsetup, NotLuksDevice, WrongPassphrase
from csi_luks.luks.header import open_luks2_header_backup, read_luks2_header_backup
from csi_luks.operations import OperationRefused
from csi_luks.volumes.base import VolumeBackend

log = logging.getLogger(__name__)


def read_header_backup(cryptsetup: Cryptsetup, device: str) -> bytes:
    """The device's header backup image: for an intact LUKS2 header, read straight from the device (the
    bytes luksHeaderBackup writes, without its process); otherwise cryptsetup's own (_cryptsetup_backup)."""
    direct = read_luks2_header_backup(device)
    return direct if direct is not None else _cryptsetup_backup(cryptsetup, device)


def _cryptsetup_backup(cryptsetup: Cryptsetup, device: str) -> bytes:
    """luksHeaderBackup's image, made in a private temporary directory and read back (so a damaged or
    non-LUKS2 header gets cryptsetup's own answer)."""
    with tempfile.TemporaryDirectory(prefix="csi-luks-header-") as directory:  # 0700
        path = Path(directory) / "header"
        cryptsetup.header_backup(device, str(path))  # refuses an existing file: this one is new
        return path.read_bytes()


def refresh_header_backup(
    cryptsetup: Cryptsetup, backend: VolumeBackend, volume_id: str, device: str
) -> bool:
    """Replace the volume's header backup with the device's header; False if the backend keeps none.
    Streamed from the device to the backend (no 16 MiB copy in memory) where the header is read here."""
    if not backend.keeps_header_backups:
        return False
    stream = open_luks2_header_backup(device)
    if stream is not None:
        with stream:
            try:
                backend.store_header_backup(volume_id, stream.chunks())
            except Exception:
                if stream.read_error is None:
                    raise  # the backend's own failure (its storage), not the device's
                log.warning(
                    "volume %s: reading the LUKS header from %s failed (%s); asking cryptsetup",
                    volume_id, device, stream.read_error,
                )  # fmt: skip
                stream = None  # the device's failure: cryptsetup's backup says what it is
    if stream is None:
        backend.store_header_backup(volume_id, [_cryptsetup_backup(cryptsetup, device)])
    log.info("volume %s: LUKS header backup refreshed", volume_id)
    return True


def header_backup_matches(
    cryptsetup: Cryptsetup, backend: VolumeBackend, volume_id: str, device: str
) -> bool | None:
    """Whether the kept backup is byte for byte the device's header; None when there is no backup."""
    kept = backend.fetch_header_backup(volume_id)
    if kept is None:
        return None
    try:
        return read_header_backup(cryptsetup, device) == kept
    except NotLuksDevice:
        return False


def restore_header(
    cryptsetup: Cryptsetup,
    backend: VolumeBackend,
    encryption: VolumeEncryption,
    volume_id: str,
    device: str,
    force: bool = False,
) -> None:
    """Write the kept header backup onto the volume's device.

    Refused (OperationRefused) when there is no backup, or, unless force, when the header on the device
    still opens with the KMS's DEK (nothing to repair) or the KMS cannot say. After the restore the DEK
    must open the header, or OperationRefused says so.
    """
    kept = backend.fetch_header_backup(volume_id)
    if kept is None:
        raise OperationRefused(f"volume {volume_id} has no LUKS header backup")
    if not force:
        try:
            slot = cryptsetup.verify_passphrase(device, encryption.get_passphrase(volume_id))
        except (WrongPassphrase, NotLuksDevice):
            pass  # damaged, or not our key: what a restore is for
        except KMSError as exc:
            raise OperationRefused(
                f"volume {volume_id}: cannot check the current header against the KMS ({exc}); "
                "use --force to restore without that check"
            ) from None
        else:
            raise OperationRefused(
                f"volume {volume_id}: the header on {device} opens with the KMS's DEK (key slot {slot}); "
                "nothing to restore (use --force to restore all the same)"
            )
    with tempfile.TemporaryDirectory(prefix="csi-luks-header-") as directory:
        path = Path(directory) / "header"
        path.write_bytes(kept)
        cryptsetup.header_restore(device, str(path))
    log.warning("volume %s: LUKS header restored from its backup onto %s", volume_id, device)
    try:
        cryptsetup.verify_passphrase(device, encryption.get_passphrase(volume_id))
    except WrongPassphrase:
        raise OperationRefused(
            f"volume {volume_id}: the header was restored, but the KMS's DEK does not open it either"
        ) from None
    except KMSError as exc:  # forced while the KMS is away: the restore stands, unchecked
        log.warning("volume %s: restored header not checked against the KMS: %s", volume_id, exc)
