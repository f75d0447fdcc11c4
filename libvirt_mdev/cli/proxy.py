"""``libvirt-mdev proxy``: run the live-migration proxy (a service; see examples/systemd/)."""
from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from ..live.limits import ProxyLimits
from ..live.proxy import MODES, MigrationProxy, ProxyOptions, SessionResult
from ..live.relay import Endpoint, listening_from_systemd
from ..live.tlsbridge import TlsCreds
from ..log import setup_logging
from .context import AppContext, pass_app

LOG_IDENT = "libvirt-mdev-proxy"
_D = ProxyLimits()


@click.command("proxy")
@click.option("--listen", "listen_addr", metavar="ADDR:PORT|unix:PATH",
              help="Where the source connects (default: 'proxy_listen' in the configuration, or the "
                   "socket systemd passes).  Use the destination's own address and the --migrateuri port.")
@click.option("--forward", "forward_addr", required=True, metavar="HOST:PORT|unix:PATH",
              help="The local QEMU's incoming address: 127.0.0.1:PORT with virsh --listen-address 127.0.0.1, "
                   "or the unix socket of --migrateuri unix:///PATH.")
@click.option("--mode", type=click.Choice(MODES), default=None,
              help="splice (default: store, verify and forward device state), token (forward load tokens "
                   "instead), relay (no filtering: the source host's end of the unix-socket layout), sign (the "
                   "source host's end: add a signed statement for each device's state; needs keygen).")
@click.option("--domain", metavar="UUID|NAME", help="Serve only this domain's armed migration (sign mode: "
              "the domain being sent; default: the connecting QEMU's -uuid).")
@click.option("--domain-xml", type=click.Path(dir_okay=False, path_type=Path),
              help="sign mode: the domain's XML (default: ask libvirt at --libvirt-uri).")
@click.option("--libvirt-uri", default="qemu:///system", show_default=True,
              help="sign mode: where to read the domain's XML.")
@click.option("--once", is_flag=True, help="Exit after the first migration (status: 0 ok, else the error's code).")
@click.option("--json-log", is_flag=True, help="Print one JSON object per connection on stdout.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to keep retrying the local QEMU.")
@click.option("--digest", is_flag=True, help="Record SHA-256 of the bytes received and forwarded.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing each stored state from disk.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Trusted store (default: 'store' in the configuration).")
@click.option("--runtime-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the hook's pending records are (default: 'runtime_dir' in the configuration).")
@click.option("--tls-dir", type=click.Path(file_okay=False, path_type=Path),
              help="TLS migrations (virsh migrate --tls): libvirt's migrate_tls_x509_cert_dir (normally "
                   "/etc/pki/qemu); the proxy terminates the source's TLS with this host's server "
                   "certificate and re-originates TLS to the local QEMU with its client certificate.")
@click.option("--tls-hostname", metavar="NAME",
              help="The name in the local QEMU's server certificate (default: this host's name).")
@click.option("--first-bytes-timeout", type=float, default=_D.first_bytes_timeout, show_default=True,
              help="Seconds from accept to the first byte; silent connections are reset.")
@click.option("--header-timeout", type=float, default=_D.header_timeout, show_default=True,
              help="Seconds from accept to a complete QEMU file header (TLS handshake included); only then is "
                   "a connection bound to the armed migration.")
@click.option("--progress-timeout", type=float, default=_D.progress_timeout, show_default=True,
              help="The stream must bring at least --progress-min-bytes in every window of this many seconds.")
@click.option("--progress-min-bytes", type=int, default=_D.progress_min_bytes, show_default=True,
              help="See --progress-timeout.")
@click.option("--max-unarmed", type=int, default=_D.max_unarmed, show_default=True,
              help="Connections held without a QEMU header; beyond it the oldest is reset.")
@click.option("--max-sessions", type=int, default=_D.max_sessions, show_default=True,
              help="Migrations served at once.")
