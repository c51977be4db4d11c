"""The KMS configuration: a JSON object keyed by KMS id, re-read whenever the file changes.

```json
{"local-1": {"encryptionKMSType": "local", "keyFile": "/var/lib/csi-luks/local-kek"}}
```

Every message names the file, the KMS id and the key at fault, never a value: entries of later KMS
types hold tokens and passphrases, and an error message ends up in Kubernetes events.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Imported for their @register side effect: building a KMS must find every built-in type.
from csi_luks.kms import local as _local  # noqa: F401
from csi_luks.kms import metadata as _metadata  # noqa: F401
from csi_luks.kms import secrets as _secrets  # noqa: F401
from csi_luks.kms import vault as _vault  # noqa: F401
from csi_luks.kms.base import EncryptionKMS, KMSConfigError, KMSContext, factory_for

log = logging.getLogger(__name__)

TYPE_KEY = "encryptionKMSType"
# An empty encryptionKMSID (or none) means the passphrase comes from the request's secrets.
DEFAULT_ENTRY: Mapping[str, str] = {TYPE_KEY: "secrets"}

# What identifies one version of the file: an edit changes mtime or size, an atomic replace (and a
# ConfigMap's symlink swap) the inode.
_Signature = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Snapshot:
    signature: _Signature | None  # None: the file does not exist
    entries: dict[str, dict[str, str]] | None
    error: KMSConfigError | None  # a broken file fails every call until it is fixed, not just the first


class KMSConfig:
    """The KMS configuration file; each call re-checks it with one stat and re-reads it if it changed."""

    def __init__(
        self, path: str | os.PathLike[str] | None, entries: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        """A file (read lazily), or with path None a fixed set of entries (tests, embedding)."""
        self.path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        if path is None:
            self._snapshot = _Snapshot(
                None,
                _validate("the KMS configuration", {k: dict(v) for k, v in (entries or {}).items()}),
                None,
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KMSConfig:
        """Load the file now, so a broken configuration fails at start-up; a missing file is empty."""
        config = cls(path)
        config._entries()
        return config

    def __repr__(self) -> str:
        return f"KMSConfig({self.path!r})"  # never the entries: later KMS types hold tokens

    def ids(self) -> list[str]:
        """The KMS ids the file defines, sorted."""
        return sorted(self._entries())

    def entry(self, kms_id: str) -> dict[str, str]:
        """A copy of one entry; "" is the secrets type unless the file defines it."""
        entries = self._entries()
        if kms_id in entries:
            return dict(entries[kms_id])
        if kms_id == "":
            return dict(DEFAULT_ENTRY)
        known = ", ".join(sorted(entries)) or "none"
        raise KMSConfigError(
            f"unknown encryptionKMSID {kms_id!r} in {self._where}; known ids: {known} "
            '(an empty id means the "secrets" type)'
        )

    def build(self, kms_id: str, context: KMSContext) -> EncryptionKMS:
        entry = self.entry(kms_id)
        kms_type = entry[TYPE_KEY]
        try:
            factory = factory_for(kms_type)
        except KMSConfigError as exc:
            raise KMSConfigError(f"{self._where}, KMS id {kms_id!r}, key {TYPE_KEY!r}: {exc}") from None
        return factory(kms_id, entry, context)

    # --- loading ---------------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"KMS configuration {self.path}" if self.path is not None else "the KMS configuration"

    def _entries(self) -> dict[str, dict[str, str]]:
        with self._lock:
            if self.path is not None:
                signature = _stat(self.path)
                if self._snapshot is None or self._snapshot.signature != signature:
                    self._snapshot = self._load(self.path)
            snapshot = self._snapshot
        assert snapshot is not None  # noqa: S101 - set above or in __init__
        if snapshot.error is not None:
            raise snapshot.error
        assert snapshot.entries is not None  # noqa: S101 - error and entries are exclusive
        return snapshot.entries

    @staticmethod
    def _load(path: str) -> _Snapshot:
        try:
            with open(path, "rb") as f:
                signature = _signature(os.fstat(f.fileno()))  # of exactly what we read
                raw = f.read()
        except FileNotFoundError:
            log.info("KMS configuration %s does not exist: no KMS ids defined", path)
            return _Snapshot(None, {}, None)
        except OSError as exc:
            error = KMSConfigError(f"cannot read the KMS configuration {path}: {exc.strerror}")
            return _Snapshot(_stat(path), None, error)
        try:
            entries = _parse(path, raw)
        except KMSConfigError as exc:
            log.error("%s", exc)
            return _Snapshot(signature, None, exc)
        log.info("KMS configuration %s loaded: ids %s", path, sorted(entries))
        return _Snapshot(signature, entries, None)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _stat(path: str) -> _Signature | None:
    try:
        return _signature(os.stat(path))
    except FileNotFoundError:
        return None
    except OSError:
        # Unreadable in a way a later open reports properly; a sentinel that never matches a file.
        return (-1, -1, -1, -1)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise KMSConfigError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _parse(path: str, raw: bytes) -> dict[str, dict[str, str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KMSConfigError(f"KMS configuration {path} is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        # Message and position only: the document itself may hold tokens.
        raise KMSConfigError(
            f"KMS configuration {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except KMSConfigError as exc:
        raise KMSConfigError(f"KMS configuration {path}: {exc}") from None
    return _validate(f"KMS configuration {path}", document)


def _validate(source: str, document: object) -> dict[str, dict[str, str]]:
    if not isinstance(document, dict):
        raise KMSConfigError(f"{source} must be a JSON object keyed by KMS id, not {_kind(document)}")
    entries: dict[str, dict[str, str]] = {}
    for kms_id, entry in document.items():
        where = f"{source}, KMS id {kms_id!r}"
        if not isinstance(entry, dict):
            raise KMSConfigError(f"{where}: the entry must be a JSON object, not {_kind(entry)}")
        if TYPE_KEY not in entry:
            raise KMSConfigError(f"{where}: key {TYPE_KEY!r} is missing")
        for key, value in entry.items():
            if not isinstance(value, str):
                # The value is never shown: the key may be a token or a passphrase.
                raise KMSConfigError(f"{where}, key {key!r}: the value must be a string, not {_kind(value)}")
        if not entry[TYPE_KEY]:
            raise KMSConfigError(f"{where}, key {TYPE_KEY!r}: the value must not be empty")
        entries[kms_id] = dict(entry)
    return entries


def _kind(value: object) -> str:
    """A JSON value's kind, for messages that must not show the value."""
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return kinds.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)
