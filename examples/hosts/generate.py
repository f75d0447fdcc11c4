#!/usr/bin/env python3
"""Regenerate the example host files (run from the repository root): python3 examples/hosts/generate.py

Every host is a libvirt test-driver <node> file; the layout is documented in README.
"""
from __future__ import annotations

from pathlib import Path

U = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d00%02d"
OUT = Path(__file__).resolve().parent

#: (type id, human name); T4 types and one A100 type for the "other GPU" host
T4 = {"nvidia-222": "GRID T4-1B", "nvidia-223": "GRID T4-2B", "nvidia-224": "GRID T4-2B4", "nvidia-225": "GRID T4-4Q"}
A100 = {"nvidia-471": "GRID A100-4C"}


def uuid(n: int) -> str:
    return U % n


T4_PRODUCT = ("0x1eb8", "TU104GL [Tesla T4]")


def pci_parent(addr: str, types: dict[str, int], product: tuple[str, str] = T4_PRODUCT) -> tuple[str, str]:
    d, b, s_f = addr.split(":")
    s, f = s_f.split(".")
    name = f"pci_{d}_{b}_{s}_{f}"
    names = {**T4, **A100}
    ts = "\n".join(f"""        <type id='{t}'>
          <name>{names[t]}</name>
          <deviceAPI>vfio-pci</deviceAPI>
          <availableInstances>{a}</availableInstances>
        </type>""" for t, a in types.items())
    return name, f"""  <device>
    <name>{name}</name>
    <parent>computer</parent>
    <capability type='pci'>
      <class>0x030200</class>
      <domain>{int(d, 16)}</domain>
      <bus>{int(b, 16)}</bus>
      <slot>{int(s, 16)}</slot>
      <function>{int(f, 16)}</function>
      <product id='{product[0]}'>{product[1]}</product>
      <vendor id='0x10de'>NVIDIA Corporation</vendor>
      <capability type='mdev_types'>
{ts}
      </capability>
    </capability>
  </device>
"""


def mdev(n: int, parent_name: str, t: str) -> str:
    u = uuid(n)
    return f"""  <device>
    <name>mdev_{u.replace('-', '_')}_{parent_name[4:]}</name>
    <parent>{parent_name}</parent>
    <capability type='mdev'>
      <type id='{t}'/>
      <uuid>{u}</uuid>
      <iommuGroup number='{100 + n}'/>
    </capability>
  </device>
"""


def hostdev(n: int, slot: int) -> str:
    return f"""      <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
        <source>
          <address uuid='{uuid(n)}'/>
        </source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x{slot:02x}' function='0x0'/>
      </hostdev>
"""


def domain(name: str, num: int, devs: list[int], ann: list[tuple[int, str]] | None, parent_addr: str,
           extra: str = "", legacy: bool = False) -> str:
    """*ann*: (mdev number, type) per annotated device, at the guest address of that mdev in *devs*;
    *legacy* writes the annotation as before issue 17 (no address: matched by uuid)."""
    meta = ""
    if ann is not None:
        slot = {n: 5 + i for i, n in enumerate(devs)}
        addr = {n: "" if legacy else f"address='0000:00:{slot[n]:02x}.0' " for n in slot}
        items = "\n".join(f"        <mdev:device {addr[n]}uuid='{uuid(n)}' type='{t}' "
                          f"parent='{parent_addr}' device_api='vfio-pci'{extra}/>" for n, t in ann)
        meta = f"""    <metadata>
      <mdev:migration xmlns:mdev='urn:libvirt-mdev:metadata:1' host='source.example'>
{items}
      </mdev:migration>
    </metadata>
"""
    hd = "".join(hostdev(n, 5 + i) for i, n in enumerate(devs))
    return f"""  <domain type='test'>
    <name>{name}</name>
    <uuid>5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f40{num:02d}</uuid>
{meta}    <memory unit='MiB'>1024</memory>
    <vcpu>1</vcpu>
    <os>
      <type arch='x86_64' machine='pc'>hvm</type>
    </os>
    <devices>
{hd}    </devices>
  </domain>
"""


COMPUTER = """  <device>
    <name>computer</name>
    <capability type='system'>
      <hardware>
        <vendor>libvirt-mdev example</vendor>
        <version>1</version>
        <serial>0</serial>
        <uuid>0b6f8f6e-7a53-4d33-9a3c-0000000000{:02d}</uuid>
      </hardware>
      <firmware>
        <vendor>none</vendor>
        <version>1</version>
        <release_date>2026-12-01</release_date>
      </firmware>
    </capability>
  </device>
"""
SRC_PARENT = "0000:af:00.0"
DST_PARENT = "0000:3b:00.0"
VERSIONED = " driver='nvidia' driver_version='550.54.14' parent_model='10de:1eb8'"


