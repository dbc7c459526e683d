#!/usr/bin/env bash
# Installs what the build and the tests need, idempotently. Safe to run on every CI run: each
# step checks before it installs.
set -euo pipefail

# The Rust toolchain itself comes with the machine (rustup, stable); its lint and format tools:
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "${component}"
    fi
done

# cargo-nextest runs each test in its own process (the cross-process tests rely on that only for
# isolation; plain `cargo test` works too).
if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# Real NBD clients for vsc's NBD export tests (vsc/tests/nbd_export.rs): qemu-img, qemu-io and
# qemu-nbd from Debian's qemu-utils, and fio (whose Debian build has the nbd engine, via libnbd).
# nbdkit (with its file plugin) is the peer NBD server benches/storage-vs-baseline.sh compares
# the export against.
apt_packages=()
command -v qemu-img >/dev/null 2>&1 || apt_packages+=(qemu-utils)
command -v fio >/dev/null 2>&1 || apt_packages+=(fio)
command -v nbdkit >/dev/null 2>&1 || apt_packages+=(nbdkit)
# `ip` (addresses, neighbours and namespaces) for the TAP tests of netdev and netvsp.
command -v ip >/dev/null 2>&1 || apt_packages+=(iproute2)
if ((${#apt_packages[@]})); then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update and retry once.
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${apt_packages[@]}"; then
        "${sudo[@]}" apt-get update
        "${sudo[@]}" apt-get install -y --no-install-recommends "${apt_packages[@]}"
    fi
fi

# hypervisor-shim/tests/linux_boot.rs loads Debian's cloud bzImage, which it fetches once with
# `apt-get download` (cached under target/): apt's package lists must know the package.
if command -v apt-cache >/dev/null 2>&1 && ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then sudo apt-get update; else apt-get update; fi
fi
