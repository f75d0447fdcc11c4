#!/usr/bin/env bash
# The Debian package on a fresh Debian root, end to end (docs/packaging.md "Checking the
# package on a fresh root").  As root, on a Debian host with debootstrap and util-linux:
#
#   bash tests/packaging/root_check.sh bookworm /tmp/ops15/bookworm
#   bash tests/packaging/root_check.sh trixie   /tmp/ops15/trixie
#
# 1. debootstrap --variant=minbase SUITE ROOT (skipped when ROOT already holds a system);
# 2. inside ROOT (chroot, private mount namespace): install the build dependencies, build
#    the package from this checkout with dpkg-buildpackage -us -uc -b, run lintian (errors
#    fail), install libvirt + QEMU, then `apt install ./libvirt-mdev_*.deb`;
# 3. in private mount + network + pid namespaces: start virtlogd and libvirtd, start a
#    small guest, `virsh save` and `virsh restore` it through the installed hook, show
#    the hook refusing a restore whose XML names an mdev this root lacks, then
#    `apt purge libvirt-mdev`: the hook and the conffile are gone, the store stays, and
#    the same restore is no longer ours to refuse.
# Nothing runs on the host outside ROOT; every process started in step 3 dies with its
# pid namespace.  Needs network access to the Debian mirror for steps 1-2.
set -euo pipefail

SUITE=${1:?usage: root_check.sh SUITE ROOT}
ROOT=${2:?usage: root_check.sh SUITE ROOT}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SRC=/root/libvirt-mdev-src
export LC_ALL=C.UTF-8

say() { printf '== %s\n' "$*"; }

if [ ! -e "$ROOT/etc/debian_version" ]; then
  say "debootstrap $SUITE into $ROOT"
  t0=$(date +%s)
  debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" > "$ROOT.debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
  say "debootstrap took $(( $(date +%s) - t0 )) s"
fi

say "copy this checkout (tracked and new files) to $ROOT$SRC/libvirt-mdev"
rm -rf "$ROOT$SRC"; mkdir -p "$ROOT$SRC/libvirt-mdev"
(cd "$REPO" && git ls-files -co --exclude-standard | grep -v '^\.venv/' | tar -cf - -T -) \
  | tar -xf - -C "$ROOT$SRC/libvirt-mdev"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# Debian's way to keep maintainer scripts from starting daemons inside a chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod 755 "$ROOT/usr/sbin/policy-rc.d"

# A private /dev (tmpfs with the few nodes apt, libvirtd and QEMU use), /proc and /sys.
MOUNTS='
mount --bind "$R" "$R"  # the root a mount point: libvirt makes / a slave mount in QEMU'"'"'s namespace
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
for n in "null c 1 3" "zero c 1 5" "full c 1 7" "random c 1 8" "urandom c 1 9" "tty c 5 0"; do
  set -- $n; mknod -m 666 "$R/dev/$1" "$2" "$3" "$4"
done
mkdir -p "$R/dev/pts" "$R/dev/shm"; mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"; mount -t tmpfs tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=755 tmpfs "$R/run"; mount -t tmpfs tmpfs "$R/tmp"
'

inroot() {  # inroot [unshare options] -- script: run script in ROOT, private mounts
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
  R="$ROOT" unshare --mount --propagation private --fork "${opts[@]}" \
    bash -c "set -e
$MOUNTS
exec chroot \"\$R\" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive bash -euo pipefail -c \"\$0\"" "$1"
}

say "build the package inside the $SUITE root"
t0=$(date +%s)
inroot -- "
dpkg --configure -a > /dev/null 2>&1 || true; apt-get -f install -y -q > /dev/null  # a previous interrupted run
apt-get update -q > /tmp/apt-update.log
apt-get install -y -q --no-install-recommends build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject \
  python3-all python3-setuptools python3-click python3-cryptography python3-libvirt python3-lxml lintian \
  > /var/log/ops-builddeps.log
cd $SRC/libvirt-mdev
dpkg-buildpackage -us -uc -b > ../build.log 2>&1 || { tail -30 ../build.log; exit 1; }
cd $SRC
ls -l libvirt-mdev_*_all.deb
lintian --version
lintian --allow-root --fail-on error libvirt-mdev_*.changes || { echo 'lintian: errors' >&2; exit 1; }
lintian --allow-root -I libvirt-mdev_*.changes || true
"
say "build + lintian took $(( $(date +%s) - t0 )) s"

say "install libvirt and QEMU, then apt install ./libvirt-mdev_*.deb"
inroot -- "
apt-get install -y -q --no-install-recommends libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients \
  qemu-system-x86 > /var/log/ops-libvirt.log
cd $SRC
dpkg -s libvirt-mdev > /dev/null 2>&1 && apt-get purge -y -q libvirt-mdev > /dev/null  # a previous run
apt-get install -y ./libvirt-mdev_*_all.deb 2>&1 | tr '\r' '\n' | grep -v '^\(Get\|Selecting\|Preparing\|Unpacking\|Reading\|Building\)' \
  | tail -25
"

