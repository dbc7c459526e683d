#!/usr/bin/env bash
# Boots Debian's stock cloud kernel under vmbus-vm with a disk served by vspd, and checks from
# inside the guest that hv_vmbus finds the VMBus, lists its devices, and that hv_storvsc's disk
# reads back the pattern the host wrote and takes one the host then checks. Prints PASS or FAIL.
#
# Usage: [NIC_TAP=NAME] scripts/boot-linux.sh [KERNEL.deb]
#   KERNEL.deb: a linux-image-*-cloud-amd64 package already downloaded (default: the one
#   linux-image-cloud-amd64 depends on, fetched with apt-get download).
#   NIC_TAP: also give the guest a NIC on that host TAP (vspd --nic tap=NAME; needs a vspd
#   with netvsp) and check that hv_netvsc brings its eth0 up.
#
# Needs a CPU with VT-x or AMD-V: on machines without (where KVM emulates guest code at CPL 0)
# a stock kernel cannot boot, so the script says so and exits 77 without running anything.
# Also needs /dev/kvm, busybox-static (apt-get install busybox-static), apt-get and dpkg-deb.
# Exit status: 0 pass, 1 fail, 77 cannot run here.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "boot-linux: $*" >&2; }

if ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
    say "SKIP: this CPU has no vmx/svm flag (no hardware virtualization); a stock Linux kernel" \
        "cannot boot on this KVM. Run this script on a host with VT-x or AMD-V."
    exit 77
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    say "SKIP: /dev/kvm is missing or not accessible to $(id -un)"
    exit 77
fi
busybox="$(command -v busybox || true)"
if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
    say "needs a static busybox: apt-get install busybox-static"
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The kernel package: vmlinuz and the modules the guest needs.
if [ $# -ge 1 ]; then
    deb="$(realpath "$1")"
else
    pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
    [ -n "$pkg" ] || { say "apt knows no linux-image-cloud-amd64 (apt-get update?)"; exit 1; }
    (cd "$work" && apt-get download -q "$pkg" >&2)
    deb="$(echo "$work"/*.deb)"
fi
mkdir "$work/pkg"
dpkg-deb -x "$deb" "$work/pkg"
vmlinuz="$(echo "$work"/pkg/boot/vmlinuz-*)"
moddir="$(echo "$work"/pkg/lib/modules/*/kernel)"
[ -f "$vmlinuz" ] && [ -d "$moddir" ] || { say "$deb holds no vmlinuz or modules"; exit 1; }

# The modules with their dependencies (from each .ko's modinfo "depends="), in load order.
declare -A seen=()
order=()
add() {
    local name="$1" file deps dep
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    file="$(find "$moddir" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1)"
    [ -n "$file" ] || { say "module $name not in the package"; exit 1; }
    deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$file" | head -n1 | cut -d= -f2)"
    for dep in ${deps//,/ }; do add "$dep"; done
    order+=("$file")
}
modules=(hv_vmbus hv_storvsc sd_mod)
if [ -n "${NIC_TAP:-}" ]; then modules+=(hv_netvsc); fi
for m in "${modules[@]}"; do add "$m"; done

# The initramfs: busybox, the modules, and an /init that does the checks.
rd="$work/initramfs"
mkdir -p "$rd"/{bin,dev,proc,sys,modules}
cp "$busybox" "$rd/bin/busybox"
insmods=""
for f in "${order[@]}"; do
    cp "$f" "$rd/modules/"
    insmods+="insmod /modules/$(basename "$f") || echo \"BOOT-LINUX: insmod $(basename "$f") failed\""$'\n'
done
cat >"$rd/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
$insmods
for i in \$(seq 30); do [ -b /dev/sda ] && break; sleep 1; done
echo "BOOT-LINUX: vmbus devices:"
for d in /sys/bus/vmbus/devices/*; do echo "BOOT-LINUX:   \$(basename \$d) class \$(cat \$d/class_id)"; done
ok=1
if [ "\$(dd if=/dev/sda bs=16 count=1 2>/dev/null)" = "HOST-WROTE-THIS!" ]; then
    echo "BOOT-LINUX: read the host's pattern from /dev/sda"
else
    echo "BOOT-LINUX: /dev/sda does not hold the host's pattern"; ok=0
fi
printf 'GUEST-WROTE-THIS' | dd of=/dev/sda bs=512 seek=1 conv=sync,fsync 2>/dev/null || ok=0
if [ -n "${NIC_TAP:-}" ]; then
    for i in \$(seq 10); do [ -e /sys/class/net/eth0 ] && break; sleep 1; done
    if ip link set eth0 up && [ "\$(cat /sys/class/net/eth0/operstate)" != down ]; then
        echo "BOOT-LINUX: hv_netvsc's eth0 is up"
    else
        echo "BOOT-LINUX: no eth0 from hv_netvsc"; ok=0
    fi
fi
[ \$ok = 1 ] && echo "BOOT-LINUX: guest checks passed" || echo "BOOT-LINUX: guest checks FAILED"
poweroff -f
EOF
chmod +x "$rd/init"
(cd "$rd" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

# The disk: 64 MiB, the host's pattern in its first bytes.
truncate -s 64M "$work/disk.img"
printf 'HOST-WROTE-THIS!' | dd of="$work/disk.img" conv=notrunc 2>/dev/null

(cd "$root" && cargo build --release --bin vmbus-vm --bin vspd >&2)
set +e
timeout 600 "$root/target/release/vmbus-vm" --memory 1G --cpus 2 \
    --kernel "$vmlinuz" --initrd "$work/initrd.gz" \
    --cmdline "console=ttyS0 rdinit=/init panic=-1" \
    --disk "path=$work/disk.img" ${NIC_TAP:+--nic "tap=$NIC_TAP"} | tee "$work/console.log"
status=${PIPESTATUS[0]}
set -e

if grep -q "BOOT-LINUX: guest checks passed" "$work/console.log" &&
    [ "$(dd if="$work/disk.img" bs=1 skip=512 count=16 2>/dev/null)" = "GUEST-WROTE-THIS" ]; then
    echo "boot-linux: PASS (vmbus-vm exit $status): the stock kernel found the VMBus and its disk"
    exit 0
fi
echo "boot-linux: FAIL (vmbus-vm exit $status): see the console output above"
exit 1
