"""KMS types `aws-metadata` and `aws-sts-metadata`: each DEK wrapped by an AWS KMS customer master key.

Ceph-CSI's two AWS types, with its keys, so a volume's wrapped DEK (base64 of KMS Encrypt's
CiphertextBlob, kept in the volume's metadata) moves between the two plugins unchanged:

- `aws-metadata`: static credentials from a Secret. Entry: `KMS_SECRET_NAME` (default
  ceph-csi-aws-credentials), `AWS_REGION`; Secret: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_SESSION_TOKEN` (optional), `AWS_CMK_ARN`. csi-luks adds `KMS_SECRET_NAMESPACE` (default: the
  plugin's own namespace, where Ceph-CSI looks), `AWS_KMS_ENDPOINT` (a VPC or FIPS endpoint) and
  `AWS_TIMEOUT`.
- `aws-sts-metadata`: each tenant's own IAM role. Entry: `secretName` (default
  ceph-csi-aws-credentials), read in the PVC's namespace, with `awsRoleARN`, `awsCMKARN`, `awsRegion`;
  the plugin's projected ServiceAccount token (`tokenFilePath`, default /run/secrets/tokens/oidc-token)
  buys the role's credentials through STS AssumeRoleWithWebIdentity. csi-luks adds `awsKMSEndpoint`,
  `awsSTSEndpoint` and `awsTimeout`.

Each call waits at most the timeout (default 10 s) to connect and as long for an answer, once: a refused
connection, no answer, a 5xx or throttling fails as KMSUnavailable, and the CO's retry of the CSI call
is the retry (a retry here would double the wait the timeout promises). botocore's
loggers stay at WARNING: at DEBUG they print request bodies, the DEK to be wrapped included.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from csi_luks.kms.base import (
    DEKDecryptError,
    EncryptionKMS,
    KMSConfigError,
    KMSContext,
    KMSObjectNotFound,
    KMSPermissionDenied,
    KMSRequestRefused,
    KMSUnavailable,
    MissingSecret,
    register,
)
from csi_luks.kms.entry_values import seconds
from csi_luks.kms.vault_tls import plugin_namespace

for _name in ("boto3", "botocore", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.WARNING)

T = TypeVar("T")

DEFAULT_SECRET_NAME = "ceph-csi-aws-credentials"  # noqa: S105 - Ceph-CSI's default Secret name
DEFAULT_TOKEN_FILE = "/run/secrets/tokens/oidc-token"  # noqa: S105 - a path
ROLE_SESSION_NAME = "ceph-csi-aws-sts-metadata"  # what Ceph-CSI names its STS sessions
DEFAULT_TIMEOUT = 10.0

# aws-metadata: entry and Secret keys
SECRET_NAME = "KMS_SECRET_NAME"  # noqa: S105 - a configuration key
SECRET_NAMESPACE = "KMS_SECRET_NAMESPACE"  # noqa: S105 - a configuration key
REGION = "AWS_REGION"
KMS_ENDPOINT = "AWS_KMS_ENDPOINT"
TIMEOUT = "AWS_TIMEOUT"
ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 - a Secret key's name
SESSION_TOKEN = "AWS_SESSION_TOKEN"  # noqa: S105 - a Secret key's name
CMK_ARN = "AWS_CMK_ARN"

# aws-sts-metadata: entry and tenant Secret keys
STS_SECRET_NAME = "secretName"  # noqa: S105 - a configuration key
STS_TOKEN_FILE = "tokenFilePath"  # noqa: S105 - a configuration key
STS_KMS_ENDPOINT = "awsKMSEndpoint"
STS_ENDPOINT = "awsSTSEndpoint"
STS_TIMEOUT = "awsTimeout"
ROLE_ARN = "awsRoleARN"
STS_CMK_ARN = "awsCMKARN"
STS_REGION = "awsRegion"

_DENIED = frozenset({
    "AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
    "InvalidSignatureException", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
    "IncompleteSignature", "InvalidIdentityToken", "IDPRejectedClaim", "MissingAuthenticationToken",
})  # fmt: skip
_TRANSIENT = frozenset({
    "KMSInternalException", "DependencyTimeoutException", "ThrottlingException", "Throttling",
    "ServiceUnavailable", "InternalFailure", "IDPCommunicationError", "RequestTimeout",
})  # fmt: skip
_XML_ERROR = re.compile(r"<Code>(?P<code>[^<]*)</Code>\s*<Message>(?P<message>[^<]*)</Message>")
_WRONG_KEY = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})


def _endpoint(kms_id: str, entry: Mapping[str, str], key: str) -> str | None:
    value = entry.get(key) or None
    if value is not None and not value.startswith(("https://", "http://")):
        raise KMSConfigError(f"KMS {kms_id!r}, key {key!r}: must be an http(s):// URL")
    return value


def _config(timeout: float, signed: bool = True) -> Any:
    # boto3 and botocore are imported where used: a second at every plugin and CLI start otherwise.
    from botocore import UNSIGNED
    from botocore.config import Config

    return Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
        **({} if signed else {"signature_version": UNSIGNED}),
    )


def _translate(where: str, fn: Callable[[], T], *, unwrapping: bool = False) -> T:
    import botocore.exceptions

    try:
        return fn()
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        # An error body botocore could not parse (an XML one where JSON was expected): its own words.
        found = _XML_ERROR.search(message)
        if found:
            code, message = found["code"], found["message"]
        said = f"{code}: {message}".rstrip(": ")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _DENIED or status in (401, 403):
            raise KMSPermissionDenied(f"{where}: AWS refused: {said}") from None
        if unwrapping and code in _WRONG_KEY:
            raise DEKDecryptError(
                f"{where}: the DEK does not unwrap with this key ({said}): another key, or the volume's "
                "metadata was altered"
            ) from None
        if code in _TRANSIENT or status >= 500:
            raise KMSUnavailable(f"{where}: AWS KMS is unavailable: {said}") from None
        if code == "NotFoundException":
            raise KMSObjectNotFound(f"{where}: {said}") from None
        raise KMSRequestRefused(f"{where}: AWS answered {said}") from None
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
        botocore.exceptions.ConnectionClosedError,
        botocore.exceptions.HTTPClientError,
    ) as exc:
        raise KMSUnavailable(f"{where}: AWS is unavailable: no answer ({type(exc).__name__})") from None
    except botocore.exceptions.NoCredentialsError:
        raise KMSConfigError(f"{where}: no AWS credentials") from None


def _kms_client(keys: tuple[str, str, str], region: str, endpoint: str | None, timeout: float) -> Any:
    """A KMS client with these credentials (access key id, secret key, session token or "")."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=keys[0], aws_secret_access_key=keys[1], aws_session_token=keys[2] or None,
        region_name=region,
    )  # fmt: skip
    return session.client("kms", endpoint_url=endpoint, config=_config(timeout))


