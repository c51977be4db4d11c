# csi-luks plugin image: the plugin in a virtualenv, and the Debian packages of every program it runs.
#
# No container engine runs where this project is tested: tests/support/image_rootfs.py builds the same
# root file system from this file (mmdebstrap for FROM, a chroot for RUN, plain copies for COPY), and
# tests/host/test_image.py starts `csi-luks serve` from it. Keep to what it understands: FROM
# debian:<suite>-slim [AS name], RUN, COPY [--from=stage], WORKDIR, ENV, ENTRYPOINT, CMD.

# Stage 1: build the wheel and install it with its dependencies into /opt/csi-luks. The final stage has
# the same Debian python3 at the same path, so it takes the virtualenv as it is.
FROM debian:bookworm-slim AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi_luks ./csi_luks
# pip and setuptools go once the plugin is installed: nothing in the final image installs or builds.
RUN python3 -m venv /opt/csi-luks \
    && /opt/csi-luks/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/csi-luks/bin/pip install --no-cache-dir /wheels/csi_luks-*.whl \
    && /opt/csi-luks/bin/pip uninstall --yes pip setuptools

# Stage 2: what runs. No compiler, no pip, no wheel; only Debian's runtime packages:
#   python3; cryptsetup-bin (cryptsetup); util-linux (blkid); mount (mount, umount, losetup);
#   e2fsprogs (mkfs.ext4, resize2fs); xfsprogs (mkfs.xfs, xfs_growfs); ceph-common (rbd);
#   rbd-nbd; kmod (modprobe, which rbd map runs); udev (libudev, through which the plugin waits for
#   device nodes); python3-rados and python3-rbd (librados and librbd: the controller's RBD calls). csi_luks/system/programs.py names every program the plugin runs and its package.
# Versions are not pinned (DL3008): a rebuild should take bookworm's security updates, and the suite
# tests what bookworm ships.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 cryptsetup-bin util-linux mount e2fsprogs xfsprogs ceph-common rbd-nbd kmod udev \
        python3-rados python3-rbd \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/csi-luks /opt/csi-luks
# The virtualenv sees Debian's rados and rbd modules and nothing else of dist-packages (a link to each).
RUN for module in rados rbd; do \
        ln -s /usr/lib/python3/dist-packages/"$module".cpython-*.so /opt/csi-luks/lib/python3.*/site-packages/; \
    done \
    && /opt/csi-luks/bin/python -c 'import rados, rbd'
ENV PATH=/opt/csi-luks/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The image runs as root (no USER) because the node plugin must: it attaches loop and RBD devices,
# opens dm-crypt mappings and mounts them into kubelet's directories with Bidirectional propagation,
# which needs CAP_SYS_ADMIN in the host's namespaces (a privileged container, deploy/kustomize/base/
# node-plugin.yaml). The controller needs none of that and runs as a non-root user (its Deployment's
# securityContext).
ENTRYPOINT ["csi-luks"]
CMD ["serve", "--endpoint", "unix:///csi/csi.sock"]
