"""Names for PCI/PCIe configuration-space registers and their fields.

Offsets and bit positions follow the PCI Local Bus Specification 3.0 (type-0 header),
the PCIe Base Specification (PCI Express capability, extended capabilities) and the
names Linux uses in its uAPI ``pci_regs.h`` so that a reader can cross-check a trace
against ``lspci -vvv``. Only what the framework and its capabilities use is declared;
every other module imports its numbers from here, nothing is spelled twice.
"""

from __future__ import annotations

import enum

# --- Config space sizes -------------------------------------------------------------
#: Conventional PCI config space (header + standard capabilities).
PCI_CFG_SPACE_SIZE = 0x100
#: PCIe extended config space (extended capabilities start at 0x100).
PCI_CFG_SPACE_EXP_SIZE = 0x1000
#: First extended capability header (PCIe Base Spec §7.6.3).
PCI_EXT_CAP_START = 0x100
#: Standard capabilities live between the end of the type-0 header and 0x100.
PCI_STD_CAP_START = 0x40

# --- Type-0 header (PCI 3.0 §6.1) -----------------------------------------------------
PCI_VENDOR_ID = 0x00  # 16, RO
PCI_DEVICE_ID = 0x02  # 16, RO
PCI_COMMAND = 0x04  # 16, RW
PCI_STATUS = 0x06  # 16, RO + RW1C
PCI_REVISION_ID = 0x08  # 8, RO
PCI_CLASS_PROG = 0x09  # 8, RO (programming interface)
PCI_CLASS_DEVICE = 0x0A  # 16, RO (base class << 8 | sub class)
PCI_CACHE_LINE_SIZE = 0x0C  # 8, RW (no effect on PCIe)
PCI_LATENCY_TIMER = 0x0D  # 8, RO 0 on PCIe
PCI_HEADER_TYPE = 0x0E  # 8, RO
PCI_BIST = 0x0F  # 8
PCI_BASE_ADDRESS_0 = 0x10  # six 32-bit BARs, 0x10..0x27
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C  # 16, RO
PCI_SUBSYSTEM_ID = 0x2E  # 16, RO
PCI_ROM_ADDRESS = 0x30  # 32
PCI_CAPABILITY_LIST = 0x34  # 8, RO: first standard capability
PCI_INTERRUPT_LINE = 0x3C  # 8, RW scratch for software
PCI_INTERRUPT_PIN = 0x3D  # 8, RO: 0 none, 1..4 INTA..INTD
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F
PCI_NUM_BARS = 6
PCI_HEADER_TYPE_NORMAL = 0x00


def bar_offset(index: int) -> int:
    """Config offset of BAR ``index`` (0..5)."""
    return PCI_BASE_ADDRESS_0 + 4 * index


class Command(enum.IntFlag):
    """Command register (PCI 3.0 §6.2.2)."""

    IO = 0x0001  # I/O space decode
    MEMORY = 0x0002  # memory space decode
    MASTER = 0x0004  # Bus Master Enable: the function may issue DMA and MSI
    SPECIAL = 0x0008
    INVALIDATE = 0x0010
    VGA_PALETTE = 0x0020
    PARITY = 0x0040  # Parity Error Response
    WAIT = 0x0080
    SERR = 0x0100  # SERR# enable
    FAST_BACK = 0x0200
    INTX_DISABLE = 0x0400  # the function must not assert INTx


class Status(enum.IntFlag):
    """Status register (PCI 3.0 §6.2.3)."""

    IMM_READY = 0x0001
    INTERRUPT = 0x0008  # RO: INTx asserted (independent of INTX_DISABLE)
    CAP_LIST = 0x0010  # RO: capability list at 0x34 is valid
    MHZ_66 = 0x0020
    UDF = 0x0040
    FAST_BACK = 0x0080
    PARITY = 0x0100  # RW1C Master Data Parity Error
    DEVSEL_MASK = 0x0600
    SIG_TARGET_ABORT = 0x0800  # RW1C
    REC_TARGET_ABORT = 0x1000  # RW1C
    REC_MASTER_ABORT = 0x2000  # RW1C
    SIG_SYSTEM_ERROR = 0x4000  # RW1C
    DETECTED_PARITY = 0x8000  # RW1C


#: Status bits software clears by writing 1 (PCI 3.0 §6.2.3; PCIe §7.5.1.1.4).
STATUS_W1C = (Status.PARITY | Status.SIG_TARGET_ABORT | Status.REC_TARGET_ABORT
              | Status.REC_MASTER_ABORT | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY)


