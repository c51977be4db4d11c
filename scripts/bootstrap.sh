#!/usr/bin/env bash
# Installs everything csi-luks needs on a Debian/Ubuntu machine, idempotently:
#   - system tools (cryptsetup, filesystems, and the VM used for kernel tests),
#   - a virtualenv (.venv) with the project and its test extras.
# Usage: scripts/bootstrap.sh [--no-vm]   (--no-vm skips qemu and the guest kernel)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

want_vm=1
[ "${1:-}" = "--no-vm" ] && want_vm=0

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

pkgs=(cryptsetup-bin e2fsprogs xfsprogs util-linux mount kmod udev python3-venv)
# A single-node Ceph cluster (one mon, one memstore OSD) for the RBD tests, on the host and in the guest.
pkgs+=(ceph-mon ceph-osd ceph-common rbd-nbd)
# A mgr with its rbd_support module, started only for Ceph-CSI's own driver (tests/support/cephcsi.py):
# its DeleteVolume hands the image's removal from the trash to `rbd task add trash remove`.
pkgs+=(ceph-mgr)
# Ceph's own Python bindings (librados, librbd): the controller's RBD calls, over one cached connection.
pkgs+=(python3-rados python3-rbd)
# The e2e tier's one-node Kubernetes cluster: its container runtime (kubelet talks CRI to containerd).
pkgs+=(containerd runc containernetworking-plugins)
# The plugin image's root file system, built from the Dockerfile's steps without a container engine.
# strace records which programs the plugin runs from that root in the VM (tests/vm/test_image_node_lifecycle.py).
pkgs+=(mmdebstrap strace)
if [ "$want_vm" = 1 ]; then
    # qemu runs the guest under TCG; linux-image-amd64 is the guest kernel with dm-crypt, loop and rbd.
    pkgs+=(qemu-system-x86 linux-image-amd64 busybox-static)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtualenv is rebuilt only when pyproject.toml changes (a stamp records its hash).
venv="$here/.venv"
stamp="$venv/.bootstrap-stamp"
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ]; then
    echo "bootstrap: installing the project into $venv"
    log="$venv/bootstrap-pip.log"
    if ! { "$venv/bin/pip" install --upgrade pip && "$venv/bin/pip" install -e ".[test]"; } >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "bootstrap: pip failed; full log in $log" >&2
        exit 1
    fi
    echo "$hash" >"$stamp"
fi

# The virtualenv sees Debian's rados and rbd modules, and nothing else of dist-packages: a link to each
# extension module in its site-packages (see the README, "Ceph's Python bindings"). They are built for
# CPython 3.11's stable ABI tag, which this interpreter shares with Debian's.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
for module in rados rbd; do
    found=(/usr/lib/python3/dist-packages/"$module".cpython-*.so)
    [ -e "${found[0]}" ] || { echo "bootstrap: python3-$module has no $module module" >&2; exit 1; }
    ln -sfn "${found[0]}" "$site/$(basename "${found[0]}")"
done
"$venv/bin/python" -c 'import rados, rbd' || { echo "bootstrap: the venv cannot import rados/rbd" >&2; exit 1; }
