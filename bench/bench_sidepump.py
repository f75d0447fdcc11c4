#!/usr/bin/env python3
"""The proxy's own cost per GiB of a multifd side channel, without QEMU: user and kernel CPU.

``bench/bench_proxy.py`` measures whole migrations, where both QEMUs share the host's
CPUs with the proxy; this one isolates the proxy's data path (``live/sidepump.py``) so
its cost can be split into what Python spends and what the kernel spends moving the
bytes.  K side channels, each: a writer process sends the channel init and N RAM
packets of 128 random 4 KiB pages (QEMU's framing, ``testkit/multifd.py``) into a
loopback TCP connection; this process pumps each channel in a thread of its own to a
UNIX socket (the destination's UNIX-socket layout) or a loopback TCP connection
(``--to tcp``); a reader process drains it.  Only this process's CPU is counted
(``getrusage``), so the writers' and readers' copies are not.

    python3 bench/bench_sidepump.py [--channels 4] [--mib 1024] [--to unix|tcp] [--copy] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libvirt_mdev.live.relay import tune  # noqa: E402
from libvirt_mdev.live.sidepump import RefuseDeviceState, SidePump  # noqa: E402
from testkit.multifd import channel_init, ram_packet  # noqa: E402

PAGES = 128
PAGE = 4096
VM_UUID = "12345678-1234-1234-1234-123456789abc"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server), tuned as the proxy tunes its sockets."""
    with socket.socket() as ls:
        tune(ls)
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        client = socket.socket()
        tune(client)
        client.connect(ls.getsockname())
        server, _ = ls.accept()
    return client, server


#: every socket this process opened: a child keeps only its own (a copy of another channel's end
#: held by a child would keep that channel from ever seeing its EOF)
OPEN: list[socket.socket] = []


def child(run: Callable[[], None], keep: socket.socket) -> int:
    """Fork; the child closes every socket but *keep*, runs *run* and exits without
    unwinding this process's state."""
    pid = os.fork()
    if pid == 0:
        try:
            for s in OPEN:
                if s is not keep:
                    s.close()
            run()
        finally:
            os._exit(0)
    return pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--mib", type=int, default=1024, help="page data per run, over all channels")
    ap.add_argument("--to", choices=("unix", "tcp"), default="unix", help="the socket towards the destination")
    ap.add_argument("--copy", action="store_true", help="the copy path (recv + sendmsg) instead of splice")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    packet = ram_packet("pc.ram", [i * PAGE for i in range(PAGES)], [os.urandom(PAGE) for _ in range(PAGES)])
    per_channel = max(1, (a.mib << 20) // (PAGES * PAGE) // a.channels)
    pumps, kids = [], []
    for k in range(a.channels):
        w, src = tcp_pair()
        if a.to == "unix":
            dst, r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            r, dst = tcp_pair()

        def write(w: socket.socket = w, k: int = k) -> None:
            w.sendall(channel_init(VM_UUID, k))
            for _ in range(per_channel):
                w.sendall(packet)
            w.close()

        def read(r: socket.socket = r) -> None:
            buf = bytearray(1 << 20)
            while r.recv_into(buf):
                pass

        OPEN.extend((w, src, dst, r))
        kids += [child(write, w), child(read, r)]
        w.close()
        r.close()
        pumps.append(SidePump(src, dst, RefuseDeviceState("bench"), zero_copy=not a.copy))

    def pump(p: SidePump) -> None:
        p.run()
        p.dst.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=pump, args=(p,)) for p in pumps]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for pid in kids:
        os.waitpid(pid, 0)
    gib = a.channels * per_channel * len(packet) / (1 << 30)
    out = {"channels": a.channels, "to": a.to, "path": "copy" if a.copy else "splice",
           "spliced_gib": round(sum(p.spliced for p in pumps) / (1 << 30), 3),
           "user_s_per_gib": round((r1.ru_utime - r0.ru_utime) / gib, 3),
           "sys_s_per_gib": round((r1.ru_stime - r0.ru_stime) / gib, 3),
           "wall_s_per_gib": round((t1 - t0) / gib, 3),
           "context_switches_per_packet": round((r1.ru_nvcsw - r0.ru_nvcsw + r1.ru_nivcsw - r0.ru_nivcsw)
                                                / (a.channels * per_channel), 2)}
    out["cpu_s_per_gib"] = round(out["user_s_per_gib"] + out["sys_s_per_gib"], 3)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['channels']} channel(s) to {out['to']}, {out['path']}: {out['cpu_s_per_gib']} CPU-s/GiB "
              f"(user {out['user_s_per_gib']}, kernel {out['sys_s_per_gib']}), wall {out['wall_s_per_gib']} s/GiB, "
              f"{out['context_switches_per_packet']} context switches per packet")


if __name__ == "__main__":
    main()
