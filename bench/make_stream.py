#!/usr/bin/env python3
"""Make a large benchmark stream with QEMU's exact framing.

The head (header, configuration) and the non-iterable device sections come from a
real QEMU stream (``--template``, e.g. one written by QMP ``migrate``); the RAM
section is synthetic: pages of one RAMBlock, clustered runs of zero and non-zero
pages (as in real guests), split into PART sections; and one synthetic VFIO device
with ``--vfio-mib`` of state is injected as QEMU 7.2 frames it.

    python3 bench/make_stream.py --template real.bin --size-gib 2 --vfio-mib 256 out.bin
    python3 bench/make_stream.py --template real.bin --zero-records 50000000 zero.bin
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from libvirt_mdev.stream import Configuration, FileHeader, SectionFooter, SectionHeader, VMDescription, iter_events
from libvirt_mdev.stream.wire import BE64, RamFlag
from libvirt_mdev.stream.writer import encode_footer, encode_section_part, encode_section_start, encode_vmdesc
from testkit.synth import SyntheticVfioDevice

PAGE = 4096
BLOCK = "pc.ram"
RAM_ID = 2


def template_parts(path: str) -> tuple[bytes, list[bytes], dict]:
    """(header+configuration, FULL section records, vmdesc JSON) of a real stream."""
    head = b""
    fulls: list[bytes] = []
    vmdesc: dict = {"page_size": PAGE, "devices": []}
    cur: list[bytes] | None = None
    with open(path, "rb") as fh:
        for ev in iter_events(fh):
            if isinstance(ev, (FileHeader, Configuration)):
                head += bytes(ev.raw)
            elif isinstance(ev, SectionHeader) and ev.kind == "vmstate":
                cur = [bytes(ev.raw)]
            elif cur is not None:
                cur.append(bytes(ev.raw))
                if isinstance(ev, SectionFooter):
                    fulls.append(b"".join(cur))
                    cur = None
            elif isinstance(ev, VMDescription):
                vmdesc = json.loads(bytes(ev.json))
    return head, fulls, vmdesc


def ram_records(total_pages: int, zero_share: float, run: int, rng: random.Random):
    """Yield ~1 MiB chunks of page records: the first names the block, the rest CONTINUE.
    Runs of zero or non-zero pages of random length up to *run* (real guest memory is
    clustered)."""
    pool = [rng.randbytes(PAGE) for _ in range(64)]
    zero_flags = int(RamFlag.ZERO | RamFlag.CONTINUE)  # plain ints: IntFlag arithmetic is slow
    page_flags = int(RamFlag.PAGE | RamFlag.CONTINUE)
    pack = BE64.pack
    out = bytearray()
    first = True
    page = 0
    while page < total_pages:
        n = min(rng.randint(1, run), total_pages - page)
        zero = rng.random() < zero_share
        if first:
            flags = int(RamFlag.ZERO if zero else RamFlag.PAGE)
            out += pack(page * PAGE | flags) + bytes([len(BLOCK)]) + BLOCK.encode()
            out += b"\x00" if zero else pool[0]
            page, n, first = page + 1, n - 1, False
        while n:
            k = min(n, 100_000)
            if zero:
                out += b"".join([pack(i * PAGE | zero_flags) + b"\x00" for i in range(page, page + k)])
            else:
                out += b"".join([pack(i * PAGE | page_flags) + pool[i & 63] for i in range(page, page + k)])
            page += k
            n -= k
            if len(out) >= 1 << 20:
                yield bytes(out)
                out.clear()
    if out:
        yield bytes(out)


def write_stream(out_path: str, template: str, data_pages: int, zero_share: float, run: int,
                 parts: int, vfio_bytes: int, seed: int) -> None:
    head, fulls, vmdesc = template_parts(template)
    rng = random.Random(seed)
    ram_size = max(data_pages, 1) * PAGE
    dev = SyntheticVfioDevice(idstr="0000:00:05.0/vfio", stopcopy_size=vfio_bytes, framing="v1",
                              block_size=1 << 20, section_id=1000, seed=seed, marker=b"BENCH-STATE")
    with open(out_path, "wb") as out:
        out.write(head)
        setup = (BE64.pack(ram_size | RamFlag.MEM_SIZE) + bytes([len(BLOCK)]) + BLOCK.encode()
                 + BE64.pack(ram_size) + BE64.pack(RamFlag.EOS))
        out.write(encode_section_start(RAM_ID, "ram", 0, 4) + setup + encode_footer(RAM_ID))
        if vfio_bytes:
            out.write(dev.start_record())
        per_part = -(-data_pages // parts)
        gen = ram_records(data_pages, zero_share, run, rng)
        # one RAM PART per `per_part` pages; records are streamed in ~1 MiB chunks
        done = 0
        out.write(encode_section_part(RAM_ID))
        for chunk in gen:
            out.write(chunk)
            done += len(chunk)
        out.write(BE64.pack(RamFlag.EOS) + encode_footer(RAM_ID))
        out.write(encode_section_part(RAM_ID, end=True) + BE64.pack(RamFlag.EOS) + encode_footer(RAM_ID))
        if vfio_bytes:
            for piece in dev.end_chunks(vfio_bytes):
                out.write(piece)
        for rec in fulls:
            out.write(rec)
        if vfio_bytes:
            out.write(dev.full_record())
            vmdesc.setdefault("devices", []).append(dev.vmdesc_entry())
        out.write(b"\x00" + encode_vmdesc(json.dumps(vmdesc, separators=(",", ":")).encode()))
    del per_part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--template", required=True, help="a real QEMU stream to take header and devices from")
    ap.add_argument("--size-gib", type=float, default=2.0, help="approximate RAM data in the stream")
    ap.add_argument("--zero-share", type=float, default=0.3, help="share of zero pages (by run)")
    ap.add_argument("--run", type=int, default=64, help="longest run of same-kind pages")
    ap.add_argument("--zero-records", type=int, default=0, help="make a zero-page-only stream of N records")
    ap.add_argument("--vfio-mib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.zero_records:
        write_stream(a.out, a.template, a.zero_records, 1.0, 1 << 30, 1, 0, a.seed)
    else:
        pages = int(a.size_gib * (1 << 30) / (PAGE * (1 - a.zero_share)))
        write_stream(a.out, a.template, pages, a.zero_share, a.run, 1, a.vfio_mib << 20, a.seed)
    print(f"{a.out}: {os.path.getsize(a.out)} bytes")


if __name__ == "__main__":
    main()
