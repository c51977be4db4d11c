"""A real Kubernetes API server and its etcd on free loopback ports, for tests that use the Kubernetes API.

Tests read Secrets and ConfigMaps, mint ServiceAccount tokens (TokenRequest), verify them (TokenReview), and
point OpenBao's Kubernetes auth at this server. There is no controller manager, scheduler or kubelet: nothing
creates a namespace's `default` ServiceAccount, so tests create what they use.

kube-apiserver is built from Debian's source package by scripts/build-kube-apiserver.sh (cached outside
the checkout); etcd comes from Debian's etcd-server.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kube-apiserver.sh"
BINARY_ENV = "CSI_LUKS_KUBE_APISERVER"  # a kube-apiserver to use instead of the cached build
ISSUER = "https://kubernetes.default.svc"  # what a real cluster uses, so OpenBao's config looks familiar
API_AUDIENCE = ISSUER  # the audience of tokens that ask for none
ADMIN_USER = "csi-luks-admin"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class KubeCluster:
    """How to reach the test cluster; the processes belong to `kube_cluster`, which stops them."""

    url: str  # https://127.0.0.1:<port>
    ca_file: Path  # the CA that signed the serving certificate (and that client certificates must chain to)
    admin_token: str  # a static token in group system:masters: may do anything, bypassing RBAC
    issuer: str  # the `iss` of ServiceAccount tokens
    api_audience: str  # the default audience of ServiceAccount tokens
    sa_signing_key_file: Path  # RSA private key (PEM) that signs ServiceAccount tokens
    sa_public_key_file: Path  # its public key (PEM), for verifiers that check tokens offline
    etcd_url: str
    workdir: Path  # certificates, keys, data and the logs of both processes

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text()

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """A client for this cluster that authenticates with `token` (the admin token by default)."""
        config = kubernetes.client.Configuration(
            host=self.url,
            api_key={"authorization": token if token is not None else self.admin_token},
            api_key_prefix={"authorization": "Bearer"},
        )
        config.ssl_ca_cert = str(self.ca_file)
        config.verify_ssl = True
        return kubernetes.client.ApiClient(config)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: each socket stays bound until all are found, so none repeats."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _run_build_script() -> Path:
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed (exit {result.returncode}):\n{result.stderr[-5000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def kube_apiserver_binary() -> Path:
    """$CSI_LUKS_KUBE_APISERVER, else the cached build, else a fresh build (about 5 minutes, once)."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"${BINARY_ENV}={override} is not an executable file")
        return path
    # The script owns the cache layout (its path is keyed by the Debian source version it pins).
    printed = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, check=True
    )
    cached = Path(printed.stdout.strip().splitlines()[-1])
    if os.access(cached, os.X_OK):
        return cached
    return _run_build_script()


