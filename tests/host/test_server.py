"""`csi-luks serve` as a real process, spoken to over its unix socket by a gRPC client."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from csi_luks import __version__
from csi_luks.csi import csi_pb2
from csi_luks.csiaddons import identity_pb2 as addons_identity
from csi_luks.csiaddons import identity_pb2_grpc as addons_identity_grpc
from csi_luks.system.kernel import device_mapper_missing_reason
from tests.support.served_plugin import serve


def test_serve_answers_identity_calls_and_stops_cleanly(tmp_path: Path) -> None:
    sock = tmp_path / "csi.sock"
    with serve(f"unix://{sock}", "--driver-name", "luks.csi.example.com", "--mode", "controller") as plugin:
        info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        assert info.name == "luks.csi.example.com" and info.vendor_version == __version__
        caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
        services = [c.service.type for c in caps.capabilities if c.HasField("service")]
        assert services == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
        expansion = [c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")]
        assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]
        probe = plugin.identity.Probe(csi_pb2.ProbeRequest())
        assert probe.HasField("ready") and probe.ready.value is True
        health_stub = health_pb2_grpc.HealthStub(plugin.channel)
        for service in ("", "csi.v1.Identity", "csi.v1.Controller"):
            health = health_stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        code, stderr = plugin.terminate()
    assert code == 0, stderr
    assert "received SIGTERM" in stderr and "stopped" in stderr
    assert not sock.exists()


@pytest.mark.parametrize(
    ("mode", "services", "rotation", "reclaim"),
    [
        ("controller", ["CONTROLLER_SERVICE"], False, "OFFLINE"),
        ("node", ["NODE_SERVICE"], True, "ONLINE"),
    ],
)
def test_csi_addons_identity_offers_key_rotation_where_the_node_service_runs(
    tmp_path: Path, mode: str, services: list[str], rotation: bool, reclaim: str
) -> None:
    """The csi-addons sidecar reads GetCapabilities before it calls EncryptionKeyRotate or ReclaimSpace:
    ControllerReclaimSpace (OFFLINE) where the controller runs, NodeReclaimSpace (ONLINE) on the node."""
    with serve(tmp_path / "csi.sock", "--driver-name", "luks.csi.example.com", "--mode", mode) as plugin:
        addons = addons_identity_grpc.IdentityStub(plugin.channel)
        info = addons.GetIdentity(addons_identity.GetIdentityRequest())
        assert (info.name, info.vendor_version) == ("luks.csi.example.com", __version__)
        capabilities = addons.GetCapabilities(addons_identity.GetCapabilitiesRequest()).capabilities
        service_type = addons_identity.Capability.Service.Type
        assert [service_type.Name(c.service.type) for c in capabilities if c.HasField("service")] == services
        rotations = [
            c.encryption_key_rotation.type for c in capabilities if c.HasField("encryption_key_rotation")
        ]
        assert rotations == (
            [addons_identity.Capability.EncryptionKeyRotation.ENCRYPTIONKEYROTATION] if rotation else []
        )
        reclaim_type = addons_identity.Capability.ReclaimSpace.Type
        reclaims = [
            reclaim_type.Name(c.reclaim_space.type) for c in capabilities if c.HasField("reclaim_space")
        ]
        assert reclaims == [reclaim]
        served = {
            "OFFLINE": "reclaimspace.ReclaimSpaceController", "ONLINE": "reclaimspace.ReclaimSpaceNode"
        }[reclaim]  # fmt: skip
        reclaim_health = health_pb2_grpc.HealthStub(plugin.channel).Check(
            health_pb2.HealthCheckRequest(service=served)
        )
        assert reclaim_health.status == health_pb2.HealthCheckResponse.SERVING
        probe = addons.Probe(addons_identity.ProbeRequest())
        assert probe.HasField("ready")
        health = health_pb2_grpc.HealthStub(plugin.channel).Check(
            health_pb2.HealthCheckRequest(service="identity.Identity")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_lets_an_in_flight_call_finish(tmp_path: Path) -> None:
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    slow = tmp_path / "slow"
    (fakebin / "cryptsetup").write_text(f'#!/bin/sh\n[ -e "{slow}" ] && sleep 2\necho "cryptsetup 2.6.1"\n')
    (fakebin / "cryptsetup").chmod(0o755)
    env = {"PATH": f"{fakebin}:{os.environ['PATH']}"}
    with serve(tmp_path / "csi.sock", "--mode", "controller", env=env) as plugin:
        slow.touch()
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            pending = pool.submit(plugin.identity.Probe, csi_pb2.ProbeRequest(), timeout=20)
            time.sleep(0.7)  # the call is now inside the fake cryptsetup's sleep
            plugin.proc.send_signal(signal.SIGTERM)
            response = pending.result()
            elapsed = time.monotonic() - started
        _, stderr = plugin.proc.communicate(timeout=20)
    assert response.ready.value is True
    assert elapsed >= 2
    assert plugin.proc.returncode == 0, stderr
    assert "Probe -> OK" in stderr


def test_probe_is_not_ready_without_cryptsetup(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with serve(tmp_path / "csi.sock", "--mode", "controller", env={"PATH": str(empty)}) as plugin:
        assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
        _, stderr = plugin.terminate()
    assert "not ready: cryptsetup is not usable" in stderr


def test_node_probe_reflects_device_mapper(tmp_path: Path) -> None:
    expected = device_mapper_missing_reason() is None
    with serve(tmp_path / "csi.sock", "--mode", "node") as plugin:
        assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is expected
        _, stderr = plugin.terminate()
    if not expected:
        assert "device-mapper" in stderr


def test_stale_socket_is_replaced_and_bare_path_accepted(tmp_path: Path) -> None:
    sock = tmp_path / "csi.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()  # the file stays, nobody listens: what a crashed plugin leaves behind
    with serve(sock, "--mode", "controller") as plugin:
        assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
        _, stderr = plugin.terminate()
    assert "removed stale socket" in stderr


def test_a_live_socket_is_not_stolen(tmp_path: Path) -> None:
    sock = tmp_path / "csi.sock"
    with serve(sock, "--mode", "controller") as first:
        second = subprocess.run(
            [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", str(sock),
             "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 2 and "another process is serving" in second.stderr
        assert first.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
        first.terminate()


def test_a_regular_file_at_the_socket_path_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("precious")
    result = subprocess.run(
        [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", str(path),
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert path.read_text() == "precious"


def test_socket_group_opens_the_socket_to_that_group(tmp_path: Path) -> None:
    sock = tmp_path / "csi.sock"
    gid = os.getgid()
    with serve(sock, "--mode", "controller", "--socket-group", str(gid)) as plugin:
        info = sock.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == gid
        plugin.terminate()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--driver-name", "bad_name"], "driver name"),
        (["--endpoint", "tcp://127.0.0.1:1"], "only unix sockets"),
    ],
)
def test_bad_settings_exit_with_a_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", "/tmp/never.sock", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr


def test_version_command() -> None:
    result = subprocess.run([sys.executable, "-m", "csi_luks.cli", "version"], capture_output=True, text=True)
    assert result.stdout.strip() == __version__


def test_a_broken_kms_configuration_stops_start_up_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "kms.json"
    config.write_text('{"vault-1": {"vaultAddress": "https://vault:8200"}}')
    result = subprocess.run(
        [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", str(tmp_path / "csi.sock"),
         "--state-dir", str(tmp_path), "--kms-config", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "'vault-1'" in result.stderr and "encryptionKMSType" in result.stderr
    assert "Traceback" not in result.stderr
