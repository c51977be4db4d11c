"""The plugin image's root file system, built from the Dockerfile without a container engine.

No container engine runs on these machines, so the Dockerfile's own steps are replayed: `FROM
debian:<suite>-slim` is `mmdebstrap --variant=minbase` with the slim image's dpkg excludes, RUN is
`/bin/sh -c` in a chroot (with /proc, /sys, /dev and the host's resolv.conf mounted in a private mount
namespace, the image's ENV and WORKDIR), COPY copies from the checkout (honouring .dockerignore) or from
an earlier stage. The package lists live in the Dockerfile alone.

Results are cached outside the checkout like Docker's layers: each stage's system layer (FROM and the
steps before its first COPY) and each stage's result, in `<cache>/rootfs-<hash of every input so far>`.
A change to the plugin's code rebuilds only the builder's wheel step and the final copy.

`image_rootfs()` returns the final stage's root (building what is missing); `image_config()` its ENV,
WORKDIR, ENTRYPOINT and CMD; `chroot_argv()` the command line that runs a program inside it. The VM guest
hides /var/cache: `handover()` writes the root as one ext4 file into the guest's work directory while it
boots, and names the directory in CSI_LUKS_IMAGE_ROOTFS (or says in CSI_LUKS_IMAGE_ROOTFS_ERROR why there
is none); the guest's test waits for it (`wait_for_handover`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
CACHE = Path(os.environ.get("CSI_LUKS_CACHE", "/var/cache/csi-luks"))
BUILD_UMASK = 0o022  # docker build's
MIRROR = "http://deb.debian.org"
# Changing how a step is replayed changes every cached layer: bump this with such a change.
BUILDER_VERSION = "2"  # 2: every step under umask 022 (docker build's), whatever this process's is
# What Docker gives a RUN step of the debian images when the Dockerfile sets nothing else.
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
# The slim images (debuerreotype --slimify) leave out documentation and translations.
SLIM_DPKG_OPTIONS = [
    *(f"path-exclude=/usr/share/{d}/*" for d in ("man", "groff", "info", "lintian", "linda", "locale")),
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
]
BUILD_CA_DIR = "/run/csi-luks-build-ca"  # where a RUN step finds the host's CA bundle, if it needs one
ROOTFS_ENV = "CSI_LUKS_IMAGE_ROOTFS"  # in the guest: the image's root, handed over by the host
ROOTFS_ERROR_ENV = "CSI_LUKS_IMAGE_ROOTFS_ERROR"  # in the guest: why the host could not hand it over
STALE_AFTER = 2 * 3600.0  # layers of other inputs unused this long go at the next build (~1 GB each)


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    arguments: str  # the rest of the logical line, continuations joined


@dataclass
class Stage:
    name: str | None
    base: str  # the FROM image, e.g. debian:bookworm-slim
    steps: list[Instruction] = field(default_factory=list)


@dataclass(frozen=True)
class ImageConfig:
    env: dict[str, str]
    workdir: str
    entrypoint: list[str]
    cmd: list[str]


class UnsupportedDockerfile(Exception):
    """The Dockerfile uses something this builder does not replay."""


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, continuation lines joined."""
    stages: list[Stage] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        logical = ""
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", instruction.arguments, re.IGNORECASE)
            if match is None:
                raise UnsupportedDockerfile(f"FROM {instruction.arguments}")
            stages.append(Stage(name=match.group(2), base=match.group(1)))
        elif not stages:
            raise UnsupportedDockerfile(f"{instruction.keyword} before the first FROM")
        else:
            stages[-1].steps.append(instruction)
    return stages


def apt_packages(stage: Stage) -> list[str]:
    """The packages a stage's RUN steps install with apt-get install (options left out)."""
    packages: list[str] = []
    for step in stage.steps:
        if step.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", step.arguments):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages += [w for w in words[2:] if not w.startswith("-")]
    return packages