say "libvirtd + virsh save/restore through the installed hook, then apt purge"
inroot --net --pid -- '
HOOK=/etc/libvirt/hooks/qemu.d/50-libvirt-mdev
test -x $HOOK; head -1 $HOOK; grep -n "^CONFIG\|^SYS_PATH" $HOOK
dpkg -s libvirt-mdev | grep -E "^(Status|Version|Depends|Recommends):"
dpkg-query -W -f="\${Conffiles}\n" libvirt-mdev
for u in $(readlink -f /lib/systemd/system/libvirt-mdev-* /usr/lib/systemd/system/libvirt-mdev-* 2>/dev/null | sort -u); do
  [ -e "$u" ] || continue
  for cmd in $(sed -n "s/^Exec[A-Za-z]*=\([^ ]*\).*/\1/p" "$u"); do
    p=$(command -v "$cmd") || { echo "unit $u runs $cmd, which does not exist" >&2; exit 1; }
    echo "unit $(basename "$u"): $cmd -> $p"
  done
done
libvirt-mdev --version; man -w libvirt-mdev 2>/dev/null || ls /usr/share/man/man1/libvirt-mdev.1.gz
libvirt-mdev --config /nonexistent.conf store list 2>&1 || echo "exit $? (expected 9)"

mkdir -p /var/log/libvirt /var/lib/libvirt/mdev-state; chmod 700 /var/lib/libvirt/mdev-state
echo kept > /var/lib/libvirt/mdev-state/.root-check-marker
virtlogd -d; libvirtd -d
for i in $(seq 100); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
virsh -c qemu:///system version | sed -n 1,3p
cat > /tmp/g.xml <<XML
<domain type="qemu"><name>pkgcheck</name><memory unit="MiB">96</memory><vcpu>1</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><controller type="usb" model="none"/>
    <memballoon model="none"/></devices></domain>
XML
export LIBVIRT_DEFAULT_URI=qemu:///system
virsh -q destroy pkgcheck > /dev/null 2>&1 || true; virsh -q undefine pkgcheck > /dev/null 2>&1 || true
virsh -q define /tmp/g.xml; virsh -q start pkgcheck; sleep 1
t0=$(date +%s%N); virsh -q save pkgcheck /tmp/pkgcheck.save; t1=$(date +%s%N)
virsh -q restore /tmp/pkgcheck.save; t2=$(date +%s%N)
echo "virsh save $(( (t1 - t0) / 1000000 )) ms, virsh restore $(( (t2 - t1) / 1000000 )) ms"
test "$(virsh domstate pkgcheck)" = running; echo "state after restore: running"
virsh -q destroy pkgcheck
# the hook gates restore: an XML naming an mdev this root lacks (and no annotation) is refused by us
virsh save-image-dumpxml /tmp/pkgcheck.save | sed "s#</devices>#<hostdev mode=\"subsystem\" type=\"mdev\" model=\"vfio-pci\"><source><address uuid=\"8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0009\"/></source></hostdev></devices>#" > /tmp/alt.xml
if virsh -q restore /tmp/pkgcheck.save --xml /tmp/alt.xml 2> /tmp/refused.txt; then echo "restore with a missing mdev was allowed" >&2; exit 1; fi
cat /tmp/refused.txt
grep -q "libvirt-mdev: restore refused" /tmp/refused.txt
echo "== apt purge libvirt-mdev"
apt-get purge -y -q libvirt-mdev 2>&1 | tr "\\r" "\\n" | grep -v "^\(Reading\|Building\)" | tail -8
test ! -e $HOOK && echo "hook gone: $HOOK"
test ! -e /etc/libvirt/libvirt-mdev.conf && echo "conffile gone: /etc/libvirt/libvirt-mdev.conf"
test -e /var/lib/libvirt/mdev-state/.root-check-marker && echo "store kept: /var/lib/libvirt/mdev-state"
test ! -e /usr/bin/libvirt-mdev && echo "command gone: /usr/bin/libvirt-mdev"
if virsh -q restore /tmp/pkgcheck.save --xml /tmp/alt.xml 2> /tmp/after.txt; then virsh -q destroy pkgcheck; fi
if grep -q "libvirt-mdev" /tmp/after.txt; then echo "the purged hook still ran" >&2; exit 1; fi
echo "after purge the same restore fails in libvirt itself: $(head -c 160 /tmp/after.txt | tr "\n" " ")"
virsh -q restore /tmp/pkgcheck.save && virsh -q destroy pkgcheck && echo "plain restore after purge: ok"
virsh -q undefine pkgcheck
echo "== asked: LIBVIRT_MDEV_PURGE_STORE=yes apt purge removes the store too"
apt-get install -y -q /root/libvirt-mdev-src/libvirt-mdev_*_all.deb > /dev/null 2>&1
test -x $HOOK
LIBVIRT_MDEV_PURGE_STORE=yes apt-get purge -y -q libvirt-mdev 2>&1 | tr "\\r" "\\n" | grep "^libvirt-mdev:"
test ! -e /var/lib/libvirt/mdev-state && test ! -e $HOOK && echo "store removed on request: /var/lib/libvirt/mdev-state"
'
say "root check on $SUITE: PASSED"