class AWSKMS(EncryptionKMS):
    """Wraps DEKs with KMS Encrypt under a CMK; the wrapped DEK lives in the volume's metadata."""

    def __init__(self, kms_id: str, describe: str) -> None:
        super().__init__(kms_id)
        self._describe = describe
        self._client: Any = None
        self._cmk: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kms_id!r})"

    def _connect(self, volume_id: str) -> tuple[Any, str]:
        """(the KMS client, the CMK's ARN); the subclass reads its Secret and credentials."""
        raise NotImplementedError

    def _kms(self, volume_id: str) -> tuple[Any, str]:
        # Built on first use only: removing a DEK (it lives in the volume's metadata) needs no Secret.
        if self._client is None or self._cmk is None:
            self._client, self._cmk = self._connect(volume_id)
        return self._client, self._cmk

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        client, cmk = self._kms(volume_id)
        where = f"wrap DEK for volume {volume_id}: AWS KMS key {cmk} (KMS {self.kms_id!r})"
        answer = _translate(where, lambda: client.encrypt(KeyId=cmk, Plaintext=plain_dek.encode()))
        return base64.b64encode(answer["CiphertextBlob"]).decode()

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        client, cmk = self._kms(volume_id)
        where = f"unwrap DEK for volume {volume_id}: AWS KMS key {cmk} (KMS {self.kms_id!r})"
        try:
            blob = base64.b64decode(encrypted_dek, validate=True)
        except (ValueError, binascii.Error):
            raise DEKDecryptError(
                f"{where}: the wrapped DEK in the volume's metadata is not base64"
            ) from None
        answer = _translate(where, lambda: client.decrypt(CiphertextBlob=blob, KeyId=cmk), unwrapping=True)
        try:
            return bytes(answer["Plaintext"]).decode()
        except UnicodeDecodeError:
            raise DEKDecryptError(f"{where}: the unwrapped DEK is not text") from None


def _secret(kms_id: str, name: str, namespace: str) -> dict[str, str]:
    from csi_luks.kube import read_secret

    return read_secret(name, namespace, f"KMS {kms_id!r}")


