#!/usr/bin/env bash
# Regenerates vmbus-proto/tests/data/linux-6.1-layouts.md, the layout oracle of the vmbus-proto
# tests, from the BTF type information of a Debian 6.1 cloud kernel's Hyper-V modules.
#
# Usage (on a Debian/Ubuntu machine with apt sources for bookworm):
#   sudo apt-get install pahole python3 xz-utils      # pahole >= 1.22 (dwarves package)
#   scripts/regen-linux-layouts.sh [KERNEL_ABI] [VMLINUX_BTF]
#     KERNEL_ABI   e.g. 6.1.0-56-cloud-amd64 (default: newest linux-image-6.1.*-cloud-amd64
#                  apt knows about)
#     VMLINUX_BTF  base BTF of that kernel: /sys/kernel/btf/vmlinux when running it, or a
#                  vmlinux from linux-image-<abi>-dbg (default: /sys/kernel/btf/vmlinux)
#   git diff vmbus-proto/tests/data/     # review, then run the vmbus-proto tests
#
# What it does: `apt-get download` the kernel image package (no install), extract hv_vmbus.ko,
# hv_storvsc.ko and hv_netvsc.ko, and for every struct, union and enum the current file lists,
# ask pahole (with the vmlinux base BTF) for its layout and rewrite it in the file's format:
# "struct NAME: size N [(packed)]", then "offset size type name" per top-level member
# (offset:bit for bitfields; anonymous nested structs/unions as "(anonymous) {nested}").
# The prose header of the file is kept. Only names already in the file are regenerated; add a
# "struct NAME: size 0" line to the right section to pick up a new one.
#
# Not run in CI: it needs network access to a Debian mirror and a few hundred MB of disk.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
out="$here/vmbus-proto/tests/data/linux-6.1-layouts.md"
abi="${1:-}"
base_btf="${2:-/sys/kernel/btf/vmlinux}"

command -v pahole >/dev/null || { echo "pahole not found (apt-get install pahole)" >&2; exit 1; }
[ -r "$base_btf" ] || { echo "base BTF $base_btf not readable" >&2; exit 1; }

if [ -z "$abi" ]; then
    abi="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' \
        | awk '{print $1}' | sed 's/^linux-image-//' | sort -V | tail -n1)"
    [ -n "$abi" ] || { echo "no linux-image-6.1.*-cloud-amd64 in apt; pass KERNEL_ABI" >&2; exit 1; }
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# Debian ships the modules in the signed image package; the -unsigned one has the same files.
apt-get download "linux-image-$abi" 2>/dev/null || apt-get download "linux-image-$abi-unsigned"
dpkg-deb -x ./linux-image-*.deb root

mods=()
for m in hv_vmbus hv_storvsc hv_netvsc; do
    f="$(find root/lib/modules -name "$m.ko*" | head -n1)"
    [ -n "$f" ] || { echo "$m not found in the package" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > "$m.ko" ;;
        *.zst) zstd -dqc "$f" > "$m.ko" ;;
        *) cp "$f" "$m.ko" ;;
    esac
    mods+=("$m.ko")
done

python3 - "$out" "$base_btf" "$abi" "${mods[@]}" <<'PY'
import re, subprocess, sys

out, base, abi, mods = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
text = open(out).read()
# Which module each section's types come from.
section_module = {"VMBus": "hv_vmbus.ko", "Storage": "hv_storvsc.ko", "Network": "hv_netvsc.ko"}

def pahole(module, name):
    r = subprocess.run(["pahole", "--btf_base", base, "-C", name, module],
                       capture_output=True, text=True)
    return r.stdout

member = re.compile(r"^\t(?P<decl>[^/{}]*?)\s*;\s*/\*\s*(?P<off>\d+(?::\s*\d+)?)\s+(?P<size>\d+)\s*\*/")
close = re.compile(r"^\t\}\s*(?P<name>\w*)\s*;\s*/\*\s*(?P<off>\d+(?::\s*\d+)?)\s+(?P<size>\d+)\s*\*/")

def convert(kind, name, body):
    lines, depth, size, packed = [], 0, None, False
    for raw in body.splitlines():
        if raw.startswith(f"{kind} {name}"):
            depth = 1
            continue
        m = re.search(r"/\* size: (\d+)", raw)
        if m:
            size = m.group(1)
        if raw.startswith("}"):
            packed = "__packed__" in raw
            break
        opens, closes = raw.count("{"), raw.count("}")
        if depth == 1 and (m := member.match(raw)) and not opens:
            decl = " ".join(m.group("decl").split())
            decl = re.sub(r"\s*:\s*(\d+)$", r":\1", decl)
            off = m.group("off").replace(" ", "")
            lines.append(f"{off:>9} {m.group('size'):>5}  {decl}")
        elif depth == 2 and closes and (m := close.match(raw)):
            field = m.group("name") or "(anonymous)"
            off = m.group("off").replace(" ", "")
            lines.append(f"{off:>9} {m.group('size'):>5}  {field} {{nested}}")
        depth += opens - closes
    head = f"{kind} {name}: size {size if size else 'None'}" + (" (packed)" if packed else "")
    return "\n".join([head] + lines)

def convert_enum(name, body):
    vals = re.findall(r"^\s*(\w+)\s*=\s*(-?\d+)", body, re.M)
    return "\n".join([f"enum {name}:"] + [f"  {n} = {v}" for n, v in vals])

result, section = [], None
for block in re.split(r"(\n```\n.*?\n```\n)", text, flags=re.S):
    if not block.startswith("\n```"):
        m = re.findall(r"^## (\w+)", block, re.M)
        section = m[-1] if m else section
        result.append(block)
        continue
    names = re.findall(r"^(struct|union|enum) (\w+):", block, re.M)
    parts = []
    for kind, name in names:
        modules = [section_module[section]] if section in section_module else mods
        body = ""
        for mod in modules:
            body = pahole(mod, name)
            if body.strip():
                break
        if not body.strip():
            sys.exit(f"pahole knows no {kind} {name}")
        parts.append(convert_enum(name, body) if kind == "enum" else convert(kind, name, body))
    result.append("\n```\n" + "\n\n".join(parts) + "\n```\n")

new = "".join(result)
new = re.sub(r"linux-image-6\.1\.0-\d+-cloud-amd64", f"linux-image-{abi}", new)
open(out, "w").write(new)
print(f"rewrote {out} from linux-image-{abi}")
PY
