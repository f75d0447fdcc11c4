"""Every constant of the QEMU migration stream and the libvirt save image, in one place.

Names follow QEMU's own (``QEMU_VM_SECTION_START`` → ``SectionType.SECTION_START``,
``RAM_SAVE_FLAG_ZERO`` → ``RamFlag.ZERO``, ``VFIO_MIG_FLAG_END_OF_STATE`` →
``VfioFlag.END_OF_STATE``) so a QEMU developer can grep both trees with one word.
Values were checked against QEMU's sources (migration/savevm.[ch], migration/ram.c,
hw/vfio/migration.c, migration/block-dirty-bitmap.c) and libvirt's
src/qemu/qemu_saveimage.h; docs/stream-format.md describes the formats.

Nothing else in the package may spell one of these numbers.
"""
from __future__ import annotations

import enum
import struct

# --- migration/savevm.c: file header ----------------------------------------------

#: "QEVM", be32 (QEMU_VM_FILE_MAGIC)
QEMU_VM_FILE_MAGIC = 0x5145564D
#: be32 (QEMU_VM_FILE_VERSION); 2 (QEMU_VM_FILE_VERSION_COMPAT) is rejected by QEMU as obsolete
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002
FILE_HEADER = struct.Struct(">II")


class SectionType(enum.IntEnum):
    """Top-level record type bytes (migration/savevm.h ``QEMU_VM_*``)."""

    #: end of the device state; vmdesc may follow
    EOF = 0x00
    #: first part of an iterative section: header with idstr, then payload, then footer
    SECTION_START = 0x01
    #: a further part of an iterative section (header is only the section id)
    SECTION_PART = 0x02
    #: the last part of an iterative section (completion)
    SECTION_END = 0x03
    #: a whole non-iterative section (a vmstate blob; not self-delimiting)
    SECTION_FULL = 0x04
    #: a vmstate subsection, only inside payloads (and CONFIGURATION)
    SUBSECTION = 0x05
    #: JSON description of the non-iterative devices, after EOF
    VMDESCRIPTION = 0x06
    #: machine type and validated capabilities, right after the file header
    CONFIGURATION = 0x07
    #: a control command (be16 cmd, be16 len, data)
    COMMAND = 0x08
    #: ``7e <be32 section_id>`` after every START/PART/END/FULL payload
    SECTION_FOOTER = 0x7E


class MigCommand(enum.IntEnum):
    """``enum qemu_vm_cmd`` (migration/savevm.c ``MIG_CMD_*``)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


#: fixed payload lengths QEMU's loader enforces (``mig_cmd_args``); -1 = variable
MIG_COMMAND_LEN: dict[MigCommand, int] = {
    MigCommand.OPEN_RETURN_PATH: 0,
    MigCommand.PING: 4,
    MigCommand.POSTCOPY_ADVISE: -1,
    MigCommand.POSTCOPY_LISTEN: 0,
    MigCommand.POSTCOPY_RUN: 0,
    MigCommand.POSTCOPY_RAM_DISCARD: -1,
    MigCommand.PACKAGED: 4,
    MigCommand.ENABLE_COLO: 0,
    MigCommand.POSTCOPY_RESUME: 0,
    MigCommand.RECV_BITMAP: -1,
    MigCommand.SWITCHOVER_START: 0,
}

#: the configuration section's subsection names (migration/savevm.c vmstate_configuration)
CONFIG_SUB_PAGE_BITS = "configuration/target-page-bits"
CONFIG_SUB_CAPABILITIES = "configuration/capabilities"
CONFIG_SUB_UUID = "configuration/uuid"

# --- migration/ram.c ------------------------------------------------------------

#: ``register_savevm_live("ram", 0, 4, ...)``
RAM_IDSTR = "ram"
RAM_VERSION = 4
#: x86 TARGET_PAGE_BITS; other targets announce theirs in configuration/target-page-bits
DEFAULT_TARGET_PAGE_BITS = 12


class RamFlag(enum.IntFlag):
    """``RAM_SAVE_FLAG_*``: the low TARGET_PAGE_BITS of each be64 record header."""

    #: obsolete since 2009, never sent
    FULL = 0x01
    #: page of one byte value (QEMU ≥8 requires 0); one fill byte follows ("COMPRESS" in old trees)
    ZERO = 0x02
    #: addr = total RAM size; the RAMBlock list follows (setup only)
    MEM_SIZE = 0x04
    #: TARGET_PAGE_SIZE raw bytes follow
    PAGE = 0x08
    #: end of this section's payload
    EOS = 0x10
    #: same RAMBlock as the previous page: no idstr in the header
    CONTINUE = 0x20
    #: XBZRLE-encoded page: u8 encoding flag, be16 length, data
    XBZRLE = 0x40
    #: RDMA only; never in a byte stream
    HOOK = 0x80
    #: zlib page (compress capability, removed in 9.1): be32 length, data
    COMPRESS_PAGE = 0x100
    #: multifd sync point (≥8.1), no payload
    MULTIFD_FLUSH = 0x200


#: ``ENCODING_FLAG_XBZRLE``
XBZRLE_ENCODING_FLAG = 0x01

# --- hw/vfio/migration.c ----------------------------------------------------------

#: idstr suffix of a VFIO device's section (``"<qdev path>/vfio"`` or just ``"vfio"``)
VFIO_IDSTR_SUFFIX = "/vfio"
VFIO_IDSTR_BARE = "vfio"
VFIO_VERSION = 1


class VfioFraming(enum.StrEnum):
    """The VFIO migration protocol a device's sections use (docs/stream-format.md)."""

    #: QEMU 5.2–7.2: a data block in every PART (size 0 once nothing is pending)
    V1 = "v1"
    #: QEMU >= 8.0: PARTs carry blocks only while there is data; switchover-ack
    V2 = "v2"
    #: QEMU >= 10.0 multifd device-state transfer: the device's stop-copy state as the
    #: multifd device-state packets that carried it, in arrival order (docs/multifd.md)
    MULTIFD = "multifd"


