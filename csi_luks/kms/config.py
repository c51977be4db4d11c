"""The KMS configuration: a JSON object keyed by KMS id, re-read whenever it changes.

```json
{"local-1": {"encryptionKMSType": "local", "keyFile": "/var/lib/csi-luks/local-kek"}}
```

It comes from a file (a mounted ConfigMap, usually), or, when the file does not exist and a ConfigMap
is configured, from that ConfigMap through the Kubernetes API: either its key `config.json` holds the
whole document, or each key is a KMS id whose value is that entry's JSON. The ConfigMap is read at every
call, so an edit applies to the next call without a restart.

Tenant overrides: for KMS types that allow them (each type lists its keys), a ConfigMap in the PVC's
namespace (`tenantConfigName`, default csi-luks-kms-config) may set those keys for that namespace.

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

# The backends are not imported here: base.factory_for imports each type's module on first use.
from csi_luks.kms import ceph_csi_env
from csi_luks.kms.base import (
    EncryptionKMS,
    KMSCallObserver,
    KMSConfigError,
    KMSContext,
    factory_for,
    shares_one_passphrase,
    tenant_keys_for,
)

log = logging.getLogger(__name__)

TYPE_KEY = "encryptionKMSType"
# An empty encryptionKMSID (or none) means the passphrase comes from the request's secrets.
DEFAULT_ENTRY: Mapping[str, str] = {TYPE_KEY: "secrets"}
WHOLE_DOCUMENT_KEY = "config.json"  # a ConfigMap key that holds the whole document
TENANT_CONFIG_KEY = "tenantConfigName"
DEFAULT_TENANT_CONFIG = "csi-luks-kms-config"
CEPH_CSI_TENANT_CONFIG = "ceph-csi-kms-config"  # read when the entry names none and ours does not exist

# What identifies one version of the file: an edit changes mtime or size, an atomic replace (and a
# ConfigMap's symlink swap) the inode.
_Signature = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Snapshot:
    signature: _Signature | None  # None: the file does not exist
    entries: dict[str, dict[str, str]] | None
    # A broken file with no good version before it (at start-up) fails every call until it is fixed; a
    # broken edit of a good one leaves the last good entries in use.
    error: KMSConfigError | None


class KMSConfig:
    """The KMS configuration file; each call re-checks it with one stat and re-reads it if it changed."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        entries: Mapping[str, Mapping[str, str]] | None = None,
        *,
        config_map: tuple[str, str] | None = None,
    ) -> None:
        """A file (read lazily), or with path None a fixed set of entries (tests, embedding).

        config_map: (namespace, name) of the ConfigMap to read while the file does not exist.
        """
        self.path = os.fspath(path) if path is not None else None
        self.config_map = config_map
        # Set by a server with metrics: every volume's KMS calls are reported to it (encryption.py).
        self.observer: KMSCallObserver | None = None
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._config_map_good: dict[str, dict[str, str]] | None = None  # the last good read of the ConfigMap
        if path is None:
            self._snapshot = _Snapshot(
                None,
                _validate("the KMS configuration", {k: dict(v) for k, v in (entries or {}).items()}),
                None,
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], config_map: tuple[str, str] | None = None) -> KMSConfig:
        """Load the file now, so a broken file fails at start-up; a missing file is empty.

        The ConfigMap is not read here: an API server that is briefly away must not stop the plugin.
        """
        config = cls(path, config_map=config_map)
        if _stat(config.path or "") is not None or config_map is None:
            config._entries()
        return config

    def __repr__(self) -> str:
        return f"KMSConfig({self.path!r}, config_map={self.config_map!r})"  # never the entries

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

    def shares_one_passphrase(self, kms_id: str) -> bool:
        """Whether the id's volumes all open with the request's one passphrase (no per-volume DEK)."""
        return shares_one_passphrase(self.entry(kms_id)[TYPE_KEY])

    def build(self, kms_id: str, context: KMSContext) -> EncryptionKMS:
        entry = self.entry(kms_id)
        kms_type = entry[TYPE_KEY]
        try:
            factory = factory_for(kms_type)
        except KMSConfigError as exc:  # the same kind (a missing library is not the request's fault)
            raise type(exc)(f"{self._where}, KMS id {kms_id!r}, key {TYPE_KEY!r}: {exc}") from None
        allowed = tenant_keys_for(kms_type)
        if allowed and context.pvc_namespace:
            entry.update(_tenant_overrides(kms_id, entry, context.pvc_namespace, allowed))
        return factory(kms_id, entry, context)

    # --- loading ---------------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        if self.path is not None and self.config_map is not None:
            namespace, name = self.config_map
            return f"KMS configuration {self.path} (or ConfigMap {namespace}/{name})"
        return f"KMS configuration {self.path}" if self.path is not None else "the KMS configuration"

    def _entries(self) -> dict[str, dict[str, str]]:
        if self.config_map is not None and self.path is not None and _stat(self.path) is None:
            return self._config_map_entries(*self.config_map)
        with self._lock:
            if self.path is not None:
                signature = _stat(self.path)
                if self._snapshot is None or self._snapshot.signature != signature:
                    self._snapshot = self._replacement(self._load(self.path))
            snapshot = self._snapshot
        assert snapshot is not None  # noqa: S101 - set above or in __init__
        if snapshot.error is not None:
            raise snapshot.error
        assert snapshot.entries is not None  # noqa: S101 - error and entries are exclusive
        return snapshot.entries

    def _config_map_entries(self, namespace: str, name: str) -> dict[str, dict[str, str]]:
        """The ConfigMap's entries (read at every call); after an edit that breaks it, the last good ones."""
        try:
            entries = _from_config_map(namespace, name)
        except KMSConfigError as exc:
            if self._config_map_good is None:
                raise
            _log_kept(exc, self._config_map_good, f"ConfigMap {namespace}/{name}")
            return self._config_map_good
        self._config_map_good = entries
        return entries

    def _replacement(self, loaded: _Snapshot) -> _Snapshot:
        """What a newly read file leaves in use: itself, or after a broken edit the last good entries."""
        if loaded.error is None:
            return loaded
        last_good = self._snapshot.entries if self._snapshot is not None else None
        if last_good is None:
            log.error("%s", loaded.error)
            return loaded
        _log_kept(loaded.error, last_good, "the file")
        return _Snapshot(loaded.signature, last_good, None)

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
            return _Snapshot(signature, None, exc)
        log.info("KMS configuration %s loaded: ids %s", path, sorted(entries))
        return _Snapshot(signature, entries, None)


