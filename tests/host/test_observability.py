"""`csi-luks serve --metrics-address` and `--log-format json`: a real process, after a lifecycle."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_luks.csi import csi_pb2
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.openbao import free_port
from tests.support.plugin import MiB, code_of, kms_entries, mount_capability
from tests.support.served_plugin import Plugin, serve

CREATE = "/csi.v1.Controller/CreateVolume"
DELETE = "/csi.v1.Controller/DeleteVolume"
# Sent in the request's secrets: the local KMS does not need it, the server must still never show it.
REQUEST_SECRET = "request-secret-5f0c2a9e"


@dataclass(frozen=True)
class Lifecycle:
    volume_id: str
    dek: str  # the volume's passphrase, read back from the KMS while the volume existed
    wrapped_dek: str


def _lifecycle(plugin: Plugin, root: Path) -> Lifecycle:
    """CreateVolume (encrypted, local KMS), a CreateVolume refused, DeleteVolume."""
    created = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-observed",
            capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
            volume_capabilities=[mount_capability()],
            parameters={"encrypted": "true", "encryptionKMSID": "local-1"},
            secrets={"encryptionPassphrase": REQUEST_SECRET},
        )
    )
    volume_id = created.volume.volume_id
    backend = StandaloneBackend(root / "state")
    encryption = volume_encryption(
        KMSConfig.from_file(root / "kms.json"), "local-1", KMSContext(secrets={}), backend
    )
    dek = encryption.get_passphrase(volume_id)
    wrapped = encryption.store.fetch_dek(volume_id)
    refused = csi_pb2.CreateVolumeRequest(volume_capabilities=[mount_capability()])  # no name
    assert code_of(plugin.controller.CreateVolume, refused) == grpc.StatusCode.INVALID_ARGUMENT
    plugin.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets={"encryptionPassphrase": REQUEST_SECRET})
    )
    return Lifecycle(volume_id, dek, wrapped)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "kms.json").write_text(json.dumps(kms_entries(tmp_path)))
    return tmp_path


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_endpoint_counts_the_calls_of_a_lifecycle(root: Path) -> None:
    port = free_port()
    with serve(root / "csi.sock", "--mode", "controller", "--metrics-address", f"127.0.0.1:{port}") as plugin:
        assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
        done = _lifecycle(plugin, root)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        code, stderr = plugin.terminate()
    assert code == 0, stderr
    samples = _samples(text)

    requests = "csi_luks_grpc_requests_total"
    assert _value(samples, requests, method=CREATE, code="OK") == 1
    assert _value(samples, requests, method=CREATE, code="INVALID_ARGUMENT") == 1
    assert _value(samples, requests, method=DELETE, code="OK") == 1
    assert _value(samples, requests, method="/csi.v1.Identity/Probe", code="OK") == 1
    latency = "csi_luks_grpc_request_duration_seconds"
    assert _value(samples, f"{latency}_count", method=CREATE, code="OK") == 1
    assert _value(samples, f"{latency}_sum", method=CREATE, code="OK") > 0
    assert _value(samples, f"{latency}_bucket", method=CREATE, code="OK", le="+Inf") == 1
    assert _value(samples, f"{latency}_count", method=CREATE, code="INVALID_ARGUMENT") == 1

    # The controller wraps and stores the new volume's DEK, and removes it (and any pending one) at delete.
    kms = "csi_luks_kms_duration_seconds_count"
    assert _value(samples, kms, kms_type="local", operation="wrap") == 1
    assert _value(samples, kms, kms_type="local", operation="store") == 1
    assert _value(samples, kms, kms_type="local", operation="remove") >= 1
    assert not [key for key in samples if key[0] == "csi_luks_kms_failures_total"]
    # Readiness runs the real `cryptsetup --version`, at start and for each Probe.
    assert _value(samples, "csi_luks_cryptsetup_duration_seconds_count", operation="version") >= 2
    assert _value(samples, "csi_luks_ready") == 1
    assert _value(samples, "csi_luks_rbd_flattens_running") == 0  # exposed, on any backend
    assert _value(samples, "csi_luks_volumes_staged") == 0

    for secret in (REQUEST_SECRET, done.dek, done.wrapped_dek):
        assert secret not in text
        assert secret not in stderr
    assert done.volume_id not in text  # ids are not labels either: a series per volume would not scale


def test_json_logs_one_line_per_call_with_its_fields_and_no_secret(root: Path) -> None:
    with serve(root / "csi.sock", "--mode", "controller", "--log-format", "json") as plugin:
        done = _lifecycle(plugin, root)
        code, stderr = plugin.terminate()
    assert code == 0, stderr
    lines: list[dict[str, Any]] = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    calls = [line for line in lines if "method" in line]
    by_method = {(line["method"], line["code"]): line for line in calls}
    create = by_method[(CREATE, "OK")]
    assert create["volume_id"] == done.volume_id and create["level"] == "info"
    assert isinstance(create["duration_ms"], float) and create["duration_ms"] > 0
    refused = by_method[(CREATE, "INVALID_ARGUMENT")]
    assert "volume_id" not in refused and refused["level"] == "warning"
    assert by_method[(DELETE, "OK")]["volume_id"] == done.volume_id
    request_ids = [line["request_id"] for line in calls]
    assert len(set(request_ids)) == len(request_ids)  # one id per call
    # A line logged inside a call carries the call's id: the controller's own line of the deletion.
    deleted = next(line for line in lines if line["message"] == f"volume {done.volume_id} deleted")
    assert deleted["logger"] == "csi_luks.services.controller"
    assert deleted["request_id"] == by_method[(DELETE, "OK")]["request_id"]
    assert not any("request_id" in line for line in lines if line["message"].startswith("csi-luks "))
    for secret in (REQUEST_SECRET, done.dek, done.wrapped_dek):
        assert secret not in stderr


def test_json_debug_logs_show_requests_with_secrets_stripped(root: Path) -> None:
    with serve(
        root / "csi.sock", "--mode", "controller", "--log-format", "json", env={"CSI_LUKS_LOG_LEVEL": "debug"}
    ) as plugin:
        done = _lifecycle(plugin, root)
        code, stderr = plugin.terminate()
    assert code == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]
    requests = [line for line in lines if line["level"] == "debug" and f"{CREATE} request" in line["message"]]
    assert requests and "***stripped***" in requests[0]["message"]
    assert 'name: "pvc-observed"' in requests[0]["message"]
    for secret in (REQUEST_SECRET, done.dek, done.wrapped_dek):
        assert secret not in stderr


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "[::1:9000", "::1:9000"]
)
def test_a_bad_metrics_address_stops_start_up(root: Path, address: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", str(root / "csi.sock"),
         "--state-dir", str(root / "state"), "--metrics-address", address],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "must be HOST:PORT" in result.stderr


def test_a_metrics_port_in_use_stops_start_up_and_leaves_no_socket(root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", str(root / "csi.sock"),
             "--state-dir", str(root / "state"), "--mode", "controller",
             "--metrics-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert not (root / "csi.sock").exists()