class VfioFlag(enum.IntEnum):
    """``VFIO_MIG_FLAG_*``: be64 markers that frame a VFIO device's payload."""

    #: ends a group of state (and every START/PART/END/FULL payload)
    END_OF_STATE = 0xFFFFFFFFEF100001
    #: config space (a VFIOPCIDevice vmstate) follows, terminated by END_OF_STATE
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    #: START payload marker (followed by END_OF_STATE)
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    #: a data block follows: be64 size, then size opaque bytes of device state
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    #: v2 (≥8.1) switchover-ack: the initial bytes were sent
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
    #: 10.x multifd device-state transfer: config is loaded after the iterables
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006


BE64 = struct.Struct(">Q")
BE32 = struct.Struct(">I")
BE16 = struct.Struct(">H")

# --- hw/vfio/migration-multifd.c: device state on multifd channels (QEMU >= 10.0) ------

#: VFIODeviceStatePacket, the start of every multifd device-state buffer VFIO sends:
#: be32 version, be32 idx (the buffer's place in the device's state), be32 flags
VFIO_STATE_PACKET = struct.Struct(">III")
#: VFIO_DEVICE_STATE_PACKET_VER_CURRENT: the only version the loader accepts
VFIO_STATE_PACKET_VERSION = 0
#: an idx the loader refuses (it marks "no last buffer yet")
VFIO_STATE_PACKET_BAD_IDX = 0xFFFFFFFF


class VfioPacketFlag(enum.IntFlag):
    """``VFIO_DEVICE_STATE_*`` flags of a VFIODeviceStatePacket."""

    #: this buffer is the device's config (DEV_CONFIG_STATE ... END_OF_STATE), its last one
    CONFIG_STATE = 1

# --- hw/virtio/virtio-mem.c: the early-setup vmstate (QEMU >= 8.0) -------------------

#: vmstate name of virtio-mem's ``early_setup`` section; the idstr is ``<qdev path>/<name>``
VIRTIO_MEM_EARLY_VMSD = "virtio-mem-device-early"
#: its version_id and minimum_version_id (the loader accepts nothing else)
VIRTIO_MEM_EARLY_VERSION = 1
#: be64 addr, be64 region_size, be64 block_size, be32 node (sanity checks), be64 size
VIRTIO_MEM_EARLY_FIXED = struct.Struct(">QQQIQ")