def _log_kept(error: KMSConfigError, last_good: Mapping[str, object], source: str) -> None:
    # As promised for edits: a mistake in one must not take every KMS id down with it.
    log.error(
        "%s; the last good KMS configuration (ids %s) stays in use until %s is fixed",
        error, sorted(last_good), source,
    )  # fmt: skip


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
    return _validate(f"KMS configuration {path}", _load_json(f"KMS configuration {path}", text))


def _load_json(source: str, text: str) -> object:
    """json.loads, every failure a KMSConfigError naming source and problem (never the document: it may
    hold tokens). Nesting deeper than Python's recursion limit and integers longer than its digit limit
    raise RecursionError and ValueError, not JSONDecodeError: a hostile document is a bad one too."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise KMSConfigError(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except KMSConfigError as exc:
        raise KMSConfigError(f"{source}: {exc}") from None
    except RecursionError:
        raise KMSConfigError(f"{source} is nested too deeply to be a KMS configuration") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise KMSConfigError(f"{source} holds a value JSON parsing refuses: {exc}") from None


def _validate(source: str, document: object) -> dict[str, dict[str, str]]:
    if not isinstance(document, dict):
        raise KMSConfigError(f"{source} must be a JSON object keyed by KMS id, not {_kind(document)}")
    entries: dict[str, dict[str, str]] = {}
    for kms_id, entry in document.items():
        where = f"{source}, KMS id {kms_id!r}"
        if not isinstance(entry, dict):
            raise KMSConfigError(f"{where}: the entry must be a JSON object, not {_kind(entry)}")
        if ceph_csi_env.is_env_style(entry) and all(isinstance(v, str) for v in entry.values()):
            entry = ceph_csi_env.translate(entry)
        if TYPE_KEY not in entry:
            raise KMSConfigError(
                f"{where}: key {TYPE_KEY!r} (or Ceph-CSI's {ceph_csi_env.PROVIDER_KEY!r}) is missing"
            )
        for key, value in entry.items():
            if not isinstance(value, str):
                # The value is never shown: the key may be a token or a passphrase.
                raise KMSConfigError(f"{where}, key {key!r}: the value must be a string, not {_kind(value)}")
            _check_no_nul(where, key, value)
        if not entry[TYPE_KEY]:
            raise KMSConfigError(f"{where}, key {TYPE_KEY!r}: the value must not be empty")
        entries[kms_id] = dict(entry)
    return entries


def _check_no_nul(where: str, key: str, value: str) -> None:
    """Values become paths, URLs, headers and names, none of which can carry a NUL byte (a system call
    given one raises ValueError, which would surface as INTERNAL far from the entry at fault)."""
    if "\0" in value:
        raise KMSConfigError(f"{where}, key {key!r}: the value must not hold a NUL byte")


def _kind(value: object) -> str:
    """A JSON value's kind, for messages that must not show the value."""
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return kinds.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _from_config_map(namespace: str, name: str) -> dict[str, dict[str, str]]:
    from csi_luks.kms.kube_api import read_config_map

    source = f"KMS configuration ConfigMap {namespace}/{name}"
    data = read_config_map(name, namespace, "KMS configuration")
    if data is None:
        log.info("%s does not exist: no KMS ids defined", source)
        return {}
    if WHOLE_DOCUMENT_KEY in data:
        return _parse(
            f"ConfigMap {namespace}/{name} key {WHOLE_DOCUMENT_KEY!r}", data[WHOLE_DOCUMENT_KEY].encode()
        )
    document = {kms_id: _load_json(f"{source}, KMS id {kms_id!r}", value) for kms_id, value in data.items()}
    return _validate(source, document)