def source() -> str:
    pname, pxml = pci_parent(SRC_PARENT, {"nvidia-222": 16, "nvidia-223": 8, "nvidia-224": 8, "nvidia-225": 4})
    mdevs = {1: "nvidia-222", 2: "nvidia-223", 3: "nvidia-222", 4: "nvidia-222", 5: "nvidia-222",
             6: "nvidia-223", 7: "nvidia-222", 8: "nvidia-223", 9: "nvidia-225", 10: "nvidia-222"}
    p = SRC_PARENT
    doms = [domain("demo", 1, [1, 2], [(1, "nvidia-222"), (2, "nvidia-223")], p, legacy=True),
            domain("demo-ok", 2, [3], [(3, "nvidia-222")], p),
            domain("demo-missing", 3, [4], [(4, "nvidia-222")], p),
            domain("demo-unannotated", 4, [5], None, p),
            domain("demo-plain", 5, [], None, p),
            domain("demo-unannotated-mismatch", 6, [6], None, p),
            domain("demo-unannotated-missing", 7, [7], None, p),
            domain("demo-creatable", 8, [8], [(8, "nvidia-223")], p),
            domain("demo-impossible", 9, [9], [(9, "nvidia-225")], p),
            domain("demo-versioned", 10, [10], [(10, "nvidia-222")], p, VERSIONED)]
    return _node("source", 1, "".join(doms), pxml + "".join(mdev(n, pname, t) for n, t in mdevs.items()))


def dest(kind: str) -> str:
    """The destinations: ``dest`` (the main example) and the four extra placement hosts."""
    doms = ""
    product = ("0x1eb8", "TU104GL [Tesla T4]")
    if kind == "dest":
        types = {"nvidia-222": 16, "nvidia-223": 8, "nvidia-224": 8, "nvidia-225": 0}
        mdevs = {1: "nvidia-222", 2: "nvidia-224", 3: "nvidia-222", 5: "nvidia-222", 6: "nvidia-224",
                 10: "nvidia-222", 11: "nvidia-222", 12: "nvidia-222"}
        doms = domain("tenant", 20, [11], None, DST_PARENT)  # 0011 is taken: never offered as free
    elif kind == "dest-same":  # the same uuids and types as the source: "demo" migrates as it is
        types = {"nvidia-222": 15, "nvidia-223": 7, "nvidia-224": 8, "nvidia-225": 4}
        mdevs = {1: "nvidia-222", 2: "nvidia-223"}
    elif kind == "dest-free":  # other uuids, free mdevs of the right types: an orchestrator remaps
        types = {"nvidia-222": 15, "nvidia-223": 7, "nvidia-224": 8, "nvidia-225": 4}
        mdevs = {21: "nvidia-222", 22: "nvidia-223"}
    elif kind == "dest-full":  # the right GPU, but every instance is used by other guests
        types = {"nvidia-222": 0, "nvidia-223": 0, "nvidia-224": 0, "nvidia-225": 0}
        mdevs = {31: "nvidia-222", 32: "nvidia-223"}
        doms = domain("tenant-a", 31, [31, 32], None, DST_PARENT)
    elif kind == "dest-a100":  # another GPU model: none of the T4 types exists here
        types = {"nvidia-471": 10}
        mdevs = {41: "nvidia-471"}
        product = ("0x20b5", "GA100 [A100 PCIe 80GB]")
    else:
        raise SystemExit(f"unknown host kind {kind}")
    pname, pxml = pci_parent(DST_PARENT, types, product)
    return _node(kind, 2, doms, pxml + "".join(mdev(n, pname, t) for n, t in mdevs.items()))


def _node(kind: str, num: int, doms: str, devices: str) -> str:
    return f"""<!-- libvirt test-driver host file ({kind} host of the libvirt-mdev example).
     Generated layout documented in examples/hosts/README; use as test:///ABSOLUTE/PATH/{kind}.xml -->
<node>
  <cpu>
    <mhz>3000</mhz>
    <model>x86_64</model>
    <active>2</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>2</cores>
    <threads>1</threads>
  </cpu>
  <memory>8388608</memory>
{doms}{COMPUTER.format(num)}{devices}</node>
"""


if __name__ == "__main__":
    (OUT / "source.xml").write_text(source())
    for k in ("dest", "dest-same", "dest-free", "dest-full", "dest-a100"):
        (OUT / f"{k}.xml").write_text(dest(k))
