"""Section bookkeeping: the kinds of payload and the rules on section ids and order.

Theory of operation
-------------------
QEMU's loader picks a section's payload grammar from its *idstr* (the handler found by
``find_se(idstr, instance_id)``), whatever the record type: a FULL section named
``ram`` would be parsed as RAM records.  So do we: :func:`kind_of` maps an idstr to
``ram``, ``vfio``, ``dirty-bitmap`` or ``vmstate``.  The first three are
self-delimiting and parsed exactly.  ``vmstate`` payloads (every other device) carry
no length: QEMU writes the fields raw and only the section footer ``7e <be32 id>``
ends them, and that pattern is not escaped inside the payload.

Those bodies are delimited by the footer scan (:mod:`.scan`: the rule, and the
:class:`~.scan.BodyGuard` that searches every scanned body).

Why a wrong split matters, and how it is contained: if our split differs from QEMU's
(the stream is crafted, and QEMU reads the body by its field layout), the two parsers
*diverge* — QEMU may then read real records inside bytes we take for opaque data, and a
VFIO section hidden there would reach the vendor driver unchecked.  So the grammar is
made strict exactly where divergence could be exploited (SectionTable.phase rules):
vmstate FULL sections only after every iterative section has ended (as QEMU 7.2–10.x
write them), no iterative record after that, one FULL per section, no data blocks in a
VFIO FULL section, no variable-length commands, a vmdesc that is strict JSON — and every
scan-delimited body is searched (:class:`~.scan.BodyGuard`) for the bytes a hidden VFIO section
header or a hidden VFIO PART/END would need.  After a divergence, every byte QEMU could
read as a record lies in such a guarded body, so a hidden VFIO section is refused.

Early-setup FULL sections (QEMU >= 8.0 saves ``early_setup`` vmstates during setup, among
the START sections) are the one exception to "FULL only after the iterative phase", and
they are admitted only where the exception costs nothing: a FULL section is accepted
while iterative sections are open only if its idstr names a vmstate whose layout we read
field by field (early.py: virtio-mem-device-early), with the footer required right after
the last field QEMU reads.  Such a body contains no scan-delimited byte, so our split and
QEMU's cannot differ and nothing can hide in it; it does not start the non-iterable
phase.  Any other FULL section in the iterative phase keeps the refusal (its body could
only be delimited by the scan, and a divergence there would expose the PART/END records
that follow to QEMU unchecked).

Iterative sections (START/PART/END) are accepted only for the handlers parsed exactly
(ram, vfio, dirty-bitmap): every other START is refused, whatever its name — our own
``libvirt-mdev/...`` records are FULL-only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import StreamError, UnsupportedStream
from .events import SectionKind
from .wire import DIRTY_BITMAP_IDSTR, MAX_SECTIONS, RAM_IDSTR, VFIO_IDSTR_BARE, VFIO_IDSTR_SUFFIX, VIRTIO_MEM_EARLY_VMSD

#: kinds a START/PART/END may have: handlers whose iterative payload we parse exactly
ITERATIVE_KINDS = (SectionKind.RAM, SectionKind.VFIO, SectionKind.DIRTY_BITMAP)
#: libvirt-mdev's own records (SectionKind.OURS, signed statements) are FULL sections named
#: ``libvirt-mdev/...`` that our destination proxy consumes; QEMU would refuse them (unknown section)
OUR_IDSTR_PREFIX = "libvirt-mdev/"

#: iterative handlers QEMU has that we refuse to guess at (docs/stream-format.md, "Why nothing can hide")
KNOWN_UNPARSED_ITERATIVE = ("block", "s390-storage_attributes", "spapr/htab")


def kind_of(idstr: str) -> SectionKind:
    """The payload grammar QEMU's loader would apply to a section called *idstr*."""
    if idstr == RAM_IDSTR:
        return SectionKind.RAM
    if idstr == VFIO_IDSTR_BARE or idstr.endswith(VFIO_IDSTR_SUFFIX):
        return SectionKind.VFIO
    if idstr == DIRTY_BITMAP_IDSTR:
        return SectionKind.DIRTY_BITMAP
    if idstr.startswith(OUR_IDSTR_PREFIX):
        return SectionKind.OURS
    if idstr == VIRTIO_MEM_EARLY_VMSD or idstr.endswith("/" + VIRTIO_MEM_EARLY_VMSD):
        return SectionKind.VIRTIO_MEM_EARLY
    return SectionKind.VMSTATE


def is_vfio_idstr(idstr: str) -> bool:
    return kind_of(idstr) == SectionKind.VFIO


