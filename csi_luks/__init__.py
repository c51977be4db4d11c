"""csi-luks: a CSI plugin giving Kubernetes volumes per-volume LUKS2 encryption."""

# The one place the version is written: pyproject.toml reads it from here (tool.setuptools.dynamic).
# A literal, not importlib.metadata.version(): that import alone (email, zipfile, csv) costs every
# process about 2 MiB, and a source tree that was never installed reports the right version too.
__version__ = "0.1.0"
