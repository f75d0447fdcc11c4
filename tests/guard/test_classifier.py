"""The endpoint classifier and its inputs (/proc parsing, device sockets, qemu.conf,
nft JSON), as pure functions."""
from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_mdev.config import Config
from libvirt_mdev.errors import GuardError
from libvirt_mdev.live.endpoint import (
    DeviceSockets,
    GuardView,
    Listener,
    classify,
    device_sockets,
    parse_proc_tcp,
    parse_proc_unix,
)
from libvirt_mdev.live.guard import guarded_ports, merge_ranges, missing_ports, parse_nft_guard, read_qemu_conf

SOCKDIR = Path("/run/libvirt/mig")
NFT = GuardView(nft_ports=((49152, 49215), (49300, 49300)), socket_dir=SOCKDIR, socket_dir_problem=None)
NONE = DeviceSockets()


def lst(spec: str) -> Listener:
    if spec.startswith("unix:"):
        return Listener("unix", path=spec[5:])
    host, port = spec.rsplit(":", 1)
    return Listener("tcp", host.strip("[]"), int(port))


@pytest.mark.parametrize("spec", ["127.0.0.1:49152", "127.0.0.5:49215", "::1:49300", "unix:/run/libvirt/mig/x.sock"])
def test_guarded_endpoints_pass(spec: str) -> None:
    assert classify([lst(spec)], NONE, NFT) is None


@pytest.mark.parametrize("spec,words", [
    ("0.0.0.0:49152", ["0.0.0.0:49152", "reachable without the proxy", "--listen-address 127.0.0.1"]),
    ("[::]:49152", ["[::]:49152", "reachable without the proxy"]),
    ("10.0.0.2:49152", ["10.0.0.2:49152", "reachable without the proxy"]),
    ("127.0.0.1:50000", ["127.0.0.1:50000", "does not cover", "guard_ports"]),
    ("unix:/run/other/x.sock", ["/run/other/x.sock", "not inside /run/libvirt/mig"]),
    ("unix:/run/libvirt/mig/sub/x.sock", ["not inside /run/libvirt/mig"]),
    ("unix:@abstract", ["@abstract"]),
])
def test_unguarded_endpoints_refused_in_one_line(spec: str, words: list[str]) -> None:
    line = classify([lst(spec)], NONE, NFT)
    assert line is not None and "\n" not in line
    for w in words:
        assert w in line, line


def test_no_listener_is_refused_naming_the_fix() -> None:
    line = classify([], NONE, NFT)
    assert line is not None and "no listening migration socket" in line and "--migrateuri" in line


def test_device_sockets_are_not_endpoints_but_do_not_hide_one() -> None:
    monitor = lst("unix:/var/lib/libvirt/qemu/domain-1-vm/monitor.sock")
    vnc = lst("127.0.0.1:5900")
    dev = DeviceSockets(tcp_any_port=frozenset({5900}))
    assert classify([monitor, vnc], dev, NFT) is not None  # only device sockets: no endpoint
    assert classify([monitor, vnc, lst("127.0.0.1:49152")], dev, NFT) is None
    assert "0.0.0.0:49153" in (classify([monitor, vnc, lst("0.0.0.0:49153")], dev, NFT) or "")
    # the graphics port on another address than the XML's is an endpoint, and is judged
    dev2 = DeviceSockets(tcp=frozenset({("127.0.0.1", 5900)}))
    assert "10.0.0.2:5900" in (classify([lst("10.0.0.2:5900"), lst("127.0.0.1:5900")], dev2, NFT) or "")


def test_unix_guard_missing_or_broken() -> None:
    ep = [lst("unix:/run/libvirt/mig/x.sock")]
    broken = GuardView(nft_ports=(), socket_dir=SOCKDIR,
                       socket_dir_problem="migration_socket_dir X has mode 0777")
    assert "mode 0777" in (classify(ep, NONE, broken) or "")
    unset = GuardView()
    assert "not set" in (classify(ep, NONE, unset) or "")
    assert "no nftables guard" in (classify([lst("127.0.0.1:49152")], NONE, unset) or "")


def test_device_sockets_from_domain_xml() -> None:
    xml = b"""<domain type='qemu'><name>vm</name><devices>
      <graphics type='vnc' port='5901' autoport='yes' listen='0.0.0.0'>
        <listen type='address' address='0.0.0.0'/></graphics>
      <graphics type='spice' port='5902' tlsPort='5903'/>
      <channel type='unix'>
        <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x.org.qemu.guest_agent.0'/></channel>
      <serial type='unix'><source mode='bind' path='/srv/console.sock'/></serial>
    </devices></domain>"""
    d = device_sockets(xml)
    assert ("0.0.0.0", 5901) in d.tcp and {5902, 5903} <= d.tcp_any_port
    assert "/srv/console.sock" in d.unix