def etcd_binary() -> Path:
    found = shutil.which("etcd") or shutil.which("etcd", path="/usr/bin:/usr/sbin")
    if found is None:
        _run_build_script()  # it installs etcd-server too
        found = shutil.which("etcd", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if found is None:
        raise RuntimeError(
            "etcd is missing even after scripts/build-kube-apiserver.sh: apt-get install etcd-server"
        )
    return Path(found)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name | None,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock differences
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class _Pki:
    ca_file: Path
    serving_cert_file: Path
    serving_key_file: Path
    sa_signing_key_file: Path
    sa_public_key_file: Path
    token_file: Path


def _make_pki(workdir: Path, admin_token: str) -> _Pki:
    """A CA, a serving certificate for 127.0.0.1, the ServiceAccount signing key and the static token file."""
    pki = workdir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = _certificate("csi-luks-test-ca", ca_key, None, ca_key, ca=True)
    serving_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    san: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),  # the `kubernetes` Service's ClusterIP
        *(
            x509.DNSName(n)
            for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
        ),
    ]
    serving_cert = _certificate("kube-apiserver", serving_key, ca_cert.subject, ca_key, ca=False, san=san)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    out = _Pki(
        ca_file=pki / "ca.crt",
        serving_cert_file=pki / "apiserver.crt",
        serving_key_file=pki / "apiserver.key",
        sa_signing_key_file=pki / "sa.key",
        sa_public_key_file=pki / "sa.pub",
        token_file=pki / "tokens.csv",
    )
    out.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.serving_cert_file.write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out.serving_key_file, serving_key)
    _write_key(out.sa_signing_key_file, sa_key)
    out.sa_public_key_file.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # Static token file: token,user,uid,"groups". system:masters may do anything, whatever RBAC says.
    out.token_file.write_text(f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    out.token_file.chmod(0o600)
    return out


def _log_tails(*logs: Path, chars: int = 4000) -> str:
    parts = []
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        parts.append(f"--- {log.name} (last {chars} chars) ---\n{text[-chars:]}")
    return "\n".join(parts)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _wait_for_etcd(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).json().get("health") == "true":
                return
        except (requests.RequestException, ValueError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"etcd did not become healthy at {url}:\n{_log_tails(log)}")
        time.sleep(0.1)


def _wait_for_apiserver(
    cluster: KubeCluster, process: subprocess.Popen[bytes], logs: list[Path], timeout: float
) -> None:
    """Poll /readyz: 200 once etcd answers and the post-start hooks (bootstrap RBAC roles) are done."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            response = requests.get(
                f"{cluster.url}/readyz?verbose",
                headers={"Authorization": f"Bearer {cluster.admin_token}"},
                verify=str(cluster.ca_file),
                timeout=5,
            )
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[-2000:]}"  # 500 while hooks still run
        except requests.RequestException as e:
            last = repr(e)
        if process.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited with {process.returncode}:\n{_log_tails(*logs)}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"kube-apiserver not ready after {timeout:.0f} s; last /readyz: {last}\n" + _log_tails(*logs)
            )
        time.sleep(0.2)


@contextmanager
def kube_cluster(workdir: Path, ready_timeout: float = READY_TIMEOUT) -> Iterator[KubeCluster]:
    """Start etcd and kube-apiserver on free loopback ports, wait until ready, and stop both afterwards.

    ready_timeout: seconds kube-apiserver gets to become ready (minutes under TCG).
    """
    apiserver = kube_apiserver_binary()
    etcd = etcd_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    admin_token = secrets.token_urlsafe(32)
    pki = _make_pki(workdir, admin_token)
    etcd_client_port, etcd_peer_port, api_port = free_ports(3)
    etcd_url = f"http://127.0.0.1:{etcd_client_port}"
    peer_url = f"http://127.0.0.1:{etcd_peer_port}"
    cluster = KubeCluster(
        url=f"https://127.0.0.1:{api_port}",
        ca_file=pki.ca_file,
        admin_token=admin_token,
        issuer=ISSUER,
        api_audience=API_AUDIENCE,
        sa_signing_key_file=pki.sa_signing_key_file,
        sa_public_key_file=pki.sa_public_key_file,
        etcd_url=etcd_url,
        workdir=workdir,
    )
    etcd_log = workdir / "etcd.log"
    apiserver_log = workdir / "kube-apiserver.log"
    with ExitStack() as stack:
        with etcd_log.open("wb") as out:
            etcd_process = subprocess.Popen(
                [str(etcd), "--name=csi-luks-test", f"--data-dir={workdir / 'etcd'}", "--logger=zap",
                 f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                 f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                 f"--initial-cluster=csi-luks-test={peer_url}", "--initial-cluster-state=new"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        stack.callback(_stop, etcd_process)  # stopped last: the API server goes first
        _wait_for_etcd(etcd_url, etcd_process, etcd_log)

        with apiserver_log.open("wb") as out:
            apiserver_process = subprocess.Popen(
                [str(apiserver),
                 f"--etcd-servers={etcd_url}",
                 "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--insecure-port=0",
                 # Where no default route exists (the VM) it cannot find an address of its own.
                 "--advertise-address=127.0.0.1",
                 f"--tls-cert-file={pki.serving_cert_file}", f"--tls-private-key-file={pki.serving_key_file}",
                 f"--client-ca-file={pki.ca_file}",
                 f"--token-auth-file={pki.token_file}",
                 "--authorization-mode=Node,RBAC",
                 f"--service-account-issuer={ISSUER}",
                 f"--service-account-key-file={pki.sa_public_key_file}",
                 f"--service-account-signing-key-file={pki.sa_signing_key_file}",
                 f"--api-audiences={API_AUDIENCE}",
                 "--service-cluster-ip-range=10.0.0.0/24",
                 # Nothing else runs on 127.0.0.1 to reconcile the `kubernetes` Service's endpoints.
                 "--endpoint-reconciler-type=none",
                 # As kubeadm and managed clusters run it: CSI node plugins are privileged pods.
                 "--allow-privileged=true",
                 f"--cert-dir={workdir / 'apiserver-certs'}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        stack.callback(_stop, apiserver_process)
        _wait_for_apiserver(cluster, apiserver_process, [apiserver_log, etcd_log], ready_timeout)
        yield cluster


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def forged_token(kube: KubeCluster, namespace: str, name: str) -> str:
    """A well-formed ServiceAccount JWT with the right claims, signed by a key the cluster does not trust."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT"}
    claims = {
        "iss": kube.issuer,
        "aud": [kube.api_audience],
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": str(uuid.uuid4())}},
    }
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signature = other_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"