class BarFlag(enum.IntFlag):
    """Low bits of a Base Address Register (PCI 3.0 §6.2.5.1)."""

    SPACE_IO = 0x1  # bit 0: 1 = I/O space
    MEM_TYPE_64 = 0x4  # bits 2:1 = 10b: 64-bit memory BAR (uses the next BAR too)
    PREFETCH = 0x8  # bit 3: prefetchable memory


#: Address bits of a memory BAR start at bit 4, of an I/O BAR at bit 2.
BAR_MEM_FLAG_BITS = 0xF
BAR_IO_FLAG_BITS = 0x3
#: Expansion ROM BAR: enable bit 0, address bits 31:11.
ROM_ADDRESS_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFFF800


class CapId(enum.IntEnum):
    """Standard capability IDs (PCI Code and ID Assignment Spec)."""

    PM = 0x01
    MSI = 0x05
    VNDR = 0x09
    EXP = 0x10  # PCI Express
    MSIX = 0x11


class ExtCapId(enum.IntEnum):
    """Extended capability IDs (PCIe Base Spec §7.6)."""

    ERR = 0x0001  # AER
    VNDR = 0x000B
    ACS = 0x000D
    ARI = 0x000E
    ATS = 0x000F
    SRIOV = 0x0010
    PRI = 0x0013
    PASID = 0x001B


# --- Standard capability header: ID (8), Next (8) -------------------------------------
CAP_ID_OFFSET = 0x0
CAP_NEXT_OFFSET = 0x1
#: Capabilities are dword-aligned; the bottom two bits of a pointer are reserved.
CAP_PTR_MASK = 0xFC

# --- Extended capability header: ID[15:0], Version[19:16], Next[31:20] (§7.6.3) ---------
EXT_CAP_ID_MASK = 0x0000FFFF
EXT_CAP_VER_SHIFT = 16
EXT_CAP_VER_MASK = 0xF
EXT_CAP_NEXT_SHIFT = 20
EXT_CAP_NEXT_MASK = 0xFFC


def ext_cap_header(cap_id: int, version: int, next_offset: int) -> int:
    """Pack an extended capability header dword."""
    return ((cap_id & EXT_CAP_ID_MASK) | ((version & EXT_CAP_VER_MASK) << EXT_CAP_VER_SHIFT)
            | ((next_offset & EXT_CAP_NEXT_MASK) << EXT_CAP_NEXT_SHIFT))


def ext_cap_fields(header: int) -> tuple[int, int, int]:
    """Unpack (id, version, next) from an extended capability header dword."""
    return (header & EXT_CAP_ID_MASK, (header >> EXT_CAP_VER_SHIFT) & EXT_CAP_VER_MASK,
            (header >> EXT_CAP_NEXT_SHIFT) & EXT_CAP_NEXT_MASK)


# --- PCI Express capability (PCIe Base Spec §7.5.3; reference §8.1) --------------------
PCI_EXP_FLAGS = 0x02  # PCI Express Capabilities register (16)
PCI_EXP_DEVCAP = 0x04  # Device Capabilities (32)
PCI_EXP_DEVCTL = 0x08  # Device Control (16)
PCI_EXP_DEVSTA = 0x0A  # Device Status (16)
PCI_EXP_LNKCAP = 0x0C  # Link Capabilities (32)
PCI_EXP_LNKCTL = 0x10  # Link Control (16)
PCI_EXP_LNKSTA = 0x12  # Link Status (16)
PCI_EXP_SLTCAP = 0x14
PCI_EXP_SLTCTL = 0x18
PCI_EXP_SLTSTA = 0x1A
PCI_EXP_RTCTL = 0x1C
PCI_EXP_RTCAP = 0x1E
PCI_EXP_RTSTA = 0x20
PCI_EXP_DEVCAP2 = 0x24  # Device Capabilities 2 (32)
PCI_EXP_DEVCTL2 = 0x28  # Device Control 2 (16)
PCI_EXP_DEVSTA2 = 0x2A
PCI_EXP_LNKCAP2 = 0x2C  # Link Capabilities 2 (32)
PCI_EXP_LNKCTL2 = 0x30  # Link Control 2 (16)
PCI_EXP_LNKSTA2 = 0x32  # Link Status 2 (16)
#: A version-2 PCI Express capability is 0x3C bytes (reference §8.1).
PCI_CAP_EXP_SIZEOF_V2 = 0x3C

PCI_EXP_FLAGS_VERS_MASK = 0x000F
PCI_EXP_FLAGS_TYPE_SHIFT = 4
PCI_EXP_FLAGS_TYPE_MASK = 0x00F0
PCI_EXP_FLAGS_SLOT = 0x0100
PCI_EXP_FLAGS_IRQ_SHIFT = 9


