#!/usr/bin/env bash
# The main job on bundled examples, no hypervisor or mdev hardware needed:
#   1. the operator's dry run: would migrating "demo" from host "source" to host "dest" be allowed?
#   2. the trusted delivery path on a migration stream carrying two vGPUs' state:
#      inspect -> strip (state into a root-only store, tokens in the stream) -> load (type-checked
#      delivery per mdev) -> splice (the original stream back, byte for byte).
# Uses libvirt's test driver (examples/hosts/*.xml) and a fake sysfs tree (examples/sysfs/).
set -uo pipefail
cd "$(dirname "$0")/.."
# .ci/setup's virtualenv: .venv, or where LM_VENV says (CI's Debian 13 root keeps its own, docs/ci.md)
venv=${LM_VENV:-.venv}
if [ -x "$venv/bin/python" ]; then py=$venv/bin/python; else py=python3; fi
lm() { "$py" -m libvirt_mdev.cli "$@"; }
src="test://$PWD/examples/hosts/source.xml"
dst="test://$PWD/examples/hosts/dest.xml"
work=$(mktemp -d /tmp/libvirt-mdev-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }

step "1. dry run: demo (two vGPUs; one type differs on dest)" "libvirt-mdev check demo --connect $src --dest $dst"
lm check demo --connect "$src" --dest "$dst"; echo "(exit status $?: 6 = type mismatch, migration refused)"
step "   dry run: demo-ok" "libvirt-mdev check demo-ok --connect $src --dest $dst"
lm check demo-ok --connect "$src" --dest "$dst"; echo "(exit status $?)"

step "2. a migration stream with the two vGPUs' state" "python3 examples/make_example_stream.py; libvirt-mdev inspect example.stream"
"$py" examples/make_example_stream.py "$work/example.stream" >/dev/null && lm inspect "$work/example.stream" | head -10

virsh -c "$src" dumpxml demo > "$work/demo.xml" 2>/dev/null || "$py" - "$src" > "$work/demo.xml" <<'PY'
import sys, libvirt
print(libvirt.open(sys.argv[1]).lookupByName("demo").XMLDesc(0))
PY
step "3. strip: state into the store, tokens into the stream" "libvirt-mdev strip example.stream stripped.stream --domain-xml demo.xml --store STORE"
lm strip "$work/example.stream" "$work/stripped.stream" --domain-xml "$work/demo.xml" --store "$work/store" | tee "$work/tokens"
grep -c EXAMPLE-VGPU-STATE "$work/example.stream" "$work/stripped.stream" | sed 's/^/   marker bytes found: /'

"$py" examples/sysfs/build.py examples/sysfs/dest-host.json "$work/sys" >/dev/null
for dev in 0000:00:05.0 0000:00:06.0; do
  line=$(grep "^$dev/vfio" "$work/tokens"); tok=${line##*token=}; mdev=$(sed 's/.*mdev=\([^ ]*\).*/\1/' <<<"$line")
  step "4. load on dest: $dev (mdev $mdev)" "libvirt-mdev load TOKEN --mdev $mdev --sysfs-root SYS --sink vendor-sink"
  lm load "$tok" --mdev "$mdev" --store "$work/store" --sysfs-root "$work/sys" --sink "$work/sink-$dev"
  echo "(exit status $?)"
done

step "5. splice: the stripped stream back to the original" "libvirt-mdev splice stripped.stream restored.stream --store STORE"
lm splice "$work/stripped.stream" "$work/restored.stream" --store "$work/store" >/dev/null &&
  cmp "$work/example.stream" "$work/restored.stream" && echo "restored.stream is byte-identical to example.stream"
