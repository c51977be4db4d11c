"""csi-luks: a CSI plugin giving Kubernetes volumes per-volume LUKS2 encryption."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csi-luks")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
