"""Command line: argument parsing only; builds settings and hands over to the server or a tool."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from csi_luks import __version__
from csi_luks.kms.kdf import DEFAULT_MAX_KDFS
from csi_luks.logs import LogFormat, configure
from csi_luks.settings import (
    DEFAULT_CEPH_CONFIG,
    DEFAULT_DRIVER_NAME,
    DEFAULT_KMS_CONFIG,
    DEFAULT_STATE_DIR,
    Backend,
    Mode,
    Settings,
)

if TYPE_CHECKING:
    from csi_luks.operations.tool import Tool


def _storage_options(parser: argparse.ArgumentParser) -> None:
    """Where volumes and the KMS configuration are: shared by serve and the operator commands."""
    parser.add_argument(
        "--backend",
        type=Backend,
        choices=list(Backend),
        default=Backend(os.environ.get("CSI_LUKS_BACKEND", "standalone")),
        help="where volumes live: standalone (loop files) or rbd (Ceph RBD images) (env CSI_LUKS_BACKEND)",
    )
    parser.add_argument(
        "--ceph-config",
        default=os.environ.get("CSI_LUKS_CEPH_CONFIG", DEFAULT_CEPH_CONFIG),
        help="rbd backend: the Ceph clusters, a JSON list as ceph-csi's config.json "
        f"(env CSI_LUKS_CEPH_CONFIG; {DEFAULT_CEPH_CONFIG})",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("CSI_LUKS_STATE_DIR", DEFAULT_STATE_DIR),
        help=f"the standalone backend's directory of volumes (env CSI_LUKS_STATE_DIR; {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--kms-config",
        default=os.environ.get("CSI_LUKS_KMS_CONFIG", DEFAULT_KMS_CONFIG),
        help=f"KMS configuration file, a JSON object keyed by KMS id (env CSI_LUKS_KMS_CONFIG; "
        f"{DEFAULT_KMS_CONFIG})",
    )
    parser.add_argument(
        "--kms-config-map",
        default=os.environ.get("CSI_LUKS_KMS_CONFIG_MAP") or None,
        metavar="NAMESPACE/NAME",
        help="ConfigMap read through the Kubernetes API while the --kms-config file does not exist "
        "(env CSI_LUKS_KMS_CONFIG_MAP)",
    )


def _operator_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=help)
    _storage_options(command)
    command.add_argument(
        "--secrets-file",
        help="a JSON object of the secrets a CSI request would carry (rbd: userID and userKey; the "
        "metadata type without secretName: encryptionPassphrase)",
    )
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-luks", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CSI_LUKS_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env CSI_LUKS_LOG_LEVEL; default info, warning for the demo; "
        "debug logs requests with secrets stripped)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CSI plugin on a unix socket")
    serve.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
        help="unix:///path/csi.sock or a bare path (env CSI_ENDPOINT)",
    )
    serve.add_argument(
        "--driver-name",
        default=os.environ.get("CSI_DRIVER_NAME", DEFAULT_DRIVER_NAME),
        help="the CSI driver name, as StorageClasses name it (env CSI_DRIVER_NAME)",
    )
    serve.add_argument(
        "--node-id",
        default=os.environ.get("NODE_ID", ""),
        help="this node's id (env NODE_ID; default: the host name)",
    )
    serve.add_argument(
        "--mode",
        type=Mode,
        choices=list(Mode),
        default=Mode(os.environ.get("CSI_LUKS_MODE", "all")),
        help="which services to run: controller, node or all (env CSI_LUKS_MODE)",
    )
    serve.add_argument(
        "--socket-group",
        default=os.environ.get("CSI_LUKS_SOCKET_GROUP") or None,
        help="group (name or gid) allowed on the socket, which becomes 0660; default 0600, owner only",
    )
    _storage_options(serve)
    serve.add_argument(
        "--max-concurrent-copies",
        type=int,
        default=int(os.environ.get("CSI_LUKS_MAX_COPIES", "4")),
        help="snapshots, clones and restores copying data at once; more are refused with "
        "RESOURCE_EXHAUSTED and retried by the CO (env CSI_LUKS_MAX_COPIES; default 4)",
    )
    serve.add_argument(
        "--max-concurrent-kdfs",
        type=int,
        default=int(os.environ.get("CSI_LUKS_MAX_KDFS", str(DEFAULT_MAX_KDFS))),
        help="memory-hard key derivations at once (the metadata KMS's scrypt, 32 MiB each, and the node's "
        "cryptsetup PBKDFs); more wait for a slot (env CSI_LUKS_MAX_KDFS; default "
        f"{DEFAULT_MAX_KDFS})",
    )
    serve.add_argument(
        "--metrics-address",
        default=os.environ.get("CSI_LUKS_METRICS_ADDRESS") or None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (env CSI_LUKS_METRICS_ADDRESS; "
        "default: no metrics)",
    )
    serve.add_argument(
        "--ceph-secrets",
        default=os.environ.get("CSI_LUKS_CEPH_SECRETS") or None,
        metavar="PATH",
        help="rbd controller: a cephx user (a mounted Secret's directory with the files userID and userKey, "
        "or a JSON object of them) with which it finds and resumes, at start-up and in the background, the "
        "flattens a stopped plugin left owed (env CSI_LUKS_CEPH_SECRETS; default: each resumes when its "
        "image is next read)",
    )
    serve.add_argument(
        "--ceph-csi-instance-id",
        default=os.environ.get("CSI_LUKS_CEPH_CSI_INSTANCE_ID") or "default",
        metavar="ID",
        help="rbd: the --instanceid of the Ceph-CSI deployment whose volumes this plugin serves in place; "
        "its journal directory csi.volumes.<ID> loses a deleted volume's entry (env "
        "CSI_LUKS_CEPH_CSI_INSTANCE_ID; default: default, Ceph-CSI's own)",
    )
    serve.add_argument(
        "--log-format",
        type=LogFormat,
        choices=list(LogFormat),
        default=LogFormat(os.environ.get("CSI_LUKS_LOG_FORMAT", "text")),
        help="text, or json: one JSON object a line, one line per call with its request id, method, volume "
        "id, code and duration (env CSI_LUKS_LOG_FORMAT; default text)",
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT (default 30)",
    )

    rotate = _operator_command(sub, "rotate", "rotate the DEK of volumes, staged or not (crash safe)")
    rotate.add_argument("volume_ids", nargs="+", metavar="VOLUME_ID")
    header = _operator_command(sub, "header", "LUKS header backups")
    header.add_argument("action", choices=["backup", "restore"])
    header.add_argument("volume_id", metavar="VOLUME_ID")
    header.add_argument(
        "--force", action="store_true", help="restore even if the current header opens with the KMS's DEK"
    )
    rewrap = _operator_command(
        sub, "rewrap", "re-wrap vault-transit DEKs under the Transit key's newest version"
    )
    rewrap.add_argument("--kms-id", action="append", default=[], help="only volumes of this KMS id")

    status = _operator_command(sub, "status", "check every volume's KMS entry, DEK, header and header backup")
    status.add_argument("volume_ids", nargs="*", metavar="VOLUME_ID", help="default: every volume")
    status.add_argument("--output", choices=["table", "json"], default="table")

    fsck = _operator_command(
        sub, "fsck", "check unstaged volumes' filesystems read-only (e2fsck -n / xfs_repair -n)"
    )
    fsck.add_argument("volume_ids", nargs="+", metavar="VOLUME_ID")

    migrate = _operator_command(sub, "migrate", "move every DEK of one KMS id under another, online")
    migrate.add_argument("--from", dest="source", required=True, metavar="KMS_ID")
    migrate.add_argument("--to", dest="target", required=True, metavar="KMS_ID")
    migrate.add_argument("--dry-run", action="store_true", help="list what would move, change nothing")
    migrate.add_argument(
        "volume_ids",
        nargs="*",
        metavar="VOLUME_ID",
        help="only these (those of KMS_ID among them); default: every volume (the rbd backend cannot list: "
        "name them)",
    )

    flags = _operator_command(
        sub,
        "luks-flags",
        "change volumes' persistent dm-crypt flags (discard, perf flags) in their LUKS headers, staged "
        "or not",
    )
    flags.add_argument("volume_ids", nargs="+", metavar="VOLUME_ID")
    flags.add_argument("--discard", choices=["on", "off"], help="pass discards (TRIM) down through dm-crypt")
    flags.add_argument(
        "--perf-flags",
        metavar="LIST",
        help="comma-separated: no_read_workqueue, no_write_workqueue, same_cpu_crypt, "
        'submit_from_crypt_cpus; "none" clears them; replaces the volume\'s perf flags',
    )

    sub.add_parser("version", help="print the version")
    sub.add_parser(
        "demo",
        help="run a full encrypted-volume lifecycle on this machine (in a VM if the kernel lacks dm-crypt)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.log_level is None:
        args.log_level = "warning" if args.command == "demo" else "info"
    configure(args.log_level, getattr(args, "log_format", LogFormat.TEXT))
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "demo":
        from csi_luks import demo

        return demo.run(log_level=args.log_level)
    if args.command == "serve":
        from csi_luks.kms.base import KMSError
        from csi_luks.server import PluginServer, ServerError

        try:
            settings = Settings(
                endpoint=args.endpoint,
                driver_name=args.driver_name,
                node_id=args.node_id,
                mode=args.mode,
                socket_group=args.socket_group,
                grace_period=args.grace_period,
                max_copies=args.max_concurrent_copies,
                max_kdfs=args.max_concurrent_kdfs,
                backend=args.backend,
                state_dir=args.state_dir,
                ceph_config=args.ceph_config,
                ceph_secrets=args.ceph_secrets,
                ceph_csi_instance_id=args.ceph_csi_instance_id,
                kms_config=args.kms_config,
                kms_config_map=args.kms_config_map,
                metrics_address=args.metrics_address,
            )
            PluginServer(settings).serve_until_signalled()
        except (ValueError, ServerError, KMSError) as exc:
            print(f"csi-luks: {exc}", file=sys.stderr)
            return 2
        return 0
    return _operator(args)


def _operator(args: argparse.Namespace) -> int:
    from csi_luks.kms.base import KMSError
    from csi_luks.operations import OperationRefused
    from csi_luks.operations.tool import EXIT_UNAVAILABLE, EXIT_USAGE, Tool, exit_code
    from csi_luks.volumes.base import VolumeBackendError

    try:
        tool = Tool.from_arguments(
            args.backend.value, args.state_dir, args.ceph_config, args.kms_config, args.kms_config_map,
            args.secrets_file,
        )  # fmt: skip
    except (ValueError, OSError, KMSError) as exc:
        print(f"csi-luks: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(tool, args)
    except (KMSError, VolumeBackendError, OperationRefused) as exc:  # before any volume was looked at
        print(f"csi-luks {args.command}: {exc}", file=sys.stderr)
        return exit_code(exc) if exit_code(exc) == EXIT_UNAVAILABLE else EXIT_USAGE


def _dispatch(tool: Tool, args: argparse.Namespace) -> int:
    from csi_luks.operations import OperationRefused, commands

    if args.command == "rotate":
        return commands.rotate(tool, args.volume_ids)
    if args.command == "header":
        if args.action == "backup":
            return commands.header_backup(tool, [args.volume_id])
        return commands.header_restore(tool, args.volume_id, args.force)
    if args.command == "rewrap":
        return commands.rewrap(tool, args.kms_id)
    if args.command == "migrate":
        from csi_luks.operations.migration import migrate

        return migrate(tool, args.source, args.target, args.dry_run, args.volume_ids)
    if args.command == "fsck":
        from csi_luks.operations.fsck import fsck

        return fsck(tool, args.volume_ids)
    if args.command == "luks-flags":
        from csi_luks.luks.parameters import parse_perf_flags
        from csi_luks.operations.luks_flags import luks_flags

        if args.discard is None and args.perf_flags is None:
            raise OperationRefused("luks-flags: give --discard and/or --perf-flags")
        try:
            perf = None if args.perf_flags is None else parse_perf_flags(args.perf_flags)
        except ValueError as exc:
            raise OperationRefused(str(exc)) from None
        discard = None if args.discard is None else args.discard == "on"
        return luks_flags(tool, args.volume_ids, discard, perf)
    if args.command == "status":
        from csi_luks.operations.status import report

        return report(tool, args.volume_ids, args.output)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
