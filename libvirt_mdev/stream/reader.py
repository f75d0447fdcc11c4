"""The sans-IO migration-stream parser: bytes in, events out.

Theory of operation
-------------------
``StreamParser`` never reads a file or a socket.  A driver feeds it chunks
(:meth:`feed`; ``b""`` means the input ended) and pulls events (:meth:`next_event`)
until it gets :data:`NEED_DATA`.  The offline tools, the proxy and the tests drive the
same parser.  Internally the grammar is one generator (``_run``) that yields events or
NEED_DATA; payload readers for each kind of section are generators too
(ram.read_ram, vfio.read_vfio, sections.scan_to_footer, bitmap.read_dirty_bitmap),
so the grammar reads top-down like QEMU's ``qemu_loadvm_state``.

Shape of the input (docs/stream-format.md, "Stream grammar")::

    [save-image header + XML]            only for libvirt save images
    QEVM 00000003
    [07 CONFIGURATION [05 subsection]*]
    ( 01 START | 02 PART | 03 END | 04 FULL | 08 COMMAND )*   each section record ends
                                                              with footer 7e <id>
    00 EOF
    [06 be32 len JSON]                   vmdesc

Errors: any malformed or unsafe input raises :class:`~libvirt_mdev.errors.StreamError`
(naming the absolute byte offset) and the parser stays in that error for good.  Any
other exception escaping :meth:`next_event` is a bug.
"""
from __future__ import annotations

from collections.abc import Generator, Iterator

from ..errors import StreamError, UnsupportedStream, UsageError
from ._util import need, need_peek, printable_ascii
from .bitmap import read_dirty_bitmap
from .buffer import Input
from .early import read_virtio_mem_early
from .events import (
    NEED_DATA,
    Command,
    Configuration,
    Eof,
    FileHeader,
    NeedData,
    Opaque,
    SaveImageHeader,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionKind,
    SectionPart,
    SectionStart,
    Step,
    StreamEnd,
    StreamEvent,
    VMDescription,
)
from .ram import RamContext, read_ram
from .saveimage import SAVE_MAGICS, read_save_image
from .scan import read_our_record, scan_to_footer
from .sections import ITERATIVE_KINDS, SectionInfo, SectionTable, kind_of, refuse_iterative
from .vfio import FramingGuess, read_vfio
from .vmdesc import check_vmdesc
from .wire import (
    BE16,
    BE32,
    CONFIG_SUB_CAPABILITIES,
    CONFIG_SUB_PAGE_BITS,
    CONFIG_SUB_UUID,
    DEFAULT_TARGET_PAGE_BITS,
    DIRTY_BITMAP_VERSION,
    FILE_HEADER,
    MAPPED_RAM_CAPABILITY,
    MAX_CAPABILITIES,
    MAX_MACHINE_NAME,
    MAX_VFIO_DEVICES,
    MAX_VMDESC_LEN,
    MIG_COMMAND_LEN,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_VERSION,
    VFIO_VERSION,
    MigCommand,
    SaveFormat,
    SectionType,
    VfioFraming,
)
from .writer import encode_footer

_HEADER_TYPES: dict[SectionType, type[SectionStart] | type[SectionPart] | type[SectionEnd] | type[SectionFull]] = {
    SectionType.SECTION_START: SectionStart,
    SectionType.SECTION_PART: SectionPart,
    SectionType.SECTION_END: SectionEnd,
    SectionType.SECTION_FULL: SectionFull,
}
#: commands a precopy stream carries (docs/stream-format.md); everything else is refused
_ALLOWED_COMMANDS = {MigCommand.OPEN_RETURN_PATH, MigCommand.PING, MigCommand.POSTCOPY_ADVISE,
                     MigCommand.SWITCHOVER_START}
_EXPECTED_VERSION = {SectionKind.RAM: RAM_VERSION, SectionKind.VFIO: VFIO_VERSION,
                     SectionKind.DIRTY_BITMAP: DIRTY_BITMAP_VERSION}


