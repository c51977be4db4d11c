"""moto's server mode on a free loopback port: an EMULATOR of AWS KMS, STS and IAM (no real AWS runs
offline), which botocore signs requests for exactly as it does for AWS.

IAM authorization is on (after the first three setup calls, which create the admin), so a request
with unknown credentials, or credentials whose policy does not allow the action on the key, is
refused as AWS would refuse it. One patch, applied in the server process only: moto asks a signature
of STS AssumeRoleWithWebIdentity too (and fails on its absence with a 500), while AWS takes it unsigned,
as the aws-sts-metadata type sends it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.openbao import free_port, listening, stop

REGION = "us-east-1"
START_TIMEOUT = 120.0
_SETUP_CALLS = 3  # create_user, put_user_policy, create_access_key of the admin: unauthenticated
_RUNNER = """
import sys
from moto.core.authorization import ActionAuthenticatorMixin

_check = ActionAuthenticatorMixin._authenticate_and_authorize_action

def _check_unless_public(self, *args, **kwargs):
    if self._get_action() == "AssumeRoleWithWebIdentity":  # unsigned at AWS as well
        return None
    return _check(self, *args, **kwargs)

ActionAuthenticatorMixin._authenticate_and_authorize_action = _check_unless_public
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def _allow(actions: list[str], resources: list[str]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": actions, "Resource": resources}]})  # fmt: skip


@dataclass
class AWSEmulator:
    url: str
    process: subprocess.Popen[bytes]
    cmks: dict[str, str] = field(default_factory=dict)  # name -> key ARN
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (access key id, secret)
    roles: dict[str, str] = field(default_factory=dict)  # name -> role ARN

    def client(self, service: str, user: str = "admin") -> Any:
        import boto3  # here: conftest loads this module in every session, the VM guest's too

        key_id, secret = self.users[user]
        session = boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=REGION
        )
        return session.client(service, endpoint_url=self.url)

    def metadata_secret(self, user: str = "csi-luks", cmk: str = "csi-cmk") -> dict[str, str]:
        """What Ceph-CSI's aws-metadata Secret holds."""
        key_id, secret = self.users[user]
        return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_CMK_ARN": self.cmks[cmk]}

    def tenant_secret(self, role: str = "tenant", cmk: str = "csi-cmk") -> dict[str, str]:
        """What Ceph-CSI's aws-sts-metadata tenant Secret holds."""
        return {"awsRoleARN": self.roles[role], "awsCMKARN": self.cmks[cmk], "awsRegion": REGION}


def _setup(emulator: AWSEmulator) -> None:
    import boto3

    root = boto3.session.Session(
        aws_access_key_id="AKIASETUP", aws_secret_access_key="setup", region_name=REGION
    )
    iam = root.client("iam", endpoint_url=emulator.url)
    iam.create_user(UserName="admin")
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=_allow(["*"], ["*"]))
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    emulator.users["admin"] = (key["AccessKeyId"], key["SecretAccessKey"])
    kms, iam = emulator.client("kms"), emulator.client("iam")
    for name in ("csi-cmk", "other-cmk"):
        emulator.cmks[name] = kms.create_key(Description=name)["KeyMetadata"]["Arn"]
    wrap = ["kms:Encrypt", "kms:Decrypt"]
    every_cmk = ["*"]  # moto checks KMS actions against resource "*" only: no per-key policies
    for user, policy in (("csi-luks", _allow(wrap, every_cmk)), ("nobody", None)):
        iam.create_user(UserName=user)
        if policy is not None:
            iam.put_user_policy(UserName=user, PolicyName="wrap", PolicyDocument=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        emulator.users[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {
        "Federated": "kubernetes"}, "Action": "sts:AssumeRoleWithWebIdentity"}]})  # fmt: skip
    for role, policy in (("tenant", _allow(wrap, every_cmk)), ("stranger", None)):
        emulator.roles[role] = iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        if policy is not None:
            iam.put_role_policy(RoleName=role, PolicyName="wrap", PolicyDocument=policy)


@contextmanager
def moto_server(workdir: Path) -> Iterator[AWSEmulator]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_CALLS)}
    with (workdir / "moto.log").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _RUNNER, str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
    emulator = AWSEmulator(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start:\n{(workdir / 'moto.log').read_text()[-3000:]}")
            time.sleep(0.1)
        _setup(emulator)
        yield emulator
    finally:
        stop(process)