def image_config(stages: Sequence[Stage] | None = None) -> ImageConfig:
    """The final stage's ENV, WORKDIR, ENTRYPOINT and CMD, as `docker run` would apply them."""
    final = (stages or parse_dockerfile(DOCKERFILE.read_text()))[-1]
    env, workdir, entrypoint, cmd = dict(DEFAULT_ENV), "/", [], []
    for step in final.steps:
        if step.keyword == "ENV":
            env.update(_env_assignments(step.arguments, env))
        elif step.keyword == "WORKDIR":
            workdir = _absolute(workdir, step.arguments)
        elif step.keyword == "ENTRYPOINT":
            entrypoint = _exec_form(step)
        elif step.keyword == "CMD":
            cmd = _exec_form(step)
    return ImageConfig(env=env, workdir=workdir, entrypoint=entrypoint, cmd=cmd)


def image_rootfs() -> Path:
    """The final stage's root file system, built (about 5 minutes cold, with network) or from the cache."""
    stages = parse_dockerfile(DOCKERFILE.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / "rootfs.lock"):
        built: dict[str, tuple[Path, str]] = {}
        for index, stage in enumerate(stages):
            root, key = _build_stage(stage, built)
            built[stage.name or str(index)] = (root, key)
        _remove_stale_layers({key for _, key in built.values()})
    return root


def unbuildable_reason() -> str | None:
    """Why this machine cannot build the root file system, or None."""
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        return "building the image's root file system needs root and mmdebstrap (scripts/bootstrap.sh)"
    return None


READY, FAILED = "ready", "failed"  # in the handover directory: the image file is complete / why not
IMAGE_FILE = "rootfs.ext4"
HANDOVER_WAIT = 2400.0  # a cold build takes about 5 minutes; the guest's other tests run meanwhile


def handover(directory: Path) -> dict[str, str]:
    """On the host, as the VM guest boots: the image's root (from the cache the host tier's tests share,
    or built now, in a thread: the guest does not wait for it to boot) written into directory as one
    ext4 file, then a READY marker (or FAILED with the reason). The guest's environment names directory;
    its test waits for the marker (`wait_for_handover`).

    One file, not the tree: the guest reads the host's files over 9p without a page cache, so a Python
    program started from the tree re-read every module through the host (minutes under TCG); a loop
    device over one file is cached by the guest's own page cache after the first read."""
    reason = unbuildable_reason()
    if reason is not None:
        return {ROOTFS_ERROR_ENV: reason}
    directory.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_write_handover, args=(directory,), name="image-rootfs", daemon=True).start()
    return {ROOTFS_ENV: str(directory)}


def _write_handover(directory: Path) -> None:
    started = time.monotonic()
    image = directory / IMAGE_FILE
    try:
        root = image_rootfs()
        used = int(subprocess.run(["du", "-sxb", str(root)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])  # fmt: skip
        size_mib = used * 13 // 10 // (1 << 20) + 128  # room for metadata and the test's mount points
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(root), "-L", "csi-luks-image", str(image), f"{size_mib}M"],
            capture_output=True, check=True, timeout=600,
        )  # fmt: skip
    except (RuntimeError, OSError, subprocess.SubprocessError, UnsupportedDockerfile) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        why = f"the host could not build the image's root file system: {exc} {text}"
        (directory / FAILED).write_text(why)
        return
    (directory / READY).write_text(f"{root}\n")
    sys.stderr.write(f"\n[guest] image root file system {root} handed to the VM in "
                     f"{time.monotonic() - started:.0f}s\n")  # fmt: skip


def wait_for_handover(directory: Path, timeout: float = HANDOVER_WAIT) -> Path:
    """In the guest: the image file the host writes into directory, once complete; RuntimeError if the
    host failed (with its reason) or did not finish in time."""
    deadline = time.monotonic() + timeout
    while True:
        if (directory / READY).exists():
            return directory / IMAGE_FILE
        if (directory / FAILED).exists():
            raise RuntimeError((directory / FAILED).read_text())
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host did not hand the image's root over within {timeout:.0f}s")
        time.sleep(2)


