"""A private libvirt "host": its own libvirtd + virtlogd with their own /etc, /run, /var/lib, /var/log, /var/cache.

Follows docs/testing.md ("Harness facts", which lists the pitfalls cited here by number): the daemons run inside
`unshare --mount --propagation private` with the per-host directories bind-mounted over the stock paths, so the
stock config, socket names and hook locations all apply while the machine's real libvirt (and other sessions'
private hosts) stay untouched. Everything lives under one base dir. Works the same inside a chroot (pitfalls 11-13).
"""
from __future__ import annotations

import atexit
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import caps_cache as _caps
from ._proc import HarnessError, pid_alive, read_pid, run, tail, terminate

# The stock paths a host gets its own copy of, and the per-host sub-directory that backs each one.
BIND_MOUNTS: tuple[tuple[str, str], ...] = (
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("etc", "/etc/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
)
# What the stock /etc/libvirt may carry from the real host that must not leak into a test host (pitfall 4).
PRUNE_GLOBS: tuple[str, ...] = ("qemu/*.xml", "qemu/autostart", "qemu/networks/autostart/*", "hooks/*")
# The capability probe of two QEMU binaries takes ~8 s; a bound well above it still catches a hung daemon.
READY_TIMEOUT = 60.0
# Migration and hook decisions at debug level, the rest at libvirt's default (warnings): enough to debug a
# failed migration from the log without drowning it.
DEFAULT_LOG_FILTERS = "1:qemu.qemu_migration 1:util.hook"


@dataclass(frozen=True)
class HookFile:
    """An executable to install as `etc/hooks/qemu.d/<name>` before the daemon starts (pitfall 8).

    Give either *content* (script text or bytes) or *source* (a file to copy).
    """

    name: str
    content: str | bytes | None = None
    source: Path | None = None

    def data(self) -> bytes:
        if self.source is not None:
            return Path(self.source).read_bytes()
        if self.content is None:
            raise HarnessError(f"hook {self.name!r} has neither content nor source")
        return self.content.encode() if isinstance(self.content, str) else self.content


def logging_hook(name: str = "10-log", log: str = "/var/log/libvirt/hooks.log") -> HookFile:
    """A hook that drains stdin (libvirt requires it) and appends its argv to *log*; prints nothing (pitfall 8)."""
    script = f"""#!/bin/sh
cat >/dev/null
echo "$*" >> {shlex.quote(log)}
"""
    return HookFile(name=name, content=script)


@dataclass
class LibvirtHost:
    """One private libvirt host. Use as a context manager, or call start()/stop().

    netns/address: run inside an existing network namespace (created by the caller) and listen on TCP there.
    hostname/hosts_entries: give the host its own UTS name and an /etc/hosts with extra "address name" lines.
    extra_files: in-namespace absolute path (under one of the bind-mounted dirs) -> content, placed before start.
    """

    name: str
    base_dir: Path
    netns: str | None = None
    address: str | None = None
    hooks: Sequence[HookFile] = ()
    extra_files: Mapping[str, str | bytes] = field(default_factory=dict)
    hostname: str | None = None
    hosts_entries: Mapping[str, str] = field(default_factory=dict)
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    caps_cache: Path | None = field(default_factory=_caps.default_caps_cache)
    warm_caps: bool = True
    log_filters: str = DEFAULT_LOG_FILTERS
    root: Path = field(init=False)
    _pids: dict[str, int] = field(init=False, default_factory=dict)
    # Daemon pids of the last start(), kept after stop() so tests can check nothing outlived it.
    launched_pids: dict[str, int] = field(init=False, default_factory=dict)
    start_seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.root = Path(self.base_dir) / self.name

    # ----- paths -------------------------------------------------------------------------------------------
    @property
    def etc_dir(self) -> Path:
        return self.root / "etc"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def hooks_dir(self) -> Path:
        return self.etc_dir / "hooks" / "qemu.d"

    @property
    def libvirtd_log(self) -> Path:
        return self.log_dir / "libvirtd.log"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.run_dir}/libvirt-sock"

    @property
    def tcp_uri(self) -> str | None:
        """URI for p2p migrations, resolved by the source daemon inside its own namespace."""
        return f"qemu+tcp://{self.address}/system" if self.address else None

    @property
    def libvirtd_pid(self) -> int | None:
        return self._pids.get("libvirtd")

    def host_path(self, ns_path: str) -> Path:
        """Map a path as the daemon sees it (e.g. /var/log/libvirt/hooks.log) to the real per-host path."""
        for sub, mount in BIND_MOUNTS:
            if ns_path == mount or ns_path.startswith(mount + "/"):
                return self.root / sub / ns_path[len(mount):].lstrip("/")
        raise HarnessError(f"{ns_path} is not under a per-host directory of {self.name}")

    # ----- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> LibvirtHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def prepare(self) -> None:
        """Create the per-host tree: pruned copy of /etc/libvirt, config additions, hooks and extra files."""
        if self.etc_dir.exists():
            shutil.rmtree(self.etc_dir)
        shutil.copytree("/etc/libvirt", self.etc_dir, symlinks=True)
        for pattern in PRUNE_GLOBS:
            for victim in self.etc_dir.glob(pattern):
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                else:
                    victim.unlink()
        for sub, _ in BIND_MOUNTS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.run_dir / "mig").mkdir(exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            # A stale pid file from an earlier run could make stop() signal an unrelated, reused pid.
            (self.run_dir / f"{daemon}.pid").unlink(missing_ok=True)
        self._append(self.etc_dir / "qemu.conf", self._qemu_conf())
        self._append(self.etc_dir / "libvirtd.conf", self._libvirtd_conf())
        self.hooks_dir.mkdir(parents=True, exist_ok=True)
        for hook in self.hooks:
            path = self.hooks_dir / hook.name
            path.write_bytes(hook.data())
            path.chmod(0o755)
        for ns_path, content in self.extra_files.items():
            target = self.host_path(ns_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        if self.hostname:
            hosts = Path("/etc/hosts").read_text()
            extra = "".join(f"{addr} {name}\n" for name, addr in self.hosts_entries.items())
            (self.root / "hosts").write_text(hosts.rstrip("\n") + "\n" + extra)

    def start(self) -> None:
        """Prepare the tree, start virtlogd + libvirtd in a private mount namespace, wait until libvirtd answers.

        With warm_caps the QEMU capability probe happens here (not in the first define) so start_seconds and
        later timings mean what they say.
        """
        started = time.monotonic()
        self.prepare()
        _caps.seed(self.caps_cache, self.root)
        for _, mount in BIND_MOUNTS:
            # Bind-mount targets must exist; /run/libvirt is missing when no stock daemon ever ran here.
            Path(mount).mkdir(parents=True, exist_ok=True)
        try:
            self._launch()
            self._wait_ready(started + READY_TIMEOUT)
            if self.warm_caps:
                self.virsh("capabilities", timeout=READY_TIMEOUT)
                _caps.harvest(self.root, self.caps_cache, self.name)
        except BaseException:
            self.stop()  # whatever did start (often virtlogd) must not outlive a failed start
            raise
        # Safety net for an interrupted test run: daemons and guests must not outlive the Python process.
        atexit.register(self.stop)
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Destroy running domains, stop their QEMUs, then libvirtd and virtlogd; safe to call twice."""
        if not self._pids:
            return
        libvirtd = self._pids.get("libvirtd")
        if libvirtd and pid_alive(libvirtd):
            self._destroy_all()
        qemu_dir = self.run_dir / "qemu"
        qemus = [read_pid(p) for p in qemu_dir.glob("*.pid") if p.name != "driver.pid"] if qemu_dir.exists() else []
        terminate([p for p in qemus if p], timeout=10.0)
        terminate([p for p in (self._pids.get("libvirtd"), self._pids.get("virtlogd")) if p], timeout=15.0)
        self._pids.clear()
        atexit.unregister(self.stop)

    # ----- talking to it -----------------------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True, timeout: float = 180.0) -> subprocess.CompletedProcess:
        """Run `virsh -c <uri> ARGS` from the root namespace (the client needs only the UNIX socket)."""
        return run(["virsh", "-c", self.uri, *args], check=check, timeout=timeout)

    def libvirt_connect(self):  # -> libvirt.virConnect (import kept lazy so the module imports without libvirt)
        import libvirt

        return libvirt.open(self.uri)

    def domstate(self, domain: str) -> str:
        return self.virsh("domstate", domain).stdout.strip()

    def bios_ticks(self, domain: str) -> int:
        """The guest's BIOS tick counter (dword at guest-physical 0x46c), read through HMP `xp`.

        SeaBIOS's timer interrupt handler increments it 18.2 times a second, so it grows only while guest code
        really executes on this host. vCPU time from /proc is no proof: it is sampled per scheduler tick and an
        idle, mostly halted TCG vCPU can show 0 ns for many seconds on a loaded machine.
        """
        out = self.virsh("qemu-monitor-command", "--hmp", domain, "xp /1wx 0x46c").stdout
        match = re.search(r"046c:\s*(0x[0-9a-fA-F]+)", out)
        if not match:
            raise HarnessError(f"host {self.name}: no BIOS tick counter in HMP output for {domain}: {out.strip()!r}")
        return int(match.group(1), 16)

    def wait_guest_executes(self, domain: str, timeout: float = 10.0) -> None:
        """Prove the guest really runs here: libvirt and QEMU say running and the guest's timer handler runs.

        The tick counter moves every 55 ms while the guest executes, so this normally returns within 0.1-0.2 s.
        """
        state = self.domstate(domain)
        if state != "running":
            raise HarnessError(f"host {self.name}: domain {domain} is {state!r}, not running")
        status = self.virsh("qemu-monitor-command", "--hmp", domain, "info status").stdout
        if "VM status: running" not in status:
            raise HarnessError(f"host {self.name}: QEMU of {domain} says {status.strip()!r}")
        before = self.bios_ticks(domain)
        deadline = time.monotonic() + timeout
        while self.bios_ticks(domain) == before:
            if time.monotonic() > deadline:
                raise HarnessError(f"host {self.name}: guest {domain} did not execute for {timeout:.0f}s "
                                   f"(BIOS tick counter stuck at {before:#x})")
            time.sleep(0.1)

    def nsenter_args(self, *, net: bool = True, uts: bool = True) -> list[str]:
        """Prefix that runs a command in this host's mount (and net/UTS) namespaces, as libvirtd sees them."""
        pid = self._pids.get("libvirtd")
        if not pid or not pid_alive(pid):
            raise HarnessError(f"host {self.name} is not running; start() it before entering its namespaces")
        # -r: the root directory of libvirtd too. Without it nsenter lands at the mount namespace's real root,
        # which is outside the Debian 13 root CI runs the newer target in (docs/ci.md); on a plain host it is "/".
        args = ["nsenter", "-t", str(pid), "-m", "-r"]
        if net and self.netns:
            args.append("-n")
        if uts and self.hostname:
            args.append("-u")
        return [*args, "--"]

    def run_in_ns(self, args: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run a command "on this host" (its mounts, network and hostname) and wait for it."""
        return run([*self.nsenter_args(), *args], **kw)

    def popen_in_ns(self, args: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running command "on this host" (e.g. a migration proxy); the caller stops it."""
        return subprocess.Popen([*self.nsenter_args(), *args], **kw)

    # ----- internals ---------------------------------------------------------------------------------------
    def _qemu_conf(self) -> str:
        # Pitfall 3: /dev/kvm is root-only here, so QEMU as libvirt-qemu makes every capability lookup re-probe.
        conf = 'user = "root"\ngroup = "root"\ncgroup_controllers = [ ]\n'
        if in_chroot():
            # libvirt's per-domain /dev (the "mount" namespace) has no working /dev/pts inside a chroot: QEMU
            # fails with "-chardev pty: Failed to create PTY" (docs/testing.md). On a host the default stays.
            conf += "namespaces = [ ]\n"
        return conf

    def _libvirtd_conf(self) -> str:
        lines = [
            f'host_uuid = "{self.host_uuid}"',
            f'log_filters = "{self.log_filters}"',
            'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"',
            'auth_unix_rw = "none"',
        ]
        if self.address:
            lines += ["listen_tls = 0", "listen_tcp = 1", f'listen_addr = "{self.address}"', 'auth_tcp = "none"']
        return "\n".join(lines) + "\n"

    @staticmethod
    def _append(path: Path, text: str) -> None:
        with path.open("a") as fh:
            fh.write("\n# added by tests.harness\n" + text)

    def _launch_command(self) -> list[str]:
        script = ["set -e"]
        if self.hostname:
            script.append(f"hostname {shlex.quote(self.hostname)}")
        for sub, mount in BIND_MOUNTS:
            script.append(f"mount --bind {shlex.quote(str(self.root / sub))} {mount}")
        if self.hostname:
            script.append(f"mount --bind {shlex.quote(str(self.root / 'hosts'))} /etc/hosts")
        # Pitfall 1: the default pid files live in the shared /run and belong to the stock daemons.
        script.append("virtlogd -d -p /run/libvirt/virtlogd.pid")
        # Pinned to CPU 0: the host CPUID libvirt records differs between the two CPUs here, which made a shared
        # capability cache "outdated" half the time (8 s re-probe). libvirt still gives each QEMU all host CPUs.
        script.append("taskset -c 0 libvirtd -d " + ("-l " if self.address else "") + "-p /run/libvirt/libvirtd.pid")
        cmd = ["unshare", "--mount", "--propagation", "private"]
        if self.hostname:
            cmd.append("--uts")
        cmd += ["--", "bash", "-c", "\n".join(script)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def _launch(self) -> None:
        proc = run(self._launch_command(), check=False, timeout=READY_TIMEOUT)
        for daemon in ("virtlogd", "libvirtd"):
            pid = read_pid(self.run_dir / f"{daemon}.pid")
            if pid is not None:
                self._pids[daemon] = self.launched_pids[daemon] = pid
        if proc.returncode != 0:
            raise HarnessError(f"host {self.name}: daemon launch failed (rc={proc.returncode}): "
                               f"{proc.stderr.strip()}\nlibvirtd.log tail:\n{tail(self.libvirtd_log)}")
        for daemon in ("virtlogd", "libvirtd"):
            if daemon not in self._pids:
                raise HarnessError(f"host {self.name}: {daemon} wrote no pid file\n{tail(self.libvirtd_log)}")

    def _wait_ready(self, deadline: float) -> None:
        sock = self.run_dir / "libvirt-sock"
        last_err = ""
        while time.monotonic() < deadline:
            libvirtd = self._pids["libvirtd"]
            if not pid_alive(libvirtd):
                raise HarnessError(f"host {self.name}: libvirtd (pid {libvirtd}) exited during start-up; log tail:\n"
                                   f"{tail(self.libvirtd_log)}")
            if sock.exists():
                remaining = max(1.0, deadline - time.monotonic())
                proc = run(["virsh", "-c", self.uri, "uri"], check=False, timeout=remaining)
                if proc.returncode == 0:
                    return
                last_err = proc.stderr.strip()
            time.sleep(0.1)
        raise HarnessError(f"host {self.name}: libvirtd did not answer on {sock} within {READY_TIMEOUT:.0f}s "
                           f"({last_err or 'no socket'}); log tail:\n{tail(self.libvirtd_log)}")

    def _destroy_all(self) -> None:
        proc = self.virsh("list", "--name", "--state-running", "--state-paused", check=False, timeout=30)
        for dom in filter(None, (line.strip() for line in proc.stdout.splitlines())):
            self.virsh("destroy", dom, check=False, timeout=30)


def in_chroot(mountinfo: str | None = None) -> bool:
    """True when this process runs chrooted (as CI's Debian 13 target does).

    Read from /proc/self/mountinfo (or the given text), not by comparing "/" with /proc/1/root, which a container
    may refuse even to root: a chroot's "/" is either no mount point at all or a mount whose root inside its
    filesystem is not "/".
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return False
    roots = [fields[3] for fields in (line.split() for line in mountinfo.splitlines())
             if len(fields) > 4 and fields[4] == "/"]
    return not roots or roots[-1] != "/"


def pids_in_netns(netns: str) -> list[int]:
    """Pids of processes in a network namespace we created (used by teardown to catch stragglers)."""
    proc = run(["ip", "netns", "pids", netns], check=False, timeout=10)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


__all__ = ["READY_TIMEOUT", "HarnessError", "HookFile", "LibvirtHost", "in_chroot", "logging_hook", "pids_in_netns"]
