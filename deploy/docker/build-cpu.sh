#!/usr/bin/env bash
# Builds the CPU image (deploy/docker/Dockerfile.cpu) with podman, for real: a release build of the three
# binaries in the rust builder stage, then the slim runtime stage.
#
#   deploy/docker/build-cpu.sh [TAG]          (default tag: localhost/tessera:cpu)
#
# Base images: the Dockerfile names Docker Hub's rust and debian images. Where no container registry can be
# reached (this project's machines reach only package registries), TESSERA_LOCAL_BASES=auto (the default)
# falls back to equivalent local bases: a Debian bookworm rootfs made with debootstrap from Debian's archive,
# and a builder on top of it carrying the host's Rust toolchain (rustup's active one). TESSERA_LOCAL_BASES=1
# forces the local bases, 0 forbids them.
# BUILD_ISOLATION (default chroot) is podman build's --isolation: chroot runs the RUN steps without an OCI
# runtime, so builds also work inside VMs and containers whose cgroup/rlimit setup crun or runc refuse.
set -euo pipefail
shopt -s inherit_errexit
root=$(cd "$(dirname "$0")/../.." && pwd)
tag=${1:-localhost/tessera:cpu}
rust_image=${RUST_IMAGE:-docker.io/library/rust:1.95-slim-bookworm}
runtime_image=${RUNTIME_IMAGE:-docker.io/library/debian:bookworm-slim}
local_bases=${TESSERA_LOCAL_BASES:-auto}
bases_dir=${TESSERA_BASES_DIR:-$root/.cache/deploy-bases}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
isolation=${BUILD_ISOLATION:-chroot}

need() { command -v "$1" >/dev/null || { echo "build-cpu: $1 not found (apt-get install $2)" >&2; exit 1; }; }
need podman podman

pullable() { podman image exists "$1" || podman pull --quiet "$1" >/dev/null 2>&1; }

# A minimal Debian bookworm image (what debian:bookworm-slim is) from a debootstrap rootfs.
make_debian_base() {
  local image=localhost/tessera-base/debian:bookworm
  if ! podman image exists "$image"; then
    need debootstrap debootstrap
    local rootfs=$bases_dir/rootfs
    if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
      rm -rf "$rootfs"
      mkdir -p "$bases_dir"
      debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$bases_dir/debootstrap.log" 2>&1 \
        || { tail -20 "$bases_dir/debootstrap.log" >&2; exit 1; }
    fi
    # Same apt sources as the official image (updates and security), so RUN apt-get gets current packages.
    cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' - "$image" >/dev/null
  fi
  echo "$image"
}

# A builder with the layout of the official rust image (CARGO_HOME=/usr/local/cargo, cargo on PATH, gcc for
# the C parts of dependencies), holding the host's rustup toolchain (docs and sources left out) and the extra
# CA certificates the host trusts (HOST_CA_DIR), so cargo reaches crates.io through a TLS-intercepting proxy
# as the host does. They stay in this local builder base; the runtime stage never sees them.
make_rust_base() {
  local debian=$1 image=localhost/tessera-base/rust:bookworm
  if ! podman image exists "$image"; then
    need rustc rustup
    local sysroot ctx=$bases_dir/rust-context
    sysroot=$(rustc --print sysroot)
    rm -rf "$ctx"
    mkdir -p "$ctx/toolchain/lib/rustlib"
    cp -a "$sysroot/bin" "$ctx/toolchain/"
    cp -a "$sysroot"/lib/*.so* "$ctx/toolchain/lib/"
    cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$sysroot/lib/rustlib/etc" "$ctx/toolchain/lib/rustlib/"
    mkdir -p "$ctx/ca"
    find "${HOST_CA_DIR:-/usr/local/share/ca-certificates}" -maxdepth 1 -name '*.crt' -exec cp {} "$ctx/ca/" \; 2>/dev/null || true
    cat >"$ctx/Containerfile" <<CONTAINERFILE
FROM $debian
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY toolchain /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN cargo --version && rustc --version
CONTAINERFILE
    podman build --isolation "$isolation" --quiet -t "$image" "$ctx" >/dev/null
    rm -rf "$ctx"
  fi
  echo "$image"
}

if [ "$local_bases" = 1 ] || { [ "$local_bases" = auto ] && ! { pullable "$rust_image" && pullable "$runtime_image"; }; }; then
  echo "build-cpu: using local base images (no registry pull of $rust_image / $runtime_image)"
  runtime_image=$(make_debian_base)
  rust_image=$(make_rust_base "$runtime_image")
fi

echo "build-cpu: building $tag (builder $rust_image, runtime $runtime_image)"
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
podman build --format docker --isolation "$isolation" \
  --build-arg "RUST_IMAGE=$rust_image" --build-arg "RUNTIME_IMAGE=$runtime_image" \
  -f "$root/deploy/docker/Dockerfile.cpu" -t "$tag" "$root"
podman image inspect --format 'build-cpu: built {{.Id}} ({{.Size}} bytes) user={{.Config.User}} healthcheck={{.Config.Healthcheck.Test}}' "$tag" \
  2>/dev/null || podman image inspect "$tag" --format 'build-cpu: built {{.Id}}'
