#!/usr/bin/env bash
# Builds the Kubernetes programs the tests run from Debian's own `kubernetes` source package, and installs
# etcd: kube-apiserver (KMS and manifest tests), and for the e2e tier's one-node cluster in the VM
# kube-controller-manager, kube-scheduler and kubelet, plus kubectl. No package registry ships them, but
# bookworm's source package (1.20.2, with vendor/) builds offline with Debian's Go. The binaries are cached
# outside the checkout, keyed by the source version:
#   ${CSI_LUKS_CACHE:-/var/cache/csi-luks}/<program>-<version>
# Usage: scripts/build-kube-apiserver.sh [--print-path [PROGRAM]]
#   The last line on stdout is kube-apiserver's path; --print-path prints a program's path (kube-apiserver
#   by default) without building anything.
# Idempotent: exits at once when every cached binary exists. A cold build of all five takes ~12 minutes on
# 2 cores (kube-apiserver alone ~5), < 3 GB.
set -euo pipefail

# Pinned, so that the cache path is known without apt and a build is reproducible. A Debian point release
# that replaces this version makes `apt-get source` fail below: then update the pin.
version="1.20.5+really1.20.2-1.1+deb12u1"
cache="${CSI_LUKS_CACHE:-/var/cache/csi-luks}"
programs=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
binary="$cache/kube-apiserver-$version"

if [ "${1:-}" = "--print-path" ]; then
    echo "$cache/${2:-kube-apiserver}-$version"
    exit 0
fi
have_all() {
    local p
    for p in "${programs[@]}"; do [ -x "$cache/$p-$version" ] || return 1; done
}

# The cached binary is used as is; etcd is still installed if it is missing (a machine may keep its cache
# but not its packages).
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
if have_all && have_pkg etcd-server; then
    echo "$binary"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

$sudo mkdir -p "$cache"
$sudo chown "$(id -u):$(id -g)" "$cache"
log="$cache/build-kube-apiserver.log"

# Parallel test runs may all start a build: one builds, the others wait for it and reuse its binary.
exec 9>"$cache/build.lock"
flock 9

# Everything from here on goes to the log; the original stdout/stderr stay on fds 3 and 4.
exec 3>&1 4>&2 >"$log" 2>&1
work=""
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        {
            echo "build-kube-apiserver: failed (exit $rc); last lines of $log:"
            tail -n 40 "$log"
            [ -n "$work" ] && echo "build-kube-apiserver: the work dir is kept for inspection: $work"
        } >&4
    fi
}
trap on_exit EXIT
set -x

# Debian's source mirror: the same mirror (and keyring) as the apt source that serves this release.
codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
find_mirror() {
    # Prints "URI SIGNED-BY" for the first `deb` source that serves $codename, in deb822 or one-line format.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v want="$codename" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " want " ") && uri != "") {
                    print uri, (signed == "" ? "-" : signed); found = 1; exit
                }
                types = ""; suites = ""; uri = ""; signed = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^URIs:/ { uri = $2 }
            /^Signed-By:/ { signed = ($2 ~ /^\//) ? $2 : "" }  # an inline key is not copied
            END { if (!found) flush() }
        ' "$f" | head -n 1
    done
    local line opts uri suite signed
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        while read -r line; do
            opts=""
            if [[ $line =~ \[([^]]*)\] ]]; then opts="${BASH_REMATCH[1]}"; line="${line/\[*\]/}"; fi
            read -r _ uri suite _ <<<"$line"
            [ "$suite" = "$codename" ] || continue
            signed="-"
            if [[ $opts =~ signed-by=([^[:space:]]+) ]]; then signed="${BASH_REMATCH[1]}"; fi
            echo "$uri $signed"
            return
        done < <(grep -E '^[[:space:]]*deb[[:space:]]' "$f")
    done
}
src_list=/etc/apt/sources.list.d/csi-luks-deb-src.sources
if [ ! -f "$src_list" ] && ! apt-cache showsrc --only-source kubernetes 2>/dev/null | grep -qx "Version: $version"; then
    read -r mirror signed_by < <(find_mirror | head -n 1) || true
    if [ -z "${mirror:-}" ]; then
        echo "no apt source for $codename found in /etc/apt: cannot add its deb-src" >&2
        exit 1
    fi
    {
        echo "# Added by csi-luks scripts/build-kube-apiserver.sh: Debian sources, to build kube-apiserver."
        echo "Types: deb-src"
        echo "URIs: $mirror"
        echo "Suites: $codename"
        echo "Components: main"
        [ "$signed_by" != "-" ] && echo "Signed-By: $signed_by"
    } | $sudo tee "$src_list" >/dev/null
fi
$sudo apt-get update -q
# reflect2 1.0.2 replaces the vendored 1.0.1, which crashes on Go >= 1.18 (bookworm has Go 1.19).
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
    etcd-server golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev make
# Debian enables etcd as a system service; the tests start their own, on their own ports.
if systemctl is-enabled etcd >/dev/null 2>&1; then $sudo systemctl disable --now etcd || true; fi

if ! have_all; then
    # Leftovers of failed builds (mktemp's build.XXXXXX; the lock keeps out any running one). Not build.*:
    # that removed build.lock itself, and the next run took a fresh lock and removed a running build.
    rm -rf "$cache"/build.??????
    work="$(mktemp -d "$cache/build.XXXXXX")"
    echo "build-kube-apiserver: building ${programs[*]} from Debian's source (about 12 minutes, once); log: $log" >&4
    cd "$work"
    start=$SECONDS
    apt-get source -q "kubernetes=$version"
    src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
    cd "$src"
    rm -rf vendor/github.com/modern-go/reflect2
    cp -a /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
    # Kubernetes 1.20 builds in GOPATH mode from vendor/ (hack/lib/init.sh sets GO111MODULE=off), so GOFLAGS
    # must not carry -mod=...; GOPROXY=off makes any attempt to download fail loudly. The Go caches live in
    # the work dir so that they go away with it.
    env GOPROXY=off GOFLAGS= GOPATH="$work/gopath" GOCACHE="$work/gocache" HOME="$work" CGO_ENABLED=0 \
        make WHAT="${programs[*]/#/cmd/}"
    for p in "${programs[@]}"; do
        built="$src/_output/bin/$p"
        if [ "$p" = kubectl ]; then "$built" version --client; else "$built" --version; fi
        cp "$built" "$cache/$p-$version.tmp"
        mv "$cache/$p-$version.tmp" "$cache/$p-$version"  # atomic: a reader never sees a half-copied binary
    done
    echo "built in $((SECONDS - start)) s: $(du -ch "$cache"/*-"$version" | tail -n 1 | cut -f1)"
    cd /
    rm -rf "$work"
    work=""
fi

set +x
exec >&3 2>&4
echo "$binary"