def chroot_argv(
    root: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    workdir: str = "/",
    binds: Mapping[str, Path] | None = None,
    tmpfs: Sequence[str] = (),
    user: str | None = None,
    read_only: bool = False,
) -> list[str]:
    """A command line that runs argv in root, as a container would: its own mount namespace (nothing
    mounted here outlives the process), /proc, /sys, /dev and resolv.conf from the host, host directories
    bound at `binds` (path in the image -> host path), empty tmpfs at `tmpfs`, as `user` ("uid:gid")
    and with the root read-only (a pod's readOnlyRootFilesystem) if asked. The process execs into argv,
    so a signal to the returned command reaches argv's program."""
    inside = [root / path.lstrip("/") for path in [*(binds or {}), *tmpfs]]
    prepare = [f"mkdir -p {_q(path)}" for path in inside] + [f"touch {_q(root / 'etc/resolv.conf')}"]
    # The root bound onto itself first: a mount of its own that can be made read-only.
    mounts = [f"mount --bind {_q(root)} {_q(root)}"]
    if read_only:
        mounts.append(f"mount -o remount,bind,ro {_q(root)}")
    mounts += [
        f"mount -t proc proc {_q(root / 'proc')}",
        f"mount --rbind /sys {_q(root / 'sys')}",
        f"mount --rbind /dev {_q(root / 'dev')}",
        f"mount --bind /etc/resolv.conf {_q(root / 'etc/resolv.conf')}",
    ]
    for path, host in zip(inside, (binds or {}).values(), strict=False):
        mounts.append(f"mount --bind {_q(host)} {_q(path)}")
    mounts += [f"mount -t tmpfs tmpfs {_q(path)}" for path in inside[len(binds or {}) :]]
    variables = [f"{k}={v}" for k, v in env.items()]
    in_workdir = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', workdir]
    userspec = [f"--userspec={user}"] if user else []
    run = shlex.join(["chroot", *userspec, str(root), "/usr/bin/env", "-i", *variables, *in_workdir, *argv])
    script = " && ".join([*prepare, *mounts, f"exec {run}"])
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]


# --- building -----------------------------------------------------------------------------------------


def _build_stage(stage: Stage, built: Mapping[str, tuple[Path, str]]) -> tuple[Path, str]:
    """The stage's root and its cache key: its system layer, then the steps from its first COPY on."""
    suite = _debian_suite(stage.base)
    keys = _step_keys(stage, suite, built)
    first_copy = next((i for i, s in enumerate(stage.steps) if s.keyword == "COPY"), len(stage.steps))
    system_key = keys[first_copy]  # keys[0] is FROM's, keys[i + 1] the key after steps[i]
    system = _layer(system_key, lambda root: _bootstrap(root, suite, stage.steps[:first_copy], built))
    final_key = keys[-1]
    if final_key == system_key:
        return system, system_key

    def finish(root: Path) -> None:
        subprocess.run(
            ["cp", "-a", "--reflink=auto", f"{system}/.", str(root)], check=True, umask=BUILD_UMASK
        )
        _replay(root, stage.steps[:first_copy], stage.steps[first_copy:], built)

    return _layer(final_key, finish), final_key


def _layer(key: str, make: Callable[[Path], None]) -> Path:
    """The cached layer `key`, made into a fresh directory and renamed into place when missing."""
    path = CACHE / f"rootfs-{key}"
    if path.is_dir():
        os.utime(path)  # in use: not stale
        return path
    work = Path(tempfile.mkdtemp(prefix=f"rootfs-{key}.", dir=CACHE))
    try:
        started = time.monotonic()
        make(work)
        (CACHE / f"rootfs-{key}.log").write_text(f"built in {time.monotonic() - started:.0f} s\n")
        work.rename(path)
    except BaseException:
        _remove_unmounted(work)
        raise
    return path


def _bootstrap(
    root: Path, suite: str, steps: Sequence[Instruction], built: Mapping[str, tuple[Path, str]]
) -> None:
    """FROM debian:<suite>-slim, then the steps before the first COPY."""
    sources = [
        f"deb {MIRROR}/debian {suite} main",
        f"deb {MIRROR}/debian {suite}-updates main",
        f"deb {MIRROR}/debian-security {suite}-security main",
    ]
    dpkg = [f"--dpkgopt={option}" for option in SLIM_DPKG_OPTIONS]
    # In a mount namespace of its own: the /proc, /sys and /dev it mounts in root go with it, even when it
    # is killed, so removing a failed build never reaches into the host's.
    private = ["unshare", "--mount", "--propagation", "private"]
    _checked(
        [
            *private,
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--quiet",
            *dpkg,
            suite,
            str(root),
            *sources,
        ]
    )
    _replay(root, [], steps, built)