def _tenant_overrides(
    kms_id: str, entry: Mapping[str, str], namespace: str, allowed: frozenset[str]
) -> dict[str, str]:
    """The allowed keys a tenant set in its own ConfigMap; other keys are ignored, with a warning."""
    from csi_luks.kms.kube_api import read_config_map

    name = entry.get(TENANT_CONFIG_KEY) or DEFAULT_TENANT_CONFIG
    data = read_config_map(name, namespace, f"KMS {kms_id!r}, tenant configuration")
    if data is None and not entry.get(TENANT_CONFIG_KEY):
        # A tenant set up for Ceph-CSI keeps its overrides under Ceph-CSI's default name.
        name = CEPH_CSI_TENANT_CONFIG
        data = read_config_map(name, namespace, f"KMS {kms_id!r}, tenant configuration")
    if not data:
        return {}
    ignored = sorted(set(data) - allowed)
    if ignored:
        log.warning(
            "KMS %r: tenant ConfigMap %s/%s sets keys a tenant may not override, ignored: %s (allowed: %s)",
            kms_id, namespace, name, ignored, sorted(allowed),
        )  # fmt: skip
    overrides = {key: value for key, value in data.items() if key in allowed}
    for key, value in overrides.items():
        _check_no_nul(f"KMS {kms_id!r}, tenant ConfigMap {namespace}/{name}", key, value)
    if overrides:
        log.info("KMS %r: tenant %s overrides %s", kms_id, namespace, sorted(overrides))
    return overrides
