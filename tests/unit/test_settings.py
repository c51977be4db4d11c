from __future__ import annotations

import pytest

from csi_luks.settings import Mode, Settings, socket_path


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("unix:///csi/csi.sock", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "/csi/csi.sock"),
        ("/var/lib/kubelet/plugins/x/csi.sock", "/var/lib/kubelet/plugins/x/csi.sock"),
    ],
)
def test_socket_path_accepts_unix_urls_and_bare_paths(endpoint: str, path: str) -> None:
    assert socket_path(endpoint) == path


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:10000", "unix://", ""])
def test_socket_path_rejects_other_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError):
        socket_path(endpoint)


@pytest.mark.parametrize("name", ["luks.csi.example.com", "a1", "x" * 63, "Csi-Luks.io"])
def test_valid_driver_names(name: str) -> None:
    assert Settings(endpoint="/tmp/s", driver_name=name).driver_name == name


@pytest.mark.parametrize("name", ["", "-luks.io", "luks.io-", "x" * 64, "luks_csi.io", "luks.io."])
def test_invalid_driver_names(name: str) -> None:
    with pytest.raises(ValueError, match="driver name"):
        Settings(endpoint="/tmp/s", driver_name=name)


def test_node_id_defaults_to_host_name() -> None:
    assert Settings(endpoint="/tmp/s").node_id


def test_modes() -> None:
    assert Mode.ALL.runs_controller and Mode.ALL.runs_node
    assert not Mode.NODE.runs_controller and not Mode.CONTROLLER.runs_node


@pytest.mark.parametrize(("workers", "copies"), [(16, 0), (16, 16), (4, 5)])
def test_copies_leave_workers_for_other_calls(workers: int, copies: int) -> None:
    with pytest.raises(ValueError, match="max copies"):
        Settings(endpoint="/tmp/csi.sock", workers=workers, max_copies=copies)


def test_key_derivations_get_at_least_one_slot_and_four_by_default() -> None:
    assert Settings(endpoint="/tmp/csi.sock").max_kdfs == 4
    with pytest.raises(ValueError, match="key derivations"):
        Settings(endpoint="/tmp/csi.sock", max_kdfs=0)


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [("127.0.0.1:9808", ("127.0.0.1", 9808)), ("[::1]:9808", ("::1", 9808)), (":9808", ("0.0.0.0", 9808))],  # noqa: S104
)
def test_metrics_address(address: str, endpoint: tuple[str, int]) -> None:
    assert Settings(endpoint="/tmp/csi.sock", metrics_address=address).metrics_endpoint == endpoint


@pytest.mark.parametrize("address", ["", "9808", "host:", "host:0", "host:65536", "::1:9808", "[::1]9808"])
def test_bad_metrics_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        Settings(endpoint="/tmp/csi.sock", metrics_address=address)


def test_the_ceph_csi_instance_id_names_a_journal_object_so_it_is_a_plain_name() -> None:
    assert Settings(endpoint="/tmp/s").ceph_csi_instance_id == "default"
    assert Settings(endpoint="/tmp/s", ceph_csi_instance_id="rook-ceph").ceph_csi_instance_id == "rook-ceph"
    for bad in ("", "../x", "a b"):
        with pytest.raises(ValueError, match="Ceph-CSI instance id"):
            Settings(endpoint="/tmp/s", ceph_csi_instance_id=bad)