class PcieType(enum.IntEnum):
    """Device/Port Type in the PCI Express Capabilities register."""

    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    ROOT_PORT = 0x4
    RC_END = 0x9  # Root Complex Integrated Endpoint: no link registers


# Device Capabilities
PCI_EXP_DEVCAP_PAYLOAD_MASK = 0x00000007  # Max_Payload_Size Supported: 128 << n bytes
PCI_EXP_DEVCAP_PHANTOM_MASK = 0x00000018
PCI_EXP_DEVCAP_EXT_TAG = 0x00000020
PCI_EXP_DEVCAP_L0S_SHIFT = 6
PCI_EXP_DEVCAP_L1_SHIFT = 9
PCI_EXP_DEVCAP_RBER = 0x00008000  # Role-Based Error Reporting (set by every PCIe 1.1+ fn)
PCI_EXP_DEVCAP_FLR = 0x10000000  # Function Level Reset capable

# Device Control
PCI_EXP_DEVCTL_CERE = 0x0001
PCI_EXP_DEVCTL_NFERE = 0x0002
PCI_EXP_DEVCTL_FERE = 0x0004
PCI_EXP_DEVCTL_URRE = 0x0008
PCI_EXP_DEVCTL_RELAX_EN = 0x0010
PCI_EXP_DEVCTL_PAYLOAD_MASK = 0x00E0
PCI_EXP_DEVCTL_EXT_TAG = 0x0100
PCI_EXP_DEVCTL_PHANTOM = 0x0200
PCI_EXP_DEVCTL_AUX_PME = 0x0400
PCI_EXP_DEVCTL_NOSNOOP_EN = 0x0800
PCI_EXP_DEVCTL_READRQ_MASK = 0x7000
PCI_EXP_DEVCTL_READRQ_512B = 0x2000  # reset default of Max_Read_Request_Size
PCI_EXP_DEVCTL_BCR_FLR = 0x8000  # Initiate Function Level Reset (reads 0)

# Device Status
PCI_EXP_DEVSTA_CED = 0x0001  # RW1C correctable error detected
PCI_EXP_DEVSTA_NFED = 0x0002  # RW1C
PCI_EXP_DEVSTA_FED = 0x0004  # RW1C
PCI_EXP_DEVSTA_URD = 0x0008  # RW1C unsupported request detected
PCI_EXP_DEVSTA_AUXPD = 0x0010  # RO
PCI_EXP_DEVSTA_TRPND = 0x0020  # RO transactions pending
PCI_EXP_DEVSTA_W1C = 0x000F

# Link Capabilities
PCI_EXP_LNKCAP_SLS_MASK = 0x0000000F  # Max Link Speed (index into LNKCAP2 vector)
PCI_EXP_LNKCAP_MLW_SHIFT = 4  # Maximum Link Width [9:4]
PCI_EXP_LNKCAP_MLW_MASK = 0x000003F0
PCI_EXP_LNKCAP_ASPMS_SHIFT = 10
PCI_EXP_LNKCAP_PN_SHIFT = 24  # Port Number [31:24]

# Link Control
PCI_EXP_LNKCTL_ASPMC = 0x0003
PCI_EXP_LNKCTL_RCB = 0x0008
PCI_EXP_LNKCTL_CCC = 0x0040
PCI_EXP_LNKCTL_ES = 0x0080
PCI_EXP_LNKCTL_HAWD = 0x0200

# Link Status
PCI_EXP_LNKSTA_CLS_MASK = 0x000F  # Current Link Speed
PCI_EXP_LNKSTA_NLW_SHIFT = 4  # Negotiated Link Width [9:4]
PCI_EXP_LNKSTA_NLW_MASK = 0x03F0

# Device Capabilities 2
PCI_EXP_DEVCAP2_COMP_TMOUT_DIS = 0x00000010
PCI_EXP_DEVCAP2_EE_PREFIX = 0x00200000  # End-End TLP Prefix Supported (needed for PASID)
PCI_EXP_DEVCAP2_EE_PREFIX_MAX_SHIFT = 22  # Max End-End TLP Prefixes [23:22], 00b = 4
PCI_EXP_DEVCAP2_EE_PREFIX_MAX_MASK = 0x00C00000

# Device Control 2
PCI_EXP_DEVCTL2_COMP_TMOUT_DIS = 0x0010
PCI_EXP_DEVCTL2_EETLP_BLOCK = 0x8000  # End-End TLP Prefix Blocking