# --- migration/ram.c: mapped-ram (QEMU >= 9.0, libvirt's "sparse" save format) --------

#: the configuration capability that switches RAM to fixed file offsets
MAPPED_RAM_CAPABILITY = "mapped-ram"
#: ``MappedRamHeader`` (packed): be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
MAPPED_RAM_HDR_VERSION = 1
#: ``MAPPED_RAM_FILE_OFFSET_ALIGNMENT``: every RAMBlock's pages start on a 1 MiB boundary
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 1 << 20

# --- migration/block-dirty-bitmap.c -------------------------------------------------

DIRTY_BITMAP_IDSTR = "dirty-bitmap"
DIRTY_BITMAP_VERSION = 1


class DirtyBitmapFlag(enum.IntFlag):
    """``DIRTY_BITMAP_MIG_FLAG_*``."""

    EOS = 0x01
    ZEROES = 0x02
    BITMAP_NAME = 0x04
    DEVICE_NAME = 0x08
    START = 0x10
    COMPLETE = 0x20
    BITS = 0x40
    #: a second flags byte follows
    EXTRA_FLAGS = 0x80


# --- libvirt src/qemu/qemu_saveimage.h --------------------------------------------

SAVE_MAGIC_COMPLETE = b"LibvirtQemudSave"
SAVE_MAGIC_PARTIAL = b"LibvirtQemudPart"
SAVE_VERSION = 2
#: magic[16], version, data_len, was_running, format, cookieOffset, unused[14] (host order, LE on x86)
SAVE_HEADER = struct.Struct("<16sIIIII56s")
SAVE_HEADER_LEN = SAVE_HEADER.size  # 92


class SaveFormat(enum.IntEnum):
    """``QEMU_SAVE_FORMAT_*`` (qemu_saveimage_format.h)."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5
    SPARSE = 6


# --- limits a hostile stream cannot exceed ---------------------------------------------
# Why these numbers: each is far above anything QEMU 7.2–10.x writes for real guests,
# and small enough that a claim beyond it is an attack or corruption (fail closed).

#: machine type name in CONFIGURATION (QEMU names are < 64 bytes)
MAX_MACHINE_NAME = 256
#: vmdesc JSON; QEMU 10's for a q35 guest is 44 KiB, a pc guest 100 KiB, a large VM a few MiB.
#: It is held whole while checked (vmdesc.py): peak memory about 2x this plus ~25 MiB, and
#: the worst shape (``[0],`` repeated) takes ~1 s per MiB on a slow core
MAX_VMDESC_LEN = 16 << 20
#: libvirt save image XML + cookie + padding (libvirt pads by 64 KiB)
MAX_SAVE_DATA_LEN = 64 << 20
#: one opaque FULL section body (device vmstate; VGA RAM travels as a RAMBlock, not here)
MAX_FULL_SECTION = 256 << 20
#: one VFIO data block (QEMU ≥8 uses ≤1 MiB; v1 vendor drivers may use more)
MAX_VFIO_BLOCK = 1 << 36
#: distinct section ids in one stream
MAX_SECTIONS = 65536
#: RAMBlocks in the MEM_SIZE list
MAX_RAM_BLOCKS = 4096
#: capabilities in configuration/capabilities
MAX_CAPABILITIES = 256
#: VFIO devices in one stream
MAX_VFIO_DEVICES = 256
#: virtio-mem early-setup bitmap (one bit per block): 1 MiB covers 8 Mi blocks, 8 TiB at the
#: smallest 1 MiB block size; the loader's own device decides the size, this only caps the claim
MAX_VIRTIO_MEM_BITMAP = 1 << 20
#: vmdesc JSON nesting: QEMU's descriptions nest a few levels per vmstate struct (< 30 seen);
#: deeper is refused before any parsing work that grows with depth
MAX_VMDESC_DEPTH = 64
#: one mapped-ram RAMBlock region (bitmap + pages) that the parser skips: 16 TiB
MAX_MAPPED_RAM_REGION = 1 << 44
#: one libvirt-mdev record (a signed statement is a few hundred bytes)
MAX_OUR_RECORD = 64 << 10
#: one dirty-bitmap BITS buffer (QEMU sends bitmaps in chunks far below this)
MAX_DIRTY_BITMAP_BUF = 64 << 20
