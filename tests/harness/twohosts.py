"""Two private libvirt hosts, each in its own network + UTS namespace, joined by a veth pair (docs/testing.md).

From the root namespace virsh reaches both daemons through their UNIX sockets, so a plain (non-p2p)
`virsh -c A migrate --live DOM B --migrateuri tcp://<B addr>:<port>` is a real cross-"host" migration: A's
libvirtd dials B's QEMU over the veth. Names carry the pid and a counter so parallel sessions never collide; the
10.213.<n>.0/24 addresses exist only inside these namespaces.
"""
from __future__ import annotations

import atexit
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._proc import HarnessError, run, terminate
from .libvirt_host import HookFile, LibvirtHost, pids_in_netns

DEFAULT_MIGRATION_PORT = 49152
_counter = itertools.count()


@dataclass
class TwoHosts:
    """Hosts `a` and `b` (LibvirtHost) after start(); stop() removes daemons, guests and namespaces.

    hooks/extra_files apply to both hosts; hooks_a/hooks_b and extra_files_a/extra_files_b to one.
    """

    base_dir: Path
    hooks: Sequence[HookFile] = ()
    hooks_a: Sequence[HookFile] = ()
    hooks_b: Sequence[HookFile] = ()
    extra_files: Mapping[str, str | bytes] = field(default_factory=dict)
    extra_files_a: Mapping[str, str | bytes] = field(default_factory=dict)
    extra_files_b: Mapping[str, str | bytes] = field(default_factory=dict)
    tag: str = field(init=False)
    subnet: int = field(init=False)
    a: LibvirtHost = field(init=False)
    b: LibvirtHost = field(init=False)
    start_seconds: float = field(init=False, default=0.0)
    _netns: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        seq = next(_counter)
        # veth names are limited to 15 characters: "lm" + pid (<= 7 digits) + seq + side letter + "v".
        self.tag = f"lm{os.getpid()}{seq}"
        self.subnet = 1 + (os.getpid() * 7 + seq) % 250
        self.a = self._host("A", 1, self.hooks_a, self.extra_files_a)
        self.b = self._host("B", 2, self.hooks_b, self.extra_files_b)

    def _host(self, side: str, octet: int, hooks: Sequence[HookFile],
              extra: Mapping[str, str | bytes]) -> LibvirtHost:
        return LibvirtHost(
            name=side, base_dir=Path(self.base_dir), netns=self.netns_name(side), address=self.address(side),
            hooks=[*self.hooks, *hooks], extra_files={**self.extra_files, **extra},
            hostname=f"lm{side}", hosts_entries={"lmA": self.address("A"), "lmB": self.address("B")})

    def netns_name(self, side: str) -> str:
        return f"{self.tag}{side.lower()}"

    def address(self, side: str) -> str:
        return f"10.213.{self.subnet}.{1 if side == 'A' else 2}"

    def __enter__(self) -> TwoHosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create the namespaces and veth, then start both daemons in parallel (each waits for readiness)."""
        started = time.monotonic()
        try:
            self._network_up()
            self._start_hosts()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)  # namespaces must not outlive an interrupted run
        self.start_seconds = time.monotonic() - started

    def _network_up(self) -> None:
        veth = {side: f"{self.tag}{side.lower()}v" for side in "AB"}
        for side in "AB":
            run(["ip", "netns", "add", self.netns_name(side)])
            self._netns.append(self.netns_name(side))
        run(["ip", "link", "add", veth["A"], "type", "veth", "peer", "name", veth["B"]])
        for side in "AB":
            ns = self.netns_name(side)
            run(["ip", "link", "set", veth[side], "netns", ns])
            run(["ip", "-n", ns, "addr", "add", f"{self.address(side)}/24", "dev", veth[side]])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", veth[side], "up"])

    def _start_hosts(self) -> None:
        errors: list[BaseException] = []

        def start(host: LibvirtHost) -> None:
            try:
                host.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(h,)) for h in (self.a, self.b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Stop both hosts, kill anything left in our namespaces, delete them (which also removes the veth)."""
        for host in (self.a, self.b):
            try:
                host.stop()
            except HarnessError:
                pass  # best effort: the namespace sweep below catches what is left
        for ns in self._netns:
            terminate(pids_in_netns(ns), timeout=5.0)
            run(["ip", "netns", "del", ns], check=False)
        self._netns.clear()
        atexit.unregister(self.stop)

    def host(self, side: str) -> LibvirtHost:
        return self.a if side.upper() == "A" else self.b

    def migrate(self, domain: str, *extra_args: str, src: str = "A", port: int | None = DEFAULT_MIGRATION_PORT,
                migrateuri: str | None = None, p2p: bool = False, check: bool = True,
                timeout: float = 180.0) -> subprocess.CompletedProcess:
        """`virsh -c SRC migrate --live DOMAIN DST --migrateuri tcp://<DST addr>:<port> EXTRA...`.

        Pass migrateuri to override (e.g. a proxy's address or a unix:// path under /run/libvirt/mig), or
        port=None and migrateuri=None to let the destination advertise its own. p2p=True makes the source daemon
        talk to the destination's TCP listener (qemu+tcp://<addr>/system) itself, from inside its namespace.
        """
        source, dest = (self.a, self.b) if src.upper() == "A" else (self.b, self.a)
        args = ["migrate", "--live", *(["--p2p"] if p2p else []), domain, dest.tcp_uri if p2p else dest.uri]
        if migrateuri is None and port is not None:
            migrateuri = f"tcp://{dest.address}:{port}"
        if migrateuri is not None:
            args += ["--migrateuri", migrateuri]
        return source.virsh(*args, *extra_args, check=check, timeout=timeout)

    def wait_listening(self, side: str, port: int, timeout: float = 10.0) -> None:
        """Wait until something listens on TCP *port* inside the host's network namespace (e.g. a proxy)."""
        host = self.host(side)
        deadline = time.monotonic() + timeout
        while not host.run_in_ns(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
            if time.monotonic() > deadline:
                raise HarnessError(f"nothing listens on port {port} on host {side} after {timeout:.0f}s")
            time.sleep(0.05)
