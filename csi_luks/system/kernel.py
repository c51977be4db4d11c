"""What the running kernel offers: device-mapper for dm-crypt."""

from __future__ import annotations

from pathlib import Path

PROC_MISC = Path("/proc/misc")
DM_CONTROL = Path("/dev/mapper/control")


def device_mapper_missing_reason(proc_misc: Path = PROC_MISC, control: Path = DM_CONTROL) -> str | None:
    """None when device-mapper is usable, else why not (for Probe and the demo's VM decision).

    /dev/mapper/control can exist without a driver behind it (a container's static /dev), so the
    driver's registration in /proc/misc is what counts.
    """
    try:
        registered = device_mapper_registered(proc_misc)
    except OSError as exc:
        return f"cannot read {proc_misc}: {exc.strerror}"
    if not registered:
        return "the kernel has no device-mapper driver (modprobe dm_mod dm_crypt on the node)"
    if not control.exists():
        return f"{control} is missing (mount the host's /dev into the plugin container)"
    return None


def device_mapper_registered(proc_misc: Path = PROC_MISC) -> bool:
    """Whether the kernel has a device-mapper driver (built in or loaded); OSError if it cannot tell."""
    return any(line.split()[1:2] == ["device-mapper"] for line in proc_misc.read_text().splitlines())