def test_proc_net_parsing() -> None:
    tcp = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
           "   0: 0100007F:C000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
           "   1: 00000000:C001 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 112 1\n"
           "   2: 0100007F:C002 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 113 1\n"
           "   3: 0200000A:C003 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1\n")
    assert parse_proc_tcp(tcp, {111, 112, 113}) == [Listener("tcp", "127.0.0.1", 49152),
                                                     Listener("tcp", "0.0.0.0", 49153)]
    tcp6 = ("  sl  local_address                         remote_address                        st ...\n"
            "   0: 00000000000000000000000001000000:C000 00000000000000000000000000000000:0000 0A "
            "00000000:00000000 00:00000000 00000000     0        0 7 1\n")
    assert parse_proc_tcp(tcp6, {7}) == [Listener("tcp", "::1", 49152)]
    unix = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 21 /run/libvirt/mig/x.sock\n"
            "0000000000000000: 00000002 00000000 00000000 0001 03 22 /run/connected.sock\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 23 @abstract\n")
    assert parse_proc_unix(unix, {21, 22, 23}) == [Listener("unix", path="/run/libvirt/mig/x.sock"),
                                                    Listener("unix", path="@abstract")]


def test_qemu_conf_port_range_and_group(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    assert read_qemu_conf(conf).port_min == 49152  # missing: libvirt's defaults
    conf.write_text('#migration_port_min = 1\nmigration_port_min = 50000\n migration_port_max=50010\n'
                    'group = "kvm"\n')
    qc = read_qemu_conf(conf)
    assert (qc.port_min, qc.port_max, qc.group) == (50000, 50010, "kvm")
    cfg = Config(qemu_conf=conf, guard_ports=((49300, 49300), (50005, 50020)))
    assert guarded_ports(cfg) == ((49300, 49300), (50000, 50020))
    conf.write_text("migration_port_min = 60000\nmigration_port_max = 50000\n")
    with pytest.raises(GuardError, match="not valid"):
        read_qemu_conf(conf)


def test_port_range_arithmetic() -> None:
    assert merge_ranges([(5, 9), (1, 3), (4, 4), (20, 30)]) == ((1, 9), (20, 30))
    assert missing_ports(((49152, 49200),), ((49152, 49215), (49300, 49300))) == ((49201, 49215), (49300, 49300))
    assert missing_ports(((1, 65535),), ((49152, 49215),)) == ()


def _rule(*exprs: dict) -> dict:
    return {"rule": {"family": "inet", "table": "libvirt_mdev", "chain": "output", "expr": list(exprs)}}


LO = {"match": {"op": "==", "left": {"meta": {"key": "oif"}}, "right": "lo"}}
DPORT = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": "@guarded_ports"}}
NEW = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}
UID = {"match": {"op": "!=", "left": {"meta": {"key": "skuid"}}, "right": 0}}
REJECT = {"reject": {"type": "tcp reset"}}
BASE = [{"table": {"family": "inet", "name": "libvirt_mdev"}},
        {"set": {"name": "guarded_ports", "elem": [{"range": [49152, 49215]}, 49300]}},
        {"chain": {"name": "output", "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}]


def test_nft_checker_accepts_only_the_full_rule() -> None:
    ok = parse_nft_guard([*BASE, _rule(LO, DPORT, NEW, UID, {"counter": {}}, REJECT)])
    assert ok.effective and ok.ports == ((49152, 49215), (49300, 49300))
    assert not parse_nft_guard(None).present
    for missing in (LO, NEW, UID, REJECT):
        exprs = [e for e in (LO, DPORT, NEW, UID, REJECT) if e is not missing]
        assert not parse_nft_guard([*BASE, _rule(*exprs)]).effective, missing
    narrower = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.9.9.9"}}
    assert not parse_nft_guard([*BASE, _rule(LO, DPORT, NEW, UID, narrower, REJECT)]).effective
    wrong_hook = [*BASE[:2], {"chain": {"name": "output", "type": "filter", "hook": "input"}}]
    assert not parse_nft_guard([*wrong_hook, _rule(LO, DPORT, NEW, UID, REJECT)]).effective


def test_guest_name_matching_respects_qemu_comma_escaping() -> None:
    from libvirt_mdev.live.endpoint import _names_guest

    def opt(domain: str) -> bytes:
        return f"guest={domain.replace(',', ',,')}".encode()

    assert _names_guest(b"guest=vm1,debug-threads=on", opt("vm1"))
    assert _names_guest(b"guest=vm1", opt("vm1"))
    assert not _names_guest(b"guest=vm10,debug-threads=on", opt("vm1"))
    assert not _names_guest(b"guest=a,,b,debug-threads=on", opt("a"))
    assert _names_guest(b"guest=a,,b,debug-threads=on", opt("a,b"))
    assert _names_guest(b"guest=a,,,debug-threads=on", opt("a,"))
