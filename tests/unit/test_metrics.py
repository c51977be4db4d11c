"""The metrics' observers, fed by the real interceptor, cryptsetup engine and VolumeEncryption, with fakes
for what the host lacks (device-mapper for NodeStageVolume, a KMS that fails)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.encryption import VolumeEncryption
from csi_luks.kms.base import DEKStore, EncryptionKMS, KMSUnavailable
from csi_luks.luks import Cryptsetup, WrongPassphrase
from csi_luks.metrics import STAGE, UNSTAGE, PluginMetrics, is_volume_mapping, staged_at_start
from csi_luks.readiness import ReadinessCheck
from csi_luks.server import _CallInterceptor
from csi_luks.volumes.base import VolumeNotFound
from csi_luks.volumes.standalone import StandaloneBackend
from tests.unit.test_luks_engine import INACTIVE, FakeRunner

VOLUME = "sa-0b7e3d7c-1f7a-5f1e-9c1a-2f5d0f6a7b8c"
OTHER = "sa-5e1c6a43-9d7b-5a50-8f57-93b7d7e0c2aa"


def _metrics(staged: tuple[str, ...] = ()) -> PluginMetrics:
    readiness = ReadinessCheck(Cryptsetup(runner=FakeRunner([])), needs_device_mapper=False)  # type: ignore[arg-type]
    return PluginMetrics(readiness, staged)


def _value(metrics: PluginMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _labels(metrics: PluginMetrics, sample_name: str) -> list[dict[str, str]]:
    """The label sets of every sample of that name."""
    return [
        sample.labels
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == sample_name
    ]


class _Aborted(Exception):
    pass


class _Context:
    def abort(self, code: grpc.StatusCode, message: str) -> NoReturn:
        raise _Aborted(code, message)


@dataclass
class _Details:
    method: str


def _call(metrics: PluginMetrics, method: str, request: Any, outcome: Any) -> grpc.StatusCode:
    """Run one call through the server's interceptor to a servicer that returns or raises outcome."""

    def servicer(_request: Any, _context: Any) -> Any:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    handler = grpc.unary_unary_rpc_method_handler(servicer)
    wrapped = _CallInterceptor(metrics).intercept_service(lambda _: handler, _Details(method))
    try:
        wrapped.unary_unary(request, _Context())
    except _Aborted as aborted:
        code: grpc.StatusCode = aborted.args[0]
        return code
    return grpc.StatusCode.OK


def test_staged_volumes_follow_successful_stage_and_unstage_calls() -> None:
    metrics = _metrics(staged=(OTHER,))
    assert _value(metrics, "csi_luks_volumes_staged") == 1
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=VOLUME, staging_target_path="/s", secrets={"k": "v"})
    _call(metrics, STAGE, stage, csi_pb2.NodeStageVolumeResponse())
    _call(metrics, STAGE, stage, csi_pb2.NodeStageVolumeResponse())  # idempotent: still one volume
    assert _value(metrics, "csi_luks_volumes_staged") == 2
    failed = csi_pb2.NodeStageVolumeRequest(volume_id="sa-gone", staging_target_path="/s")
    assert _call(metrics, STAGE, failed, VolumeNotFound("sa-gone")) == grpc.StatusCode.NOT_FOUND
    assert _value(metrics, "csi_luks_volumes_staged") == 2
    _call(
        metrics,
        UNSTAGE,
        csi_pb2.NodeUnstageVolumeRequest(volume_id=VOLUME),
        csi_pb2.NodeUnstageVolumeResponse(),
    )
    assert _value(metrics, "csi_luks_volumes_staged") == 1
    assert _value(metrics, "csi_luks_grpc_requests_total", method=STAGE, code="OK") == 2
    assert _value(metrics, "csi_luks_grpc_requests_total", method=STAGE, code="NOT_FOUND") == 1
    assert _value(metrics, "csi_luks_grpc_request_duration_seconds_count", method=UNSTAGE, code="OK") == 1


def test_an_unforeseen_exception_counts_as_internal() -> None:
    metrics = _metrics()
    method = "/csi.v1.Node/NodeGetVolumeStats"
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOLUME)
    assert _call(metrics, method, request, RuntimeError("bug")) == grpc.StatusCode.INTERNAL
    assert _value(metrics, "csi_luks_grpc_requests_total", method=method, code="INTERNAL") == 1


def test_staged_at_start_counts_only_mappings_of_this_backends_volumes(tmp_path: Path) -> None:
    mapper = tmp_path / "mapper"
    mapper.mkdir()
    host_disk = "luks-6f1c3a2e-2b4d-4c1e-9a7b-1d2e3f4a5b6c"  # what systemd-cryptsetup names a host disk
    for name in ("control", host_disk, f"luks-{VOLUME}", f"luks-{OTHER}", f"other-{VOLUME}"):
        (mapper / name).touch()
    backend = StandaloneBackend(tmp_path / "state")
    assert staged_at_start(backend, str(mapper)) == sorted([VOLUME, OTHER])
    assert staged_at_start(backend, str(tmp_path / "absent")) == []