@dataclass
class SectionInfo:
    """What the parser remembers about one section id."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    kind: SectionKind
    iterative: bool
    ended: bool = False
    full_seen: bool = False

    @property
    def label(self) -> str:
        return f"{self.idstr}[{self.instance_id}] id {self.section_id}"


class SectionTable:
    """Section ids seen so far; enforces the loader's rules on PART/END ids."""

    def __init__(self) -> None:
        self.by_id: dict[int, SectionInfo] = {}
        self._by_name: dict[tuple[str, int], int] = {}
        #: ids of VFIO sections, kept as they open (every body's guard needs them)
        self._vfio: set[int] = set()
        #: the non-iterable phase began (first FULL section): no iterative record after it
        self.non_iterable = False

    def open(self, section_id: int, idstr: str, instance_id: int, version_id: int,
             iterative: bool, offset: int) -> SectionInfo:
        if iterative and self.non_iterable:
            raise StreamError(f"START of {idstr!r} after the non-iterable device sections began",
                              offset=offset)
        known = self.by_id.get(section_id)
        if known is None:
            other = self._by_name.get((idstr, instance_id))
            if other is not None:
                raise StreamError(f"{idstr!r}[{instance_id}] appears with section id {section_id} "
                                  f"and {other}", offset=offset)
            if len(self.by_id) >= MAX_SECTIONS:
                raise StreamError(f"more than {MAX_SECTIONS} sections", offset=offset)
            known = SectionInfo(section_id, idstr, instance_id, version_id, kind_of(idstr), iterative)
            self.by_id[section_id] = known
            self._by_name[(idstr, instance_id)] = section_id
            if known.kind == SectionKind.VFIO:
                self._vfio.add(section_id)
        elif (known.idstr, known.instance_id) != (idstr, instance_id):
            raise StreamError(f"section id {section_id} reused for {idstr!r}[{instance_id}] "
                              f"(it is {known.label})", offset=offset)
        elif iterative:
            raise StreamError(f"second START for section {known.label}", offset=offset)
        if not iterative:
            self._full(known, offset)
        return known

    def _full(self, info: SectionInfo, offset: int) -> None:
        """Rules for FULL sections (see the theory above)."""
        if info.full_seen:
            raise StreamError(f"second FULL section for {info.label}", offset=offset)
        if info.kind in (SectionKind.RAM, SectionKind.DIRTY_BITMAP):
            raise StreamError(f"FULL section for the iterative handler {info.idstr!r}", offset=offset)
        if info.kind == SectionKind.VFIO and not info.iterative:
            raise StreamError(f"VFIO config section {info.label} without the device's setup (START) section",
                              offset=offset)
        if info.kind == SectionKind.VIRTIO_MEM_EARLY:
            # parsed field by field (early.py): exact wherever it appears, so it neither needs
            # nor ends the iterative phase (QEMU sends it among the setup START sections)
            info.full_seen = True
            return
        # only the first FULL can find one open: after it no START/PART/END is accepted
        still_open = [] if self.non_iterable else [i.label for i in self.by_id.values()
                                                     if i.iterative and not i.ended]
        if still_open:
            raise UnsupportedStream(f"device section {info.label} appears while iterative sections are "
                                    f"still open ({', '.join(still_open[:3])}): an early-setup vmstate "
                                    f"whose layout libvirt-mdev does not know (only "
                                    f"{VIRTIO_MEM_EARLY_VMSD!r} is parsed), so its end cannot be found "
                                    f"safely", offset=offset)
        info.full_seen = True
        self.non_iterable = True

    def continued(self, section_id: int, offset: int) -> SectionInfo:
        info = self.by_id.get(section_id)
        if info is None or not info.iterative:
            raise StreamError(f"PART/END for unknown section id {section_id}", offset=offset)
        if info.ended:
            raise StreamError(f"PART/END after the END of section {info.label}", offset=offset)
        if self.non_iterable:
            raise StreamError(f"PART/END of {info.label} after the non-iterable device sections began",
                              offset=offset)
        return info

    def vfio_ids(self) -> set[int]:
        return set(self._vfio)


def refuse_iterative(idstr: str, offset: int) -> UnsupportedStream:
    """Any START whose handler is not one we parse exactly, whatever its name (ours included)."""
    what = "a handler we cannot parse" if idstr not in KNOWN_UNPARSED_ITERATIVE else "not supported"
    return UnsupportedStream(f"iterative section {idstr!r} is {what}; its payload cannot be "
                             f"delimited safely, refusing the stream", offset=offset)