def _required(kms_id: str, data: Mapping[str, str], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if not data.get(key, "").strip()]
    if missing:
        raise MissingSecret(f"KMS {kms_id!r}: {where} has no {', '.join(missing)}")


class AWSMetadataKMS(AWSKMS):
    """`aws-metadata`: static credentials from a Secret in the plugin's namespace."""

    def __init__(self, kms_id: str, entry: Mapping[str, str]) -> None:
        super().__init__(kms_id, "aws-metadata")
        self.region = entry.get(REGION) or ""
        if not self.region:
            raise KMSConfigError(f"KMS {kms_id!r}: key {REGION!r} (the AWS region of the key) is missing")
        self.secret_name = entry.get(SECRET_NAME) or DEFAULT_SECRET_NAME
        self.secret_namespace = entry.get(SECRET_NAMESPACE) or plugin_namespace(kms_id, SECRET_NAMESPACE)
        self.endpoint = _endpoint(kms_id, entry, KMS_ENDPOINT)
        self.timeout = seconds(kms_id, entry, TIMEOUT, DEFAULT_TIMEOUT)

    def _connect(self, volume_id: str) -> tuple[Any, str]:
        where = f"Secret {self.secret_namespace}/{self.secret_name}"
        data = _secret(self.kms_id, self.secret_name, self.secret_namespace)
        _required(self.kms_id, data, (ACCESS_KEY_ID, SECRET_ACCESS_KEY, CMK_ARN), where)
        client = _kms_client(
            (
                data[ACCESS_KEY_ID].strip(),
                data[SECRET_ACCESS_KEY].strip(),
                data.get(SESSION_TOKEN, "").strip(),
            ),
            self.region,
            self.endpoint,
            self.timeout,
        )
        return client, data[CMK_ARN].strip()


class AWSSTSMetadataKMS(AWSKMS):
    """`aws-sts-metadata`: the tenant's role, assumed with the plugin's ServiceAccount token."""

    def __init__(self, kms_id: str, entry: Mapping[str, str], context: KMSContext) -> None:
        super().__init__(kms_id, "aws-sts-metadata")
        if not context.pvc_namespace:
            raise KMSConfigError(
                f"KMS {kms_id!r}: an aws-sts-metadata KMS reads the tenant's Secret in the PVC's namespace, "
                "and the request names none (is the external-provisioner run with --extra-create-metadata?)"
            )
        self.namespace = context.pvc_namespace
        self.secret_name = entry.get(STS_SECRET_NAME) or DEFAULT_SECRET_NAME
        self.token_file = Path(entry.get(STS_TOKEN_FILE) or DEFAULT_TOKEN_FILE)
        self.kms_endpoint = _endpoint(kms_id, entry, STS_KMS_ENDPOINT)
        self.sts_endpoint = _endpoint(kms_id, entry, STS_ENDPOINT)
        self.timeout = seconds(kms_id, entry, STS_TIMEOUT, DEFAULT_TIMEOUT)

    def _connect(self, volume_id: str) -> tuple[Any, str]:
        where = f"tenant Secret {self.namespace}/{self.secret_name}"
        data = _secret(self.kms_id, self.secret_name, self.namespace)
        _required(self.kms_id, data, (ROLE_ARN, STS_CMK_ARN, STS_REGION), where)
        region, role = data[STS_REGION].strip(), data[ROLE_ARN].strip()
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise KMSConfigError(
                f"KMS {self.kms_id!r}, key {STS_TOKEN_FILE!r}: cannot read the ServiceAccount token "
                f"{self.token_file}: {exc.strerror} (is the projected token volume mounted?)"
            ) from None
        import boto3

        sts = boto3.session.Session(region_name=region).client(
            "sts", endpoint_url=self.sts_endpoint, config=_config(self.timeout, signed=False)
        )
        answer = _translate(
            f"assume role {role} for volume {volume_id} (KMS {self.kms_id!r})",
            lambda: sts.assume_role_with_web_identity(
                RoleArn=role, RoleSessionName=ROLE_SESSION_NAME, WebIdentityToken=token
            ),
        )
        credentials = answer["Credentials"]
        keys = (credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials["SessionToken"])
        client = _kms_client(keys, region, self.kms_endpoint, self.timeout)
        return client, data[STS_CMK_ARN].strip()


@register("aws-metadata")
def _build_metadata(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return AWSMetadataKMS(kms_id, entry)


@register("aws-sts-metadata")
def _build_sts(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return AWSSTSMetadataKMS(kms_id, entry, context)
