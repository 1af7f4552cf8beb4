"""NIC register, descriptor and counter layouts, declared once.

Pure Python (stdlib + the shared bit-field codec): the guest agent imports these to drive
the NIC; the device model imports them to implement it. The NIC is deliberately small: one
RX ring and one TX ring of 16-byte descriptors in IOVA space, written back in place (like
e1000's legacy descriptors), Ethernet frames without FCS.

RX descriptor (16 bytes; software writes Addr and BufLen with Status=0, the device writes
FrameLen, Status and Event back into the same slot):
  Addr[63:0]  IOVA of the receive buffer (any alignment);
  BufLen[79:64]  buffer size in bytes;
  FrameLen[95:80]  bytes of the frame written to the buffer;
  Status[103:96]  a :class:`DescStatus`;
  Event[111:104]  SMMU event ID of the fault (DMA_FAULT only; 0 otherwise).
TX descriptor (16 bytes; software writes Addr and Length with Status=0):
  Addr[63:0]  IOVA of the frame;  Length[79:64]  frame length (14..MAX_FRAME);
  Status[103:96]  written back by the device;  Event[111:104]  as for RX.

Every descriptor and buffer access is a DMA through the SMMU with the NIC's StreamID and
the ring's PASID (CFG.PASID_EN/PASID) as SubstreamID.
"""

from __future__ import annotations

import enum

from devmodel.iommu.bitfield import RecordLayout, bits

DESC_SIZE = 16
MAX_FRAME = 1514  # Ethernet header + 1500-byte payload, no FCS
MIN_FRAME = 14
NIC_ID = 0x3043494E  # "NIC0" in little-endian bytes
DEFAULT_MAC = bytes.fromhex("525400dd0001")  # locally administered (QEMU's OUI range)

RX_DESC = RecordLayout("nic_rx_desc", DESC_SIZE, [
    bits("Addr", 63, 0), bits("BufLen", 79, 64), bits("FrameLen", 95, 80),
    bits("Status", 103, 96), bits("Event", 111, 104),
])

TX_DESC = RecordLayout("nic_tx_desc", DESC_SIZE, [
    bits("Addr", 63, 0), bits("Length", 79, 64), bits("Status", 103, 96), bits("Event", 111, 104),
])


class DescStatus(enum.IntEnum):
    """Written back by the device into a descriptor's Status byte."""

    POSTED = 0x00  # software writes 0 when posting; the device never does
    DONE = 0x01  # RX: frame written, FrameLen valid. TX: frame sent
    DMA_FAULT = 0x02  # buffer access faulted (translation/permission, or PRI Invalid): frame dropped
    TOO_BIG = 0x03  # RX: frame longer than BufLen (dropped); TX: Length outside MIN_FRAME..MAX_FRAME
    PRI_FAILURE = 0x04  # PRG Response Failure: PRI RF set, the ring halts after this descriptor
    LINK_DOWN = 0x05  # TX: the backend is gone; frame dropped


class Reg(enum.IntEnum):
    """BAR0 registers (32-bit unless noted; 64-bit ones also as one 8-byte access)."""

    ID = 0x00  # RO: NIC_ID
    MAC_LO = 0x04  # RO: MAC bytes 0..3 (byte 0 in bits 7:0)
    MAC_HI = 0x08  # RO: MAC bytes 4..5 in bits 15:0
    STATUS = 0x0C  # RO: StatusBit
    CTRL = 0x10  # RW: CtrlBit. Clearing a ring's enable stops it; set again to restart a halted ring
    IRQ_STATUS = 0x14  # RW1C: IrqCause bits latched when the device raises a cause
    RX_BASE = 0x20  # 64-bit IOVA of the RX ring (16-byte aligned; low bits ignored)
    RX_CFG = 0x28  # LOG2SIZE[4:0] (n <= 12), PASID[27:8], PASID_EN[31]
    RX_TAIL = 0x2C  # software: index of the first slot NOT posted (device owns HEAD..TAIL-1)
    RX_HEAD = 0x30  # RO: next slot the device fills
    TX_BASE = 0x40  # 64-bit IOVA of the TX ring
    TX_CFG = 0x48  # as RX_CFG
    TX_TAIL = 0x4C  # doorbell: index of the next free slot (frames HEAD..TAIL-1 are sent)
    TX_HEAD = 0x50  # RO: next slot the device sends
    COUNTERS = 0x80  # RO: one 32-bit counter per NicCounter at COUNTERS + 4 * counter


class StatusBit(enum.IntFlag):
    LINK_UP = 1 << 0  # a packet backend is attached and up
    RX_ENABLED = 1 << 1
    TX_ENABLED = 1 << 2
    RX_HALTED = 1 << 3  # RX descriptor fetch/write-back faulted, or PRI Response Failure
    TX_HALTED = 1 << 4
    RX_WAIT_PRG = 1 << 5  # a frame waits for a page request group response


class CtrlBit(enum.IntFlag):
    RX_ENABLE = 1 << 0
    TX_ENABLE = 1 << 1


class IrqCause(enum.IntFlag):
    """IRQ_STATUS bits; each cause also fires its MSI-X vector."""

    RX = 1 << 0  # an RX descriptor was written back (DONE or an error status)
    TX = 1 << 1  # a TX descriptor was written back
    ERROR = 1 << 2  # a ring halted
    LINK = 1 << 3  # link state changed


CFG_LOG2SIZE_MASK = 0x1F
CFG_MAX_LOG2SIZE = 12
CFG_PASID_SHIFT = 8
CFG_PASID_MASK = 0xFFFFF
CFG_PASID_EN = 1 << 31

MSIX_VECTOR_RX = 0
MSIX_VECTOR_TX = 1
MSIX_VECTOR_ERROR = 2  # IrqCause.ERROR and IrqCause.LINK
MSIX_VECTORS = 3


class NicCounter(enum.IntEnum):
    """RO counters, readable in BAR0 and in the machine's ``stats``."""

    RX_PACKETS = 0  # frames delivered into a guest buffer
    RX_BYTES = 1
    RX_DROPS = 2  # frames not delivered, for any reason (the causes below included)
    RX_NO_BUFFER = 3  # frame arrived with RX disabled/halted or no posted descriptor
    RX_DMA_FAULTS = 4  # RX buffer or descriptor access faulted
    TX_PACKETS = 5
    TX_BYTES = 6
    TX_DROPS = 7
    TX_DMA_FAULTS = 8
    PAGE_REQUESTS = 9  # page requests sent (PRI)
    PRG_SUCCESS = 10
    PRG_INVALID = 11
    PRG_FAILURE = 12
