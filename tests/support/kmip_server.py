"""A real KMIP server (PyKMIP's, with its SQLite store) on a free loopback port, for the kmip KMS tests.

It gets a CA of its own, a server certificate for 127.0.0.1 and `kmip.test`, and client certificates:
`csi-luks` (the plugin's identity, which creates and activates the wrapping keys, so it owns them),
`someone-else` (same CA, owns nothing) and one from a foreign CA (which the server's TLS refuses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.openbao import free_port, listening
from tests.support.tls import CA

START_TIMEOUT = 120.0
SERVER_NAME = "kmip.test"
PLUGIN_IDENTITY = "csi-luks"
KEYS = ("csi-kek", "other-kek")  # AES-256 keys the plugin's identity creates and activates


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    def pem(self) -> tuple[str, str]:
        return self.cert.read_text(), self.key.read_text()


@dataclass
class KMIPServer:
    port: int
    ca_pem: str
    identities: dict[str, Identity]  # PLUGIN_IDENTITY, "someone-else", "foreign"
    process: subprocess.Popen[bytes]
    log: Path
    keys: dict[str, str] = field(default_factory=dict)  # name -> the key's unique identifier

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def secret_data(self, key: str = "csi-kek", identity: str = PLUGIN_IDENTITY) -> dict[str, str]:
        """What Ceph-CSI's kmip Secret holds: CA, client certificate and key, the key's id."""
        cert, private_key = self.identities[identity].pem()
        return {"CA_CERT": self.ca_pem, "CLIENT_CERT": cert, "CLIENT_KEY": private_key,
                "UNIQUE_IDENTIFIER": self.keys[key]}  # fmt: skip

    def client(self, identity: str = PLUGIN_IDENTITY) -> Any:
        """PyKMIP's client as `identity` (certificate files: this is the test side), not yet opened."""
        # Imported here: conftest loads this module in every session, the VM guest's too, and PyKMIP
        # (with SQLAlchemy) costs a second to import.
        from kmip.core import enums
        from kmip.pie.client import ProxyKmipClient

        found = self.identities[identity]
        ca = self.log.parent / "ca.pem"
        return ProxyKmipClient(
            hostname="127.0.0.1", port=self.port, cert=str(found.cert), key=str(found.key), ca=str(ca),
            config_file=os.devnull, kmip_version=enums.KMIPVersion.KMIP_1_4,
        )  # fmt: skip

    def create_key(self, name: str, identity: str = PLUGIN_IDENTITY) -> str:
        """An AES-256 key, created and activated by `identity` (so owned by it): its unique identifier."""
        from kmip.core import enums

        client = self.client(identity)
        client.open()
        try:
            uid: str = client.create(enums.CryptographicAlgorithm.AES, 256, name=name)
            client.activate(uid)
        finally:
            client.close()
        return uid


@contextmanager
def kmip_server(workdir: Path) -> Iterator[KMIPServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    ca = CA.create("csi-luks test KMIP CA")
    ca.write(workdir / "ca.pem")
    server_cert, server_key = ca.issue(workdir, "server", [SERVER_NAME], ["127.0.0.1"])
    identities = {
        name: Identity(*ca.issue(workdir, name, [name], [], client=True))
        for name in (PLUGIN_IDENTITY, "someone-else")
    }
    identities["foreign"] = Identity(
        *CA.create("some other CA").issue(workdir, "foreign", [PLUGIN_IDENTITY], [], client=True)
    )
    port = free_port()
    config = workdir / "server.conf"
    config.write_text(
        "[server]\n"
        f"hostname=127.0.0.1\nport={port}\n"
        f"certificate_path={server_cert}\nkey_path={server_key}\nca_path={workdir / 'ca.pem'}\n"
        "auth_suite=TLS1.2\nenable_tls_client_auth=True\nlogging_level=INFO\n"
        f"database_path={workdir / 'kmip.sqlite'}\n"
    )
    log = workdir / "server.log"
    with (workdir / "server.out").open("wb") as out:
        # A session of its own: the server forks helpers (PyKMIP's policy monitor), killed with it.
        process = subprocess.Popen(
            [sys.executable, "-m", "kmip.services.server.server", "-f", str(config), "-l", str(log)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = KMIPServer(port, ca.pem, identities, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                output = (workdir / "server.out").read_text()[-3000:]
                raise RuntimeError(f"the PyKMIP server did not start:\n{output}")
            time.sleep(0.1)
        server.keys = {name: server.create_key(name) for name in KEYS}
        yield server
    finally:
        # Not stop(): PyKMIP's SIGTERM handler waits out its 10-second accept timeout, and nothing the
        # server keeps is needed afterwards. The whole group: its forked helpers outlive a killed parent.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
