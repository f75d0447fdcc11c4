"""Wiring signatures into the proxy: who the source is signing for, and the destination's policy.

Source side (``libvirt-mdev proxy --mode sign``, the source host's end of the
UNIX-socket layout): the proxy must know the *domain* a connection carries, to sign
its uuid and each device's mdev uuid and type.  It finds it, in order:

1. ``--domain UUID`` (or a name, looked up through libvirt);
2. the connecting process: on a UNIX socket ``SO_PEERCRED`` gives its pid; when it is
   a QEMU (``migrate unix:...`` issued to QEMU directly) its ``-uuid`` names the domain;
3. libvirt: for ``virsh migrate --migrateuri unix://...`` libvirtd itself connects and
   hands the socket to QEMU, so the peer is libvirtd; then the one domain with an
   outgoing migration job is the one (several at once: refused, pass ``--domain``).

Then the devices: the domain XML (``--domain-xml FILE``, else libvirt's live XML for
that uuid — the proxy is a service, not a hook, so it may call libvirt) gives each
mdev hostdev's VFIO section idstr; the mdev type is read from this host's sysfs when
the mdev exists here (what the state really came from), else from our annotation.

Destination side: :func:`verify_policy` builds the :class:`VerifyPolicy` from the
configuration (``require_signature``, ``trusted_keys``), or None when neither is set.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import ConnectError, NotFound, SignatureError
from ..filter import Binding, bindings_from_domain_xml
from ..store.manifest import WORD_RE, is_uuid
from ..store.store import Store

if TYPE_CHECKING:  # imported lazily: cryptography is a core dependency, but costs import time on paths that never sign
    from .layers import SignContext, VerifyPolicy

def _crypto_missing() -> SignatureError:
    """A broken install (cryptography is a core dependency): refuse rather than skip the signature checks."""
    return SignatureError("signed device state needs the 'cryptography' package, which this installation "
                          "lacks (Debian: apt install python3-cryptography); refusing")


def verify_policy(config: Config, store: Store) -> VerifyPolicy | None:
    """The destination's policy, or None when signatures are neither required nor trusted."""
    if not config.require_signature and not config.trusted_keys:
        return None
    try:
        from .keys import TrustedKeys
        from .layers import ReplayGuard, VerifyPolicy
    except ImportError:
        raise _crypto_missing() from None
    if config.require_signature and not config.trusted_keys:
        raise SignatureError(f"require_signature is on but trusted_keys is empty in {config.source}: "
                             f"list the source hosts' public key files")
    return VerifyPolicy(TrustedKeys.from_files(config.trusted_keys), require=config.require_signature,
                        replay=ReplayGuard(store))


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a UNIX socket (None for TCP)."""
    if sock.family != socket.AF_UNIX:
        return None
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", cred)
    return pid or None


def qemu_uuid_of(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The ``-uuid`` argument of QEMU process *pid* (libvirt always passes one)."""
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, a in enumerate(args[:-1]):
        if a == b"-uuid":
            value = args[i + 1].decode("ascii", "replace").lower()
            return value if is_uuid(value) else None
    return None


def _libvirt() -> Any:
    """The libvirt module (untyped: libvirt-python ships no type information)."""
    try:
        import libvirt
    except ImportError:
        raise ConnectError("libvirt-python is not installed: pass --domain and --domain-xml") from None
    return libvirt


def migrating_domain(uri: str) -> str:
    """The uuid of the one domain with an outgoing migration job at *uri*.

    Raises:
        NotFound: none or several (then the operator must say which: --domain).
        ConnectError: libvirt cannot be reached.
    """
    libvirt = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot reach libvirt at {uri}: {' '.join(str(exc).split())}") from None
    try:
        found = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                stats = dom.jobStats()
            except libvirt.libvirtError:
                continue
            if (stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
                    and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT):
                found.append(dom.UUIDString())
    finally:
        conn.close()
    if len(found) != 1:
        raise NotFound(f"{'no' if not found else len(found)} domains are migrating out at {uri}: cannot "
                       f"tell which domain this connection carries; run the source proxy with --domain")
    return str(found[0])


def _libvirt_xml(uri: str, domain: str) -> bytes:
    libvirt = _libvirt()
    try:
        conn = libvirt.open(uri)
        try:
            dom = conn.lookupByUUIDString(domain) if is_uuid(domain) else conn.lookupByName(domain)
            return str(dom.XMLDesc(0)).encode()
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot read domain {domain} from libvirt at {uri}: "
                           f"{' '.join(str(exc).split())}") from None


def source_bindings(xml: bytes, sysfs_root: Path) -> tuple[dict[str, Binding], str | None]:
    """(bindings with live source types, domain uuid) from the domain XML."""
    from ..mdev.sysfs import SysfsEnv
    bindings, _name, uuid = bindings_from_domain_xml(xml)
    env = SysfsEnv(sysfs_root)
    out = {}
    for idstr, b in bindings.items():
        live = env.find(b.mdev_uuid)
        out[idstr] = dataclasses.replace(b, mdev_type=live.type_id if live is not None else b.mdev_type)
    return out, uuid


def sign_context(config: Config, pid: int | None, *, domain: str | None = None,
                 domain_xml: Path | None = None,
                 libvirt_uri: str = "qemu:///system") -> SignContext:
    """Everything the source layer signs for a connection from process *pid*.

    Raises:
        SignatureError: no host key (run keygen), cryptography missing.
        NotFound: the domain cannot be determined.
        ConnectError: libvirt cannot be asked for the domain XML.
    """
    try:
        from .keys import load_signing_key
        from .layers import SignContext
    except ImportError:
        raise _crypto_missing() from None
    key = load_signing_key(config.host_key)
    if domain is None:
        domain = qemu_uuid_of(pid) if pid else None
    if domain is None:
        domain = migrating_domain(libvirt_uri)
    xml = domain_xml.read_bytes() if domain_xml is not None else _libvirt_xml(libvirt_uri, domain)
    bindings, uuid = source_bindings(xml, config.sysfs_root)
    if is_uuid(domain) and uuid is not None and uuid != domain:
        raise NotFound(f"the domain XML is for {uuid}, but the connection carries domain {domain}")
    host = os.uname().nodename
    if not WORD_RE.match(host):
        host = "source"
    return SignContext(key=key, source_host=host, domain_uuid=uuid or (domain if is_uuid(domain) else None),
                       bindings=bindings)