# Link Capabilities 2 / Control 2
PCI_EXP_LNKCAP2_SLS_SHIFT = 1  # Supported Link Speeds Vector [7:1]
PCI_EXP_LNKCTL2_TLS_MASK = 0x000F  # Target Link Speed

# --- MSI-X capability (reference §8.2) ------------------------------------------------
PCI_MSIX_FLAGS = 0x02  # Message Control (16)
PCI_MSIX_FLAGS_QSIZE = 0x07FF  # Table Size = N - 1
PCI_MSIX_FLAGS_MASKALL = 0x4000  # Function Mask
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 0x04  # Table Offset / BIR (32)
PCI_MSIX_PBA = 0x08  # PBA Offset / BIR (32)
PCI_MSIX_BIR_MASK = 0x7
PCI_MSIX_OFFSET_MASK = 0xFFFFFFF8
PCI_CAP_MSIX_SIZEOF = 12
# Table entry
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0x0
PCI_MSIX_ENTRY_UPPER_ADDR = 0x4
PCI_MSIX_ENTRY_DATA = 0x8
PCI_MSIX_ENTRY_VECTOR_CTRL = 0xC
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1

# --- MSI capability (PCI 3.0 §6.8.1) --------------------------------------------------
PCI_MSI_FLAGS = 0x02
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E  # Multiple Message Capable (log2)
PCI_MSI_FLAGS_QSIZE = 0x0070  # Multiple Message Enable (log2)
PCI_MSI_FLAGS_QSIZE_SHIFT = 4
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100  # per-vector masking capable
PCI_MSI_ADDRESS_LO = 0x04
PCI_MSI_ADDRESS_HI = 0x08  # 64-bit only
PCI_MSI_DATA_64 = 0x0C
PCI_MSI_MASK_64 = 0x10
PCI_MSI_PENDING_64 = 0x14
PCI_CAP_MSI_SIZEOF_64_MASK = 0x18

# --- ATS extended capability (reference §8.3) ------------------------------------------
PCI_ATS_CAP = 0x04  # ATS Capability (16, RO)
PCI_ATS_CAP_QDEP_MASK = 0x001F  # Invalidate Queue Depth, 0 means 32
PCI_ATS_CAP_PAGE_ALIGNED = 0x0020
PCI_ATS_CAP_GLOBAL_INV = 0x0040
PCI_ATS_CTRL = 0x06  # ATS Control (16, RW)
PCI_ATS_CTRL_ENABLE = 0x8000
PCI_ATS_CTRL_STU_MASK = 0x001F  # Smallest Translation Unit = 2^(STU+12) bytes
PCI_EXT_CAP_ATS_SIZEOF = 8

# --- PRI extended capability (reference §8.5) ------------------------------------------
PCI_PRI_CTRL = 0x04  # PRI Control (16)
PCI_PRI_CTRL_ENABLE = 0x0001
PCI_PRI_CTRL_RESET = 0x0002
PCI_PRI_STATUS = 0x06  # PRI Status (16)
PCI_PRI_STATUS_RF = 0x0001  # RW1C Response Failure
PCI_PRI_STATUS_UPRGI = 0x0002  # RW1C Unexpected PRG Index
PCI_PRI_STATUS_STOPPED = 0x0100  # RO
PCI_PRI_STATUS_PASID = 0x8000  # RO PRG Response PASID Required
PCI_PRI_MAX_REQ = 0x08  # Outstanding Page Request Capacity (32, RO)
PCI_PRI_ALLOC_REQ = 0x0C  # Outstanding Page Request Allocation (32, RW)
PCI_EXT_CAP_PRI_SIZEOF = 16

# --- PASID extended capability (reference §8.4) ----------------------------------------
PCI_PASID_CAP = 0x04  # PASID Capability (16, RO)
PCI_PASID_CAP_EXEC = 0x0002
PCI_PASID_CAP_PRIV = 0x0004
PCI_PASID_CAP_WIDTH_SHIFT = 8  # Max PASID Width [12:8]
PCI_PASID_CAP_WIDTH_MASK = 0x1F00
PCI_PASID_CTRL = 0x06  # PASID Control (16, RW)
PCI_PASID_CTRL_ENABLE = 0x0001
PCI_PASID_CTRL_EXEC = 0x0002
PCI_PASID_CTRL_PRIV = 0x0004
PCI_EXT_CAP_PASID_SIZEOF = 8
#: The PASID TLP prefix carries 20 bits.
PASID_MAX_WIDTH = 20