def test_stale_mappings_are_counted_at_each_scrape_and_only_a_node_has_the_gauge(tmp_path: Path) -> None:
    readiness = ReadinessCheck(Cryptsetup(runner=FakeRunner([])), needs_device_mapper=False)  # type: ignore[arg-type]
    counts = iter([2.0, 0.0])
    node = PluginMetrics(readiness, stale_mappings=lambda: int(next(counts)))
    assert _value(node, "csi_luks_stale_mappings") == 2
    assert _value(node, "csi_luks_stale_mappings") == 0
    assert _value(_metrics(), "csi_luks_stale_mappings") is None  # a controller has no mappings
    backend = StandaloneBackend(tmp_path / "state")
    assert is_volume_mapping(backend, f"luks-{VOLUME}")
    assert not is_volume_mapping(backend, "luks-6f1c3a2e-2b4d-4c1e-9a7b-1d2e3f4a5b6c")
    assert not is_volume_mapping(backend, f"other-{VOLUME}")


def test_cryptsetup_calls_are_timed_and_failures_counted_by_operation_and_error() -> None:
    metrics = _metrics()
    runner = FakeRunner([(4, INACTIVE, ""), (0, "", ""), (4, INACTIVE, ""), (2, "", "No key available")])
    cryptsetup = Cryptsetup(runner=runner, observer=metrics.cryptsetup_call, sys_block=None)  # type: ignore[arg-type]
    cryptsetup.open("/dev/loop0", "luks-v", "pw-right")
    with pytest.raises(WrongPassphrase):
        cryptsetup.open("/dev/loop0", "luks-v", "pw-wrong")
    assert _value(metrics, "csi_luks_cryptsetup_duration_seconds_count", operation="luksOpen") == 2
    assert _value(metrics, "csi_luks_cryptsetup_duration_seconds_count", operation="status") == 2
    assert (
        _value(metrics, "csi_luks_cryptsetup_failures_total", operation="luksOpen", error="WrongPassphrase")
        == 1
    )
    assert (
        _value(metrics, "csi_luks_cryptsetup_failures_total", operation="status", error="LuksError") is None
    )


class _FlakyKMS(EncryptionKMS, DEKStore):
    """Wraps by prefixing; unwrapping fails as a Vault that cannot be reached does."""

    def __init__(self) -> None:
        super().__init__("vault-1")
        self.deks: dict[str, str] = {}

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        return f"wrapped:{plain_dek}"

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        raise KMSUnavailable("vault is down")

    def store_dek(self, volume_id: str, dek: str) -> None:
        self.deks[volume_id] = dek

    def fetch_dek(self, volume_id: str) -> str:
        return self.deks[volume_id]

    def remove_dek(self, volume_id: str) -> None:
        self.deks.pop(volume_id, None)


def test_kms_calls_are_timed_and_failures_counted_by_kms_type() -> None:
    metrics = _metrics()
    kms = _FlakyKMS()
    encryption = VolumeEncryption(kms, kms, "vaulttokens", metrics.kms_call)
    encryption.new_passphrase(VOLUME)
    with pytest.raises(KMSUnavailable):
        encryption.get_passphrase(VOLUME)
    count = "csi_luks_kms_duration_seconds_count"
    for operation in ("wrap", "store", "fetch", "unwrap"):
        assert _value(metrics, count, kms_type="vaulttokens", operation=operation) == 1, operation
    failures = "csi_luks_kms_failures_total"
    assert _value(metrics, failures, kms_type="vaulttokens", operation="unwrap", error="KMSUnavailable") == 1
    assert (
        _value(metrics, failures, kms_type="vaulttokens", operation="fetch", error="KMSUnavailable") is None
    )


@pytest.mark.parametrize(
    ("answer", "expected"), [((0, "cryptsetup 2.7.5", ""), 1), ((127, "", "not found"), 0)]
)
def test_ready_reports_the_last_readiness_check(answer: tuple[int, str, str], expected: float) -> None:
    cryptsetup = Cryptsetup(runner=FakeRunner([answer]))  # type: ignore[arg-type]
    readiness = ReadinessCheck(cryptsetup, needs_device_mapper=False)
    metrics = PluginMetrics(readiness)
    assert _value(metrics, "csi_luks_ready") == 0  # nothing checked yet
    readiness.check()
    assert _value(metrics, "csi_luks_ready") == expected
