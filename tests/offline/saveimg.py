"""Synthetic libvirt save images with injected VFIO devices (no QEMU needed), and a CLI runner."""
from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

from libvirt_mdev.filter import FilterOptions, StreamFilter
from libvirt_mdev.store import Store
from libvirt_mdev.stream import StreamParser, iter_events
from libvirt_mdev.stream.wire import SAVE_HEADER, SAVE_MAGIC_COMPLETE
from testkit.synth import SyntheticVfioDevice, inject, write_minimal_stream
from tests.harness.cli import one_line_error, run_cli

REPO = Path(__file__).resolve().parents[2]
DOM_UUID = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b10"
U5 = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0005"
U6 = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0006"
MARK = b"\x8f-SECRET-DEVICE-STATE-" + os.urandom(6).hex().encode()


def mdev_xml(slot: int, uuid: str) -> str:
    return (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{uuid}'/></source>"
            f"<address type='pci' domain='0x0000' bus='0x00' slot='0x{slot:02x}' function='0x0'/></hostdev>")


def domain_xml(mdevs: dict[int, str], uuid: str = DOM_UUID, types: dict[str, str] | None = None) -> str:
    meta = ""
    if types:
        rows = "".join(f"<lm:device uuid='{u}' type='{t}' parent='0000:af:00.0' device_api='vfio-pci'/>"
                       for u, t in types.items())
        meta = (f"<metadata><lm:migration xmlns:lm='urn:libvirt-mdev:metadata:1' host='src.example' "
                f"time='2026-12-01T13:00:00Z'>{rows}</lm:migration></metadata>")
    devs = "".join(mdev_xml(s, u) for s, u in mdevs.items())
    return f"<domain type='kvm'><name>img1</name><uuid>{uuid}</uuid>{meta}<devices>{devs}</devices></domain>"


def devices(extra: list[SyntheticVfioDevice] | None = None) -> list[SyntheticVfioDevice]:
    return [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", stopcopy_size=300_001, marker=MARK, seed=7),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", stopcopy_size=5_000, framing="v2", seed=8)] + (extra or [])


def save_image(path: Path, xml: str, devs: list[SyntheticVfioDevice] | None = None,
               tail: bytes = b"") -> Path:
    """A complete raw save image: libvirt header + XML + a small stream with *devs* injected."""
    plain = path.with_suffix(".plain")
    with open(plain, "wb") as fh:
        write_minimal_stream(fh)
    body = io.BytesIO()
    inject(str(plain), body, devs if devs is not None else devices())
    data = xml.encode() + b"\0"
    data += b"\0" * (-len(data) % 8)
    header = SAVE_HEADER.pack(SAVE_MAGIC_COMPLETE, 2, len(data), 1, 0, 0, b"\0" * 56)
    path.write_bytes(header + data + body.getvalue() + tail)
    plain.unlink()
    return path


def cli(*args: str, config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, config=config, timeout=timeout)


def one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    return one_line_error(r.stderr, *words, rc=r.returncode, code=code)


def token_filtered(store: Store, image: Path) -> StreamFilter:
    """*image* run through a token-mode StreamFilter over *store*, as the proxy runs it: the filter, not closed."""
    parser = StreamParser()
    flt = StreamFilter(store, parser, FilterOptions(mode="token"), lambda b: None)
    with open(image, "rb") as src:
        for ev in iter_events(src, parser):
            flt.process(ev)
    return flt
