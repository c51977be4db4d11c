"""`./dev bench`: run the benchmarks and print one table of ratios and targets.

./dev bench                    the host parts: vault, standalone, rbd, kdf
./dev bench --vm               the host parts, then the node part in a virtme-ng guest (dm-crypt)
./dev bench vault --pairs 1000 one part, with its own knobs
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.table import Row, missed, render, rows_from_json, rows_to_json

PARTS = ("vault", "standalone", "rbd", "kdf", "node")
HOST_PARTS = ("vault", "standalone", "rbd", "kdf")
REPO = Path(__file__).resolve().parents[1]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str] | None = None, dm_crypt: bool = False) -> argparse.Namespace:
    """The command line; dm_crypt says whether this kernel can run the node part without a guest."""
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    what = f"any of {', '.join(PARTS)} (default: the host parts; node too with --vm)"
    parser.add_argument("parts", nargs="*", metavar="PART", help=what)
    parser.add_argument("--vm", action="store_true", help="run the node part in a virtme-ng guest")
    parser.add_argument("--pairs", type=_positive, default=500, help="vault: pairs per side (500)")
    parser.add_argument("--volumes", type=_positive, default=1000, help="standalone: the many volumes (1000)")
    parser.add_argument("--rbd-samples", type=_positive, default=10, help="rbd: samples per figure (10)")
    parser.add_argument(
        "--written-mib",
        type=_positive,
        default=1024,
        help="rbd: data in the written volume (1024 MiB; the test OSD holds 2 GiB)",
    )
    parser.add_argument(
        "--kdf-calls", type=_positive, default=32, help="kdf: CreateVolume calls at once (32)"
    )
    parser.add_argument("--size-mib", type=_positive, default=64, help="node: volume size (64 MiB)")
    parser.add_argument("--samples", type=_positive, default=7, help="node: stages per flow (7)")
    parser.add_argument("--concurrent", type=_positive, default=16, help="node: stages at once (16)")
    # Set by the host for the guest: where the guest writes its rows and notes for the host's table.
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--notes-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ram-disk", action="store_true", help=argparse.SUPPRESS)  # node: images on brd
    args = parser.parse_args(argv)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if not args.parts:
        args.parts = [*HOST_PARTS, "node"] if args.vm else list(HOST_PARTS)
    if "node" in args.parts and not args.vm and not dm_crypt:
        parser.error("the node part needs dm-crypt, which this kernel lacks: add --vm to run it in a guest")
    return args


def _node_in_guest(args: argparse.Namespace, notes: list[str]) -> list[Row]:
    from csi_luks.system import vm

    workdir = Path(tempfile.mkdtemp(prefix="csi-luks-bench-vm-"))
    rows_file = workdir / "node-rows.json"
    notes_file = workdir / "node-notes.txt"
    from tests.support.guest_pylib import pack

    command = (
        f"{sys.executable} -m bench node --rows-out {rows_file} --notes-out {notes_file} "
        f"--size-mib {args.size_mib} --samples {args.samples} --concurrent {args.concurrent} --ram-disk"
    )
    command = f"{pack(workdir / 'pylib')}\n{command}"  # imports from the guest's tmpfs, not over 9p
    print("node: booting a virtme-ng guest (about 20 s) ...", file=sys.stderr, flush=True)
    result = vm.run_in_guest(
        command,
        workdir,
        cwd=str(REPO),
        memory="4G",  # the images are on a brd RAM disk (bench/node.py), of 16 x 64 MiB + 512 MiB by default
        timeout=3600,
        on_output=lambda text: print(text, end="", file=sys.stderr),
    )
    if result.returncode != 0 or not rows_file.exists():
        raise SystemExit(f"the node part failed in the guest (exit {result.returncode}); see {workdir}")
    rows = rows_from_json(rows_file.read_text())
    if notes_file.exists():
        notes.append(notes_file.read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _part(name: str, args: argparse.Namespace, notes: list[str]) -> list[Row]:
    """The part's rows; what it has to say beside the table (the node's breakdown) goes to notes."""
    print(f"{name}: measuring ...", file=sys.stderr, flush=True)
    if name == "vault":
        from bench import vault

        return vault.measure(pairs=args.pairs)
    if name == "standalone":
        from bench import standalone

        return standalone.measure(many=args.volumes)
    if name == "rbd":
        from bench import rbd

        return rbd.measure(samples=args.rbd_samples, written_mib=args.written_mib)
    if name == "kdf":
        from bench import kdf

        return kdf.measure(calls=args.kdf_calls)
    if args.vm:
        return _node_in_guest(args, notes)
    from bench import node

    return node.measure(args.size_mib, args.samples, args.concurrent, notes, ram_disk=args.ram_disk)


def main(argv: Sequence[str] | None = None) -> int:
    from csi_luks.system.kernel import device_mapper_missing_reason

    args = parse_args(argv, dm_crypt=device_mapper_missing_reason() is None)
    notes: list[str] = []
    rows = [row for part in args.parts for row in _part(part, args, notes)]
    if args.rows_out is not None:
        args.rows_out.write_text(rows_to_json(rows))
    if args.notes_out is not None:
        args.notes_out.write_text("\n".join(notes))
    print(render(rows))
    for note in notes:
        print(note)
    for row in missed(rows):
        print(f"target not met: {row.name} ({row.target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