def _replay(
    root: Path,
    done: Sequence[Instruction],
    steps: Sequence[Instruction],
    built: Mapping[str, tuple[Path, str]],
) -> None:
    """Run steps in root; `done` are the steps before them (for the ENV and WORKDIR they set)."""
    env, workdir = dict(DEFAULT_ENV), "/"
    for step in done:
        if step.keyword == "ENV":
            env.update(_env_assignments(step.arguments, env))
        elif step.keyword == "WORKDIR":
            workdir = _absolute(workdir, step.arguments)
    for step in steps:
        if step.keyword == "ENV":
            env.update(_env_assignments(step.arguments, env))
        elif step.keyword == "WORKDIR":
            workdir = _absolute(workdir, step.arguments)
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif step.keyword == "RUN":
            _run_step(root, step, env, workdir)
        elif step.keyword == "COPY":
            _copy(root, step, workdir, built)
        elif step.keyword not in ("ENTRYPOINT", "CMD", "LABEL"):
            raise UnsupportedDockerfile(f"{step.keyword} {step.arguments}")


def _run_step(root: Path, step: Instruction, env: Mapping[str, str], workdir: str) -> None:
    """RUN: /bin/sh -c in the chroot. A machine whose TLS traffic passes a proxy with its own CA names
    that CA's bundle in PIP_CERT (as this one does): pip in the chroot gets it for the build only, as a
    `docker build --secret` would, mounted under /run and gone afterwards."""
    host_bundle = os.environ.get("PIP_CERT")
    binds, extra = {}, {}
    if host_bundle and Path(host_bundle).is_file():
        binds[BUILD_CA_DIR] = Path(host_bundle).parent
        extra["PIP_CERT"] = f"{BUILD_CA_DIR}/{Path(host_bundle).name}"
    try:
        argv = ["/bin/sh", "-c", step.arguments]
        _checked(chroot_argv(root, argv, env={**env, **extra}, workdir=workdir, binds=binds))
    finally:
        with contextlib.suppress(FileNotFoundError):
            (root / BUILD_CA_DIR.lstrip("/")).rmdir()


def _copy(root: Path, step: Instruction, workdir: str, built: Mapping[str, tuple[Path, str]]) -> None:
    """COPY [--from=stage] src... dest: a directory's contents, or files into dest (a directory if it
    ends with / or takes several)."""
    stage, sources, dest = _copy_arguments(step)
    context = built[stage][0] if stage else REPO_ROOT
    target = root / _absolute(workdir, dest).lstrip("/")
    into_directory = dest.endswith("/") or len(sources) > 1
    for source in sources:
        origin = context / source.lstrip("/")
        if origin.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            files = _context_files(origin) if stage is None else None
            if files is None:
                subprocess.run(["cp", "-a", f"{origin}/.", str(target)], check=True, umask=BUILD_UMASK)
            for file in files or []:
                (target / file.relative_to(origin)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target / file.relative_to(origin))
        else:
            destination = target / origin.name if into_directory else target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, destination)


def _copy_arguments(step: Instruction) -> tuple[str | None, list[str], str]:
    words = shlex.split(step.arguments)
    stage = None
    while words and words[0].startswith("--"):
        option = words.pop(0)
        if not option.startswith("--from="):
            raise UnsupportedDockerfile(f"COPY {option}")
        stage = option.removeprefix("--from=")
    if len(words) < 2:
        raise UnsupportedDockerfile(f"COPY {step.arguments}")
    return stage, words[:-1], words[-1]


