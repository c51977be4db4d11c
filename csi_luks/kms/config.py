"""The KMS configuration: a JSON object keyed by KMS id, each entry naming its `encryptionKMSType`.

Read from a mounted file and re-read when the file changes, so an edit needs no restart.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

# Importing the backends registers their types.
from csi_luks.kms import local, secrets  # noqa: F401
from csi_luks.kms.base import EncryptionKMS, KMSConfigError, KMSContext, factory_for

KMS_TYPE = "encryptionKMSType"
_DEFAULT_ENTRY = {KMS_TYPE: "secrets"}


def _validate(path: Path, raw: object) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict):
        raise KMSConfigError(f"{path}: the KMS configuration must be a JSON object keyed by KMS id")
    config: dict[str, dict[str, str]] = {}
    for kms_id, entry in raw.items():
        if not isinstance(entry, dict):
            raise KMSConfigError(f"{path}: KMS {kms_id!r} must be a JSON object")
        for key, value in entry.items():
            if not isinstance(value, str):
                # The value itself is not shown: it may be a token.
                raise KMSConfigError(f"{path}: KMS {kms_id!r}: key {key!r} must be a string")
        if not entry.get(KMS_TYPE):
            raise KMSConfigError(f"{path}: KMS {kms_id!r}: key {KMS_TYPE!r} is missing")
        config[kms_id] = dict(entry)
    return config


class KMSConfig:
    def __init__(self, path: Path | None, entries: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.path = path
        self._entries = {k: dict(v) for k, v in (entries or {}).items()}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path) -> KMSConfig:
        return cls(Path(path))

    def _refresh(self) -> dict[str, dict[str, str]]:
        if self.path is None:
            return self._entries
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp or (stamp is None and self._entries):
                if stamp is None:
                    self._entries = {}
                else:
                    try:
                        raw = json.loads(self.path.read_text())
                    except json.JSONDecodeError as exc:
                        raise KMSConfigError(
                            f"{self.path}: not valid JSON ({exc.msg}, line {exc.lineno})"
                        ) from None
                    self._entries = _validate(self.path, raw)
                self._stamp = stamp
            return self._entries

    def ids(self) -> list[str]:
        return sorted(self._refresh())

    def entry(self, kms_id: str) -> dict[str, str]:
        entries = self._refresh()
        if kms_id in entries:
            return dict(entries[kms_id])
        if kms_id == "":
            return dict(_DEFAULT_ENTRY)
        known = ", ".join(sorted(entries)) or "none configured"
        where = f" in {self.path}" if self.path else ""
        raise KMSConfigError(f"unknown encryptionKMSID {kms_id!r}{where}; known ids: {known}")

    def build(self, kms_id: str, context: KMSContext) -> EncryptionKMS:
        entry = self.entry(kms_id)
        return factory_for(entry[KMS_TYPE])(kms_id, entry, context)
