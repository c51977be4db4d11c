# csi-luks plugin image: the Python plugin plus the node tools it shells out to.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        cryptsetup-bin e2fsprogs xfsprogs util-linux mount kmod udev ceph-common rbd-nbd \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY csi_luks ./csi_luks
RUN pip install --no-cache-dir . && rm -rf /src

ENTRYPOINT ["csi-luks"]
CMD ["serve", "--endpoint", "unix:///csi/csi.sock"]
