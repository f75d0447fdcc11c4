#!/usr/bin/env python3
"""Regenerate source.xml and dest.xml (run from the repository root): python3 examples/hosts/generate.py"""
import textwrap
U = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d00%02d"
def uuid(n): return U % n
def pci_parent(addr, types):
    d, b, s_f = addr.split(":")[0], addr.split(":")[1], addr.split(":")[2]
    s, f = s_f.split(".")
    name = "pci_%s_%s_%s_%s" % (d, b, s, f)
    ts = "\n".join(f"""        <type id='{t}'>
          <name>{n}</name>
          <deviceAPI>vfio-pci</deviceAPI>
          <availableInstances>{a}</availableInstances>
        </type>""" for t, n, a in types)
    return name, f"""  <device>
    <name>{name}</name>
    <parent>computer</parent>
    <capability type='pci'>
      <class>0x030200</class>
      <domain>{int(d,16)}</domain>
      <bus>{int(b,16)}</bus>
      <slot>{int(s,16)}</slot>
      <function>{int(f,16)}</function>
      <product id='0x1eb8'>TU104GL [Tesla T4]</product>
      <vendor id='0x10de'>NVIDIA Corporation</vendor>
      <capability type='mdev_types'>
{ts}
      </capability>
    </capability>
  </device>
"""
def mdev(n, parent_name, t, group):
    u = uuid(n)
    return f"""  <device>
    <name>mdev_{u.replace('-', '_')}_{parent_name[4:]}</name>
    <parent>{parent_name}</parent>
    <capability type='mdev'>
      <type id='{t}'/>
      <uuid>{u}</uuid>
      <iommuGroup number='{group}'/>
    </capability>
  </device>
"""
def hostdev(n, slot):
    return f"""      <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
        <source>
          <address uuid='{uuid(n)}'/>
        </source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x{slot:02x}' function='0x0'/>
      </hostdev>
"""
def domain(name, num, devs, ann, parent_addr):
    meta = ""
    if ann:
        items = "\n".join(f"        <mdev:device uuid='{uuid(n)}' type='{t}' parent='{parent_addr}' device_api='vfio-pci'/>" for n, t in ann)
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
        <uuid>%s</uuid>
      </hardware>
      <firmware>
        <vendor>none</vendor>
        <version>1</version>
        <release_date>2026-12-01</release_date>
      </firmware>
    </capability>
  </device>
"""
TYPES = [("nvidia-222", "GRID T4-1B", 16), ("nvidia-223", "GRID T4-2B", 8), ("nvidia-224", "GRID T4-2B4", 8)]
def host(kind):
    if kind == "source":
        paddr = "0000:af:00.0"
        pname, pxml = pci_parent(paddr, TYPES)
        mdevs = [(1, "nvidia-222"), (2, "nvidia-223"), (3, "nvidia-222"), (4, "nvidia-222"), (5, "nvidia-222")]
        doms = [domain("demo", 1, [1, 2], [(1, "nvidia-222"), (2, "nvidia-223")], paddr),
                domain("demo-ok", 2, [3], [(3, "nvidia-222")], paddr),
                domain("demo-missing", 3, [4], [(4, "nvidia-222")], paddr),
                domain("demo-unannotated", 4, [5], None, paddr),
                domain("demo-plain", 5, [], None, paddr)]
        huuid = "0b6f8f6e-7a53-4d33-9a3c-000000000001"
    else:
        paddr = "0000:3b:00.0"
        pname, pxml = pci_parent(paddr, TYPES)
        mdevs = [(1, "nvidia-222"), (2, "nvidia-224"), (3, "nvidia-222"), (5, "nvidia-222")]
        doms = []
        huuid = "0b6f8f6e-7a53-4d33-9a3c-000000000002"
    body = "".join(doms) + COMPUTER % huuid + pxml + "".join(mdev(n, pname, t, 100 + n) for n, t in mdevs)
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
{body}</node>
"""

for k in ("source", "dest"):
    open(f"examples/hosts/{k}.xml", "w").write(host(k))