class StreamParser:
    """Parse a QEMU migration stream, optionally wrapped in a libvirt save image.

    Args:
        container: ``"auto"`` (detect from the first bytes), ``"stream"`` or ``"save-image"``.

    A compressed save image is accepted when fed with its stream already decompressed
    (libvirt_mdev.io.compress.open_image); fed as stored it is refused with that hint.
    """

    def __init__(self, container: str = "auto") -> None:
        if container not in ("auto", "stream", "save-image"):
            raise UsageError(f"unknown container {container!r}")
        self._container = container
        #: the save image's format field, once its header was read
        self._save_format: int | None = None
        self._inp = Input()
        self._gen: Generator[Step, None, None] = self._run()
        self._error: StreamError | None = None
        self.done = False
        self.table = SectionTable()
        self.ram = RamContext()
        self.machine_type = ""
        self.kind = "stream"
        self.framing: dict[int, FramingGuess] = {}

    # -- public API -------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Give the parser more input; ``b""`` says the input has ended."""
        if self._inp.eof:
            raise UsageError("feed() after the end of the input")
        self._inp.feed(data)

    def next_event(self) -> StreamEvent | NeedData:
        """The next event, or :data:`NEED_DATA`.

        Raises:
            StreamError: the input is malformed or unsafe (sticky: raised again on
                every later call).
        """
        if self._error is not None:
            raise self._error
        if self.done:
            return NEED_DATA
        try:
            ev = next(self._gen)
        except StopIteration:
            self.done = True
            return NEED_DATA
        except StreamError as exc:
            self._error = exc
            raise
        return ev

    def events(self) -> Iterator[StreamEvent]:
        """Every event available now (stops at NEED_DATA)."""
        while True:
            ev = self.next_event()
            if ev is NEED_DATA:
                return
            yield ev

    @property
    def offset(self) -> int:
        return self._inp.offset

    def framing_of(self, section_id: int) -> str:
        """The VFIO framing of *section_id* as reports name it (``"unknown"``: undecided;
        ``"v2+multifd"``: its stop-copy state and config travel on multifd channels)."""
        guess = self.framing.get(section_id)
        name = self.vfio_framing(section_id) or "unknown"
        return f"{name}+multifd" if guess is not None and guess.multifd_transfer else name

    def vfio_framing(self, section_id: int) -> VfioFraming | None:
        """The VFIO framing of *section_id*, ``None`` when the stream so far does not decide."""
        guess = self.framing.get(section_id)
        return guess.framing(self.machine_type) if guess else None

    # -- grammar ----------------------------------------------------------------------------

    def _run(self) -> Generator[Step, None, None]:
        inp = self._inp
        if self._container != "stream":
            head = yield from need_peek(inp, 4, "file magic")
            if self._container == "save-image" or head in (m[:4] for m in SAVE_MAGICS):
                self.kind = "save-image"
                hdr: SaveImageHeader = yield from read_save_image(inp)
                self._save_format = hdr.format
                yield hdr
        yield from self._file_header()
        yield from self._configuration()
        while True:
            off = inp.offset
            t = (yield from need_peek(inp, 1, "record type"))[0]
            if t in _HEADER_TYPES:
                yield from self._section(SectionType(t))
            elif t == SectionType.COMMAND:
                yield (yield from self._command())
            elif t == SectionType.EOF:
                raw = yield from need(inp, 1, "EOF")
                yield Eof(off, raw)
                break
            else:
                raise StreamError(f"unknown record type 0x{t:02x}", offset=off)
        yield from self._after_eof()

    def _file_header(self) -> Generator[Step, None, None]:
        inp = self._inp
        off = inp.offset
        raw = yield from need(inp, FILE_HEADER.size, "QEMU file header")
        magic, version = FILE_HEADER.unpack(raw)
        if magic != QEMU_VM_FILE_MAGIC:
            raise StreamError(f"not a QEMU migration stream (magic 0x{magic:08x}, expected 'QEVM')", offset=off)
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise UnsupportedStream("obsolete QEMU stream version 2", offset=off + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise StreamError(f"unknown QEMU stream version {version}", offset=off + 4)
        yield FileHeader(off, raw, version)

    def _configuration(self) -> Generator[Step, None, None]:
        inp = self._inp
        off = inp.offset
        t = (yield from need_peek(inp, 1, "record type"))[0]
        if t != SectionType.CONFIGURATION:
            self.ram.page_bits = DEFAULT_TARGET_PAGE_BITS
            return
        parts = [bytes((yield from need(inp, 5, "configuration header")))]
        (n,) = BE32.unpack_from(parts[0], 1)
        if not 0 < n <= MAX_MACHINE_NAME:
            raise StreamError(f"machine type name of {n} bytes", offset=off + 1)
        name = bytes((yield from need(inp, n, "machine type")))
        if not printable_ascii(name):
            raise StreamError("machine type name is not printable ASCII", offset=off + 5)
        parts.append(name)
        caps: list[str] = []
        page_bits: int | None = None
        uuid: bytes | None = None
        while True:
            nxt = inp.peek(1)
            if nxt is None:
                if inp.eof:
                    raise StreamError("stream ends after the configuration", offset=inp.offset)
                yield NEED_DATA
                continue
            if nxt[0] != SectionType.SUBSECTION:
                break
            sub_off = inp.offset
            hdr = bytes((yield from need(inp, 2, "subsection header")))
            sub = bytes((yield from need(inp, hdr[1] + 4, "subsection name")))
            parts += [hdr, sub]
            sub_name = sub[:-4].decode("latin-1")
            if sub_name == CONFIG_SUB_PAGE_BITS:
                raw = bytes((yield from need(inp, 4, "target page bits")))
                parts.append(raw)
                (page_bits,) = BE32.unpack(raw)
                if not 10 <= page_bits <= 24:
                    raise StreamError(f"target page bits {page_bits}", offset=sub_off)
            elif sub_name == CONFIG_SUB_CAPABILITIES:
                raw = bytes((yield from need(inp, 4, "capability count")))
                parts.append(raw)
                (count,) = BE32.unpack(raw)
                if count > MAX_CAPABILITIES:
                    raise StreamError(f"{count} capabilities", offset=sub_off)
                for _ in range(count):
                    ln = bytes((yield from need(inp, 1, "capability name")))
                    cap = bytes((yield from need(inp, ln[0], "capability name")))
                    parts += [ln, cap]
                    caps.append(cap.decode("latin-1"))
            elif sub_name == CONFIG_SUB_UUID:
                uuid = bytes((yield from need(inp, 16, "configuration uuid")))
                parts.append(uuid)
            else:
                raise UnsupportedStream(f"unknown configuration subsection {sub_name!r}", offset=sub_off)
        self.ram.mapped_ram = MAPPED_RAM_CAPABILITY in caps
        if self._save_format is not None and (self._save_format == SaveFormat.SPARSE) != self.ram.mapped_ram:
            raise StreamError(f"save image format {SaveFormat(self._save_format).name.lower()} with a stream "
                              f"{'with' if self.ram.mapped_ram else 'without'} mapped-ram (libvirt writes "
                              f"mapped-ram exactly for the sparse format)", offset=off)
        self.ram.page_bits = page_bits or DEFAULT_TARGET_PAGE_BITS
        self.ram.ignore_shared = "x-ignore-shared" in caps
        self.machine_type = name.decode()
        yield Configuration(off, memoryview(b"".join(parts)), self.machine_type, tuple(caps), page_bits, uuid)

    def _command(self) -> Generator[Step, None, Command]:
        inp = self._inp
        off = inp.offset
        hdr = bytes((yield from need(inp, 5, "command header")))
        (cmd,) = BE16.unpack_from(hdr, 1)
        (ln,) = BE16.unpack_from(hdr, 3)
        try:
            command = MigCommand(cmd)
            fixed = MIG_COMMAND_LEN[command]
        except (ValueError, KeyError):
            raise StreamError(f"unknown migration command {cmd}", offset=off) from None
        if fixed >= 0 and ln != fixed:
            raise StreamError(f"command {command.name} with length {ln} (QEMU requires {fixed})", offset=off)
        data = bytes((yield from need(inp, ln, f"command {command.name}")))
        if command == MigCommand.POSTCOPY_ADVISE and ln:
            raise UnsupportedStream("postcopy-ram is enabled; VFIO devices cannot use postcopy and "
                                    "the RAM block list cannot be delimited", offset=off)
        if command not in _ALLOWED_COMMANDS:
            # postcopy, COLO and recovery commands: VFIO devices cannot take part in them,
            # and their variable-length data would be bytes we could not account for
            raise UnsupportedStream(f"migration command {command.name} (postcopy, COLO or recovery) "
                                    f"cannot be filtered", offset=off)
        if self.table.non_iterable:
            raise StreamError(f"command {command.name} after the device sections began", offset=off)
        return Command(off, memoryview(hdr + data), command, data)

    def _section(self, rtype: SectionType) -> Generator[Step, None, None]:
        inp = self._inp
        off = inp.offset
        info: SectionInfo
        if rtype in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            head = yield from need_peek(inp, 6, "section header")
            (sid,) = BE32.unpack_from(head, 1)
            n = head[5]
            raw = yield from need(inp, 6 + n + 8, "section header")
            idb = bytes(raw[6:6 + n])
            if n == 0 or not printable_ascii(idb):
                raise StreamError(f"section id {sid} has an empty or non-printable idstr", offset=off)
            inst, ver = BE32.unpack_from(raw, 6 + n)[0], BE32.unpack_from(raw, 10 + n)[0]
            idstr = idb.decode()
            if rtype == SectionType.SECTION_START and kind_of(idstr) not in ITERATIVE_KINDS:
                # every START of a handler we do not parse exactly, libvirt-mdev/... included
                raise refuse_iterative(idstr, off)
            if rtype == SectionType.SECTION_FULL and kind_of(idstr) == SectionKind.OURS:
                yield from self._our_record(SectionInfo(sid, idstr, inst, ver, SectionKind.OURS, False), off, raw)
                return
            info = self.table.open(sid, idstr, inst, ver, rtype == SectionType.SECTION_START, off)
            want = _EXPECTED_VERSION.get(info.kind)
            if want is not None and ver != want:
                raise StreamError(f"{info.kind} section version {ver} (QEMU uses {want})", offset=off,
                                  section=info.label)
            if info.kind == SectionKind.VFIO and info.section_id not in self.framing:
                if len(self.framing) >= MAX_VFIO_DEVICES:
                    raise StreamError(f"more than {MAX_VFIO_DEVICES} VFIO devices", offset=off)
                self.framing[info.section_id] = FramingGuess()
        else:
            raw = yield from need(inp, 5, "section header")
            (sid,) = BE32.unpack_from(raw, 1)
            info = self.table.continued(sid, off)
        yield _HEADER_TYPES[rtype](off, raw, rtype, info.section_id, info.idstr, info.instance_id,
                                   info.version_id, info.kind)
        yield from self._payload(info, rtype)
        if rtype == SectionType.SECTION_END:
            info.ended = True
        yield from self._footer(info)

    def _footer(self, info: SectionInfo) -> Generator[Step, None, None]:
        inp = self._inp
        foff = inp.offset
        ft = yield from need(inp, 5, "section footer", info.label)
        if bytes(ft) != encode_footer(info.section_id):
            raise StreamError(f"expected footer 7e {info.section_id:08x}, found {bytes(ft).hex(' ')}",
                              offset=foff, section=info.label)
        yield SectionFooter(foff, ft, info.section_id)

    def _our_record(self, info: SectionInfo, off: int, raw: memoryview) -> Generator[Step, None, None]:
        """A libvirt-mdev record (sections.read_our_record): outside the section table."""
        if self.table.by_id.get(info.section_id) is not None:
            raise StreamError(f"libvirt-mdev record with the id of section "
                              f"{self.table.by_id[info.section_id].label}", offset=off)
        yield SectionFull(off, raw, SectionType.SECTION_FULL, info.section_id, info.idstr,
                          info.instance_id, info.version_id, info.kind)
        yield from read_our_record(self._inp, info, self.table)
        yield from self._footer(info)

    def _payload(self, info: SectionInfo, rtype: SectionType) -> Generator[Step, None, None]:
        if info.kind == SectionKind.RAM:
            yield from read_ram(self._inp, info, self.ram, setup=rtype == SectionType.SECTION_START)
        elif info.kind == SectionKind.VFIO:
            yield from read_vfio(self._inp, info, self.table, rtype, self.framing[info.section_id],
                                 live=self.kind != "save-image")
        elif info.kind == SectionKind.DIRTY_BITMAP:
            yield from read_dirty_bitmap(self._inp, info)
        elif info.kind == SectionKind.VIRTIO_MEM_EARLY:
            yield from read_virtio_mem_early(self._inp, info)
        else:
            sid = info.section_id
            yield from scan_to_footer(self._inp, info, self.table, b"",
                                      lambda o, v: Opaque(o, v, sid, SectionKind.VMSTATE))

    def _after_eof(self) -> Generator[Step, None, None]:
        inp = self._inp
        while True:
            nxt = inp.peek(1)
            if nxt is not None:
                break
            if inp.eof:
                yield StreamEnd(inp.offset, b"")
                return
            yield NEED_DATA
        off = inp.offset
        if nxt[0] != SectionType.VMDESCRIPTION:
            raise StreamError(f"data after EOF (0x{nxt[0]:02x}) that is not a VM description", offset=off)
        hdr = yield from need_peek(inp, 5, "VM description header")
        (n,) = BE32.unpack_from(hdr, 1)
        if n > MAX_VMDESC_LEN:
            raise StreamError(f"VM description of {n} bytes (limit {MAX_VMDESC_LEN})", offset=off)
        # header and body in one buffer (joined once when they span chunks), checked in place:
        # memory is the body plus a constant whatever its JSON shape (vmdesc.py)
        raw = yield from need(inp, 5 + n, "VM description")
        body = raw[5:]
        check_vmdesc(body, off + 5)
        yield VMDescription(off, raw, body)
        while True:
            if inp.available():
                raise StreamError("data after the end of the stream", offset=inp.offset)
            if inp.eof:
                yield StreamEnd(inp.offset, b"")
                return
            yield NEED_DATA
