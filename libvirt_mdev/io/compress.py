"""Compressed libvirt save images, read and written through the programs libvirt uses.

Theory of operation
-------------------
``virsh save --image-format gzip|bzip2|xz|lzop|zstd`` (or ``save_image_format`` in
qemu.conf) writes libvirt's header and XML area as they are, then pipes QEMU's
migration stream through ``<tool> -c`` (``xz -c -3``); ``virsh restore`` pipes it back
through ``<tool> -dc`` (libvirt's qemu_saveimage.c).  We do the same, with the same
Debian programs, so whatever libvirt can restore we can read and what we write libvirt
can restore:

* :func:`open_image` wraps an input: a compressed image is presented as its header
  and XML area followed by the *decompressed* stream (the parser recognises this: the
  bytes after the XML area start with ``QEVM``); anything else passes through untouched.
* :class:`ImageSink` wraps an output: it reads the header out of the first bytes
  written, passes header and XML area through, and pipes the rest into ``<tool> -c``
  of the header's own format; any other output passes through untouched.

Both stream through pipes with fixed buffers: memory does not grow with the image.
The stream module itself stays sans-IO; only this module runs programs.

Byte identity: the same program at the same settings is deterministic, so recompressing
an unchanged stream with the Debian tool gives back libvirt's bytes (tested for every
format); after ``strip`` or ``splice`` the stream differs anyway.  What is guaranteed
in every case is that the *decompressed* stream is exactly the one the filter wrote,
which is what ``virsh restore`` feeds QEMU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import BinaryIO, Self

from ..errors import StreamError, UsageError
from ..stream.saveimage import COMPRESSORS, SAVE_MAGICS, decode_header
from ..stream.wire import MAX_SAVE_DATA_LEN, SAVE_HEADER_LEN, SaveFormat
from .sizes import CHUNK


def compress_args(fmt: SaveFormat) -> list[str]:
    """libvirt's compressor command line for *fmt*."""
    tool = COMPRESSORS[fmt]
    return [_find(tool, fmt), "-c"] + (["-3"] if fmt == SaveFormat.XZ else [])


def decompress_args(fmt: SaveFormat) -> list[str]:
    return [_find(COMPRESSORS[fmt], fmt), "-dc"]


def _find(tool: str, fmt: SaveFormat) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UsageError(f"the save image is {fmt.name.lower()}-compressed and `{tool}` is not installed "
                         f"(install the Debian package {tool!r}, as libvirt needs it too)")
    return path


def save_format_of(header: bytes) -> SaveFormat | None:
    """The compressed format named by a save-image header, or None (not a compressed image)."""
    if len(header) < SAVE_HEADER_LEN or header[:16] not in SAVE_MAGICS:
        return None
    try:
        _m, _v, _dl, _wr, fmt, _co = decode_header(header[:SAVE_HEADER_LEN])
        f = SaveFormat(fmt)
    except (StreamError, ValueError):
        return None  # the parser reports a broken header precisely
    return f if f in COMPRESSORS else None


def _data_len(header: bytes) -> int:
    return decode_header(header[:SAVE_HEADER_LEN])[2]


def _read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = os.read(fd, n - len(out))
        if not b:
            break
        out += b
    return bytes(out)


