"""Test support: the argv audit and the bridge that runs kernel tests inside a VM."""
