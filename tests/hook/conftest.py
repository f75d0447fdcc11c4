"""Call the hook exactly as libvirt does: the installed file, argv ``DOMAIN OP SUBOP -``,
the domain XML on stdin, an environment of PATH/HOME/LC_ALL=C only, no tty."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_mdev.cli.hookcmd import install
from testkit.fakesysfs import make_fake_sysfs

U1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"
U2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"
U3 = "4b20d080-1b54-4048-85b3-a6a62d165c03"  # not on this host
DOM_UUID = "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001"
PARENT = "0000:3b:00.0"
NS = "urn:libvirt-mdev:metadata:1"

#: every (operation, sub-operation) libvirt 9.0 calls the qemu hook with (docs/hook.md)
ALL_OPS = [("migrate", "begin"), ("prepare", "begin"), ("start", "begin"), ("started", "begin"),
           ("stopped", "end"), ("release", "end"), ("restore", "begin"), ("reconnect", "begin"),
           ("attach", "begin")]
GATES = {("migrate", "begin"), ("restore", "begin")}


def domain_xml(mdevs: dict[str, str | None], name: str = "vm1", annotated: bool = True) -> bytes:
    """A domain with one mdev hostdev per key; value = annotated source type (None: no entry)."""
    devs = "".join(
        f"""    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci'>
      <source><address uuid='{u}'/></source>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x{5 + i:02x}' function='0x0'/>
    </hostdev>\n""" for i, u in enumerate(mdevs))
    meta = ""
    if annotated:
        items = "".join(f"<mdev:device uuid='{u}' type='{t}' parent='0000:af:00.0'/>"
                        for u, t in mdevs.items() if t is not None)
        meta = f"  <metadata><mdev:migration xmlns:mdev='{NS}'>{items}</mdev:migration></metadata>\n"
    return (f"<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{DOM_UUID}</uuid>\n{meta}"
            f"  <memory unit='KiB'>262144</memory>\n  <devices>\n{devs}  </devices>\n</domain>\n").encode()


@dataclass
class HookEnv:
    root: Path
    hook: Path
    config: Path
    runtime_dir: Path
    log_file: Path
    sysfs: Path
    store: Path
    sockdir: Path

    def call(self, op: str, sub: str, stdin: bytes, domain: str = "vm1",
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LC_ALL": "C"}
        return subprocess.run([str(self.hook), domain, op, sub, "-"], input=stdin, env=env,
                              capture_output=True, timeout=timeout, cwd="/", start_new_session=True)

    def write_config(self, **extra: str) -> None:
        lines = [f"sysfs_root = {self.sysfs}", f"runtime_dir = {self.runtime_dir}",
                 f"log_file = {self.log_file}", f"store = {self.store}",
                 f"migration_socket_dir = {self.sockdir}"]  # the UNIX guard: no nft in the root netns
        lines += [f"{k} = {v}" for k, v in extra.items()]
        self.config.write_text("[libvirt-mdev]\n" + "\n".join(lines) + "\n")

    def log_lines(self) -> list[str]:
        return self.log_file.read_text().splitlines() if self.log_file.exists() else []


@pytest.fixture
def hook_env(tmp_path: Path) -> HookEnv:
    root = tmp_path
    sysfs = root / "sys"
    make_fake_sysfs(sysfs, parents={PARENT: ["nvidia-222", "nvidia-223", "nvidia-224"]},
                    devices={U1: (PARENT, "nvidia-222"), U2: (PARENT, "nvidia-224")})
    hook, _ = install(root / "qemu.d", root / "etc" / "libvirt-mdev.conf")
    (root / "etc").mkdir()
    env = HookEnv(root=root, hook=hook, config=root / "etc" / "libvirt-mdev.conf",
                  runtime_dir=root / "run" / "libvirt-mdev", log_file=root / "hook.log",
                  sysfs=sysfs, store=root / "store", sockdir=root / "mig")
    (root / "run").mkdir()
    env.sockdir.mkdir(mode=0o750)
    env.sockdir.chmod(0o750)
    env.write_config()
    return env
