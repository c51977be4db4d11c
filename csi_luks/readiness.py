"""Whether this plugin can do its job on this machine: what Probe and the health service report."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from csi_luks.luks import Cryptsetup, LuksError
from csi_luks.system.kernel import device_mapper_missing_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()


class ReadinessCheck:
    """Checks cryptsetup (and, on a node, device-mapper); logs a reason each time the answer changes."""

    def __init__(self, cryptsetup: Cryptsetup, needs_device_mapper: bool) -> None:
        self._cryptsetup = cryptsetup
        self._needs_device_mapper = needs_device_mapper
        self._last: Readiness | None = None
        self._lock = threading.Lock()

    @property
    def latest(self) -> Readiness | None:
        """The answer of the last check (None before the first): what the metrics report, at no cost."""
        with self._lock:
            return self._last

    def check(self) -> Readiness:
        reasons: list[str] = []
        try:
            self._cryptsetup.version()
        except LuksError as exc:
            reasons.append(f"cryptsetup is not usable: {exc}")
        if self._needs_device_mapper:
            missing = device_mapper_missing_reason()
            if missing:
                reasons.append(missing)
        result = Readiness(ready=not reasons, reasons=tuple(reasons))
        with self._lock:
            if result != self._last:
                if result.ready:
                    log.info("plugin is ready")
                else:
                    log.warning("plugin is not ready: %s", "; ".join(result.reasons))
                self._last = result
        return result