@click.option("--max-handshakes", type=int, default=_D.max_handshakes, show_default=True,
              help="TLS handshakes in progress; beyond it the oldest is reset.")
@click.option("--max-channels", type=int, default=_D.max_channels, show_default=True,
              help="Multifd side channels (virsh migrate --parallel) of one migration; one more fails it.")
@click.option("--main-channel-timeout", type=float, default=_D.main_channel_timeout, show_default=True,
              help="Seconds from a migration's first multifd side channel to its main channel; beyond it the "
                   "migration fails.")
@click.option("-v", "--verbose", is_flag=True, help="Also log informational lines to stderr.")
@pass_app
def proxy(app: AppContext, listen_addr: str | None, forward_addr: str, mode: str | None,
          domain: str | None, domain_xml: Path | None, libvirt_uri: str, once: bool, json_log: bool,
          connect_timeout: float, digest: bool,
          no_verify: bool, store_dir: Path | None, runtime_dir: Path | None,
          tls_dir: Path | None, tls_hostname: str | None, first_bytes_timeout: float,
          header_timeout: float, progress_timeout: float, progress_min_bytes: int, max_unarmed: int,
          max_sessions: int, max_handshakes: int, max_channels: int, main_channel_timeout: float,
          verbose: bool) -> int:
    """Filter live migrations between a source and the local QEMU.

    Serves the migration that the libvirt-mdev hook armed at 'migrate begin'.  Every
    VFIO device's state is stored and verified on its way through (splice); state for
    a device the domain does not have, a type mismatch, or any malformed byte closes
    both connections: the migration fails and the source keeps the guest.
    """
    # ProxyLimits checks them before any work
    limits = ProxyLimits(first_bytes_timeout=first_bytes_timeout, header_timeout=header_timeout,
                         progress_timeout=progress_timeout, progress_min_bytes=progress_min_bytes,
                         max_unarmed=max_unarmed, max_sessions=max_sessions, max_handshakes=max_handshakes,
                         max_channels=max_channels, main_channel_timeout=main_channel_timeout)
    config = app.config.replace(store=store_dir, runtime_dir=runtime_dir)
    setup_logging(LOG_IDENT, config.log_file, stderr_level=20 if verbose or app.debug else 30)
    opts = ProxyOptions(forward=Endpoint.parse(forward_addr, "--forward"), mode=mode or config.mode,
                        domain=domain, connect_timeout=connect_timeout, digest=digest, verify=not no_verify,
                        domain_xml=domain_xml, libvirt_uri=libvirt_uri, limits=limits,
                        tls=TlsCreds(tls_dir, tls_hostname or socket.getfqdn()) if tls_dir else None)
    if opts.tls is not None:
        opts.tls.check()
    listener = listening_from_systemd()
    addr = listen_addr or config.proxy_listen
    if listener is None and not addr:
        raise UsageError("say where to listen: --listen ADDR:PORT (or proxy_listen in the configuration)")

    def on_result(res: SessionResult) -> None:
        if json_log:
            click.echo(json.dumps({"event": "session", **res.to_json()}))
            sys.stdout.flush()

    server = MigrationProxy(config, opts, on_result=on_result, listener=listener)
    bound = server.address if listener is not None else server.bind(Endpoint.parse(addr, "--listen"))
    _announce(json_log, bound, opts)
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    try:
        first = server.serve(once=once)
    finally:
        server.stop()
    if once:
        if first is None:
            return 1
        return 0 if first.ok else first.exit_code
    return 0


def _announce(json_log: bool, bound: Endpoint, opts: ProxyOptions) -> None:
    info: dict[str, Any] = {"event": "listening", "listen": str(bound), "forward": str(opts.forward),
                            "mode": opts.mode}
    if json_log:
        click.echo(json.dumps(info))
        sys.stdout.flush()
    else:
        click.echo(f"libvirt-mdev proxy: listening on {bound}, forwarding to {opts.forward} "
                   f"(mode {opts.mode})", err=True)