class ImageReader:
    """A readable binary file: the header and XML area of a compressed save image, then
    the output of ``<tool> -dc`` fed by the rest of the source (see the theory above)."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.format: SaveFormat | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._err: BinaryIO | None = None
        fd = src.fileno()
        head = _read_exact(fd, SAVE_HEADER_LEN)
        fmt = save_format_of(head)
        if fmt is not None and _data_len(head) <= MAX_SAVE_DATA_LEN:
            head += _read_exact(fd, _data_len(head))
            self.format = fmt
            self._err = tempfile.TemporaryFile()  # lives as long as the reader
            self._proc = subprocess.Popen(decompress_args(fmt), stdin=fd, stdout=subprocess.PIPE,
                                          stderr=self._err)
            self._out = self._proc.stdout
        self._prefix = memoryview(head)
        self._done = False

    def fileno(self) -> int:
        # the chunk reader must call readinto: the bytes come from two places
        raise OSError("not a plain file")

    def readinto(self, view: memoryview) -> int:
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        if self._proc is None:
            return self._src.readinto(view) or 0  # type: ignore[attr-defined]
        assert self._out is not None
        n = self._out.readinto(view) or 0  # type: ignore[attr-defined]
        if n == 0 and not self._done:
            self._done = True
            self._finish()
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(n if n >= 0 else CHUNK)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])

    def _finish(self) -> None:
        assert self._proc is not None and self.format is not None
        rc = self._proc.wait()
        if rc != 0:
            raise StreamError(f"`{COMPRESSORS[self.format]} -dc` failed on the save image (exit {rc}): "
                              f"{_last_line(self._err)}")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._err is not None:
            self._err.close()
        self._src.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_line(err: BinaryIO | None) -> str:
    if err is None:
        return ""
    err.seek(0)
    lines = err.read(4096).decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def open_image(src: BinaryIO) -> ImageReader:
    """Wrap an opened input (file or pipe); see :class:`ImageReader`."""
    return ImageReader(src)


#: granularity of holes punched in a sparse (mapped-ram) output
_HOLE = 64 << 10
_ZEROS = bytes(_HOLE)


class ImageSink:
    """Where the filter writes a stream: passes the bytes to *emit*, recompressing the
    stream part of a compressed save image in its own format (see the theory above).
    Call :meth:`close` after the last write: it waits for the compressor.

    *sparse_file*: the regular file that *emit* writes to, unbuffered.  Given it, a
    ``sparse`` save image (mapped-ram: RAM at fixed offsets, mostly holes) is written
    sparse too: aligned all-zero 64 KiB blocks become holes (a seek) instead of data."""

    def __init__(self, emit: Callable[[bytes], object], sparse_file: BinaryIO | None = None) -> None:
        self._emit = emit
        self._sparse_file = sparse_file
        self._holes = False
        self._pos = 0
        self._hole_pending = False
        self._head = bytearray()
        self._raw_left: int | None = None  # header + XML bytes still to pass through
        self.format: SaveFormat | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._pump_error: BaseException | None = None
        self._err: BinaryIO | None = None
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._raw_left is None:
            need = SAVE_HEADER_LEN - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < SAVE_HEADER_LEN:
                return
            self._start(bytes(self._head))
        if self._raw_left:
            n = min(self._raw_left, len(view))
            if n:
                self._emit(bytes(view[:n]))
                self._raw_left -= n
                self._pos += n
                view = view[n:]
        if not view:
            return
        if self._holes:
            self._write_sparse(view)
            return
        if self._proc is None:
            self._emit(bytes(view))
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(view)
        except BrokenPipeError:
            self._raise_failed()

    def flush(self) -> None:
        """Nothing to do: bytes go to the compressor (or *emit*) as they are written;
        :meth:`close` ends the compressed stream."""

    def _write_sparse(self, view: memoryview) -> None:
        """Write *view* at the current position, leaving aligned zero blocks as holes."""
        assert self._sparse_file is not None
        while view:
            n = min(len(view), _HOLE - self._pos % _HOLE)
            block = view[:n]
            if n == _HOLE and block == _ZEROS:
                self._sparse_file.seek(n, os.SEEK_CUR)
                self._hole_pending = True
            else:
                self._emit(bytes(block))
                self._hole_pending = False
            self._pos += n
            view = view[n:]

    def _start(self, head: bytes) -> None:
        fmt = save_format_of(head)
        self._emit(head)
        self._pos = len(head)
        if fmt is None:
            self._raw_left = 0
            try:
                sparse = decode_header(head[:SAVE_HEADER_LEN])[4] == SaveFormat.SPARSE
            except StreamError:
                sparse = False
            self._holes = sparse and self._sparse_file is not None and head[:16] in SAVE_MAGICS
            return
        self.format = fmt
        self._raw_left = _data_len(head)
        self._err = tempfile.TemporaryFile()  # lives as long as the sink
        self._proc = subprocess.Popen(compress_args(fmt), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._err)
        self._pump = threading.Thread(target=self._pump_out, name="compressor-pump", daemon=True)
        self._pump.start()

    def _pump_out(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while True:
                b = self._proc.stdout.read(CHUNK)
                if not b:
                    return
                self._emit(b)
        except BaseException as exc:  # handed to the writing thread in close()
            self._pump_error = exc
            self._proc.stdout.close()

    def _raise_failed(self) -> None:
        assert self._proc is not None and self.format is not None
        self._proc.wait()
        if self._pump is not None:
            self._pump.join()
        if self._pump_error is not None:
            raise self._pump_error
        raise StreamError(f"`{' '.join(compress_args(self.format)[0:1])} -c` failed writing the save image "
                          f"(exit {self._proc.returncode}): {_last_line(self._err)}")

    def close(self) -> None:
        """Flush: the header if it was shorter than a header, else end the compressor."""
        if self._closed:
            return
        self._closed = True
        if self._raw_left is None and self._head:
            self._emit(bytes(self._head))
        if self._hole_pending and self._sparse_file is not None:
            self._sparse_file.truncate(self._pos)  # a trailing hole still counts in the size
        if self._proc is None:
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self._proc.wait()
        assert self._pump is not None
        self._pump.join()
        if self._err is not None:
            msg = _last_line(self._err) if rc else ""
            self._err.close()
        if self._pump_error is not None:
            raise self._pump_error
        if rc != 0:
            raise StreamError(f"the compressor for the save image failed (exit {rc}): {msg}")

    def abort(self) -> None:
        """Stop the compressor without waiting for its output (the write failed)."""
        self._closed = True
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._pump is not None:
                self._pump.join()