def _step_keys(stage: Stage, suite: str, built: Mapping[str, tuple[Path, str]]) -> list[str]:
    """The cache key after FROM and after each step: a hash of everything that went into the layer."""
    digest = hashlib.sha256(f"{BUILDER_VERSION}\n{MIRROR}\n{suite}\n{SLIM_DPKG_OPTIONS}\n".encode())
    keys = [digest.copy().hexdigest()[:16]]
    for step in stage.steps:
        digest.update(f"{step.keyword} {step.arguments}\n".encode())
        if step.keyword == "COPY":
            from_stage, sources, _ = _copy_arguments(step)
            if from_stage:
                digest.update(built[from_stage][1].encode())
            else:
                for source in sources:
                    _hash_context(digest, REPO_ROOT / source)
        keys.append(digest.copy().hexdigest()[:16])
    return keys


def _hash_context(digest: hashlib._Hash, path: Path) -> None:
    for file in _context_files(path) if path.is_dir() else [path]:
        digest.update(f"{file.relative_to(REPO_ROOT)} {file.stat().st_mode:o}\n".encode())
        digest.update(file.read_bytes())


def _context_files(directory: Path) -> list[Path]:
    """Files under directory that .dockerignore lets into the build context, sorted."""
    ignore = REPO_ROOT / ".dockerignore"
    patterns = [
        _ignore_regex(line.strip())
        for line in (ignore.read_text().splitlines() if ignore.exists() else [])
        if line.strip() and not line.startswith("#")
    ]
    files = []
    for file in sorted(directory.rglob("*")):
        relative = file.relative_to(REPO_ROOT).as_posix()
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if file.is_file() and not any(p.fullmatch(prefix) for p in patterns for prefix in prefixes):
            files.append(file)
    return files


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a slash-separated path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _remove_unmounted(tree: Path) -> None:
    """rm -r, but never through a mount point (a bound /dev would take the host's device nodes with it):
    a tree with something mounted in it is left alone."""
    real = os.path.realpath(tree)
    with open("/proc/self/mountinfo") as mountinfo:
        mounted = [line.split()[4] for line in mountinfo]
    if not any(point == real or point.startswith(real + "/") for point in mounted):
        shutil.rmtree(tree, ignore_errors=True)


def _remove_stale_layers(keep: set[str]) -> None:
    now = time.time()
    for path in CACHE.glob("rootfs-*"):
        key = path.name.removeprefix("rootfs-").split(".")[0]
        if key not in keep and path.is_dir() and now - path.stat().st_mtime > STALE_AFTER:
            _remove_unmounted(path)
            (CACHE / f"rootfs-{key}.log").unlink(missing_ok=True)


# --- small helpers --------------------------------------------------------------------------------------


def _debian_suite(base: str) -> str:
    match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)-slim", base)
    if match is None:
        raise UnsupportedDockerfile(f"FROM {base}: only debian:<suite>-slim is replayed with mmdebstrap")
    return match.group(1)


def _env_assignments(arguments: str, env: Mapping[str, str]) -> dict[str, str]:
    """ENV k=v ...: values may name earlier variables as $NAME or ${NAME}."""
    out: dict[str, str] = {}
    for word in shlex.split(arguments):
        name, equals, value = word.partition("=")
        if not equals:
            raise UnsupportedDockerfile(f"ENV {arguments}: use the NAME=value form")
        out[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: {**env, **out}.get(m.group(1), ""), value)
    return out


def _exec_form(step: Instruction) -> list[str]:
    try:
        value = json.loads(step.arguments)
    except json.JSONDecodeError:
        raise UnsupportedDockerfile(f"{step.keyword} {step.arguments}: use the exec (JSON) form") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UnsupportedDockerfile(f"{step.keyword} {step.arguments}")
    return value


def _absolute(workdir: str, path: str) -> str:
    return os.path.normpath(os.path.join(workdir, path))


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _checked(argv: Sequence[str]) -> None:
    # Docker's umask, whatever this process's is at the instant: a plugin started in-process narrows the
    # process-wide umask while it binds its socket (csi_luks/server.py), and this may run in another thread.
    result = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, umask=BUILD_UMASK
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)[:2000]}\nexited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time across processes (parallel sessions wait, then reuse the result)."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
