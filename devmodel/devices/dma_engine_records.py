"""DMA engine descriptor, completion record and register layouts, declared once.

Pure Python (stdlib + the shared bit-field codec): the guest agent imports these to build
descriptors and read completions; the device model imports them to execute them.

Descriptor (64 bytes, in IOVA space, fetched from the ring with the queue's PASID):
  Opcode[7:0]; Flags[15:8] (RCR: write a completion record, RCI: MSI-X on completion,
  PRIV: privileged access); PASID_EN[31]; PASID[51:32]; CompletionAddr[127:64];
  Src/Pattern[191:128]; Dst[255:192]; Length[287:256].
Completion record (32 bytes, written with the descriptor's PASID):
  Status[7:0]; FaultRnW[8] (1 = the faulting access was a read); BytesCompleted[63:32];
  FaultAddr[127:64]; FaultEvent[135:128] (SMMU event ID when one applies).
"""

from __future__ import annotations

import enum

from devmodel.iommu.bitfield import RecordLayout, bits

DESC_SIZE = 64
COMPLETION_SIZE = 32


class DmaOpcode(enum.IntEnum):
    NOP = 0
    COPY = 1
    FILL = 2


class DescFlags(enum.IntFlag):
    RCR = 1 << 0  # request completion record
    RCI = 1 << 1  # request completion interrupt
    PRIV = 1 << 2  # privileged (needs a PASID)


class CompletionStatus(enum.IntEnum):
    NONE = 0x00  # software writes 0 before submitting; the device never does
    SUCCESS = 0x01
    PAGE_FAULT = 0x02  # translation fault not resolved (no PRI, or PRG Invalid Request)
    PRI_RESPONSE_FAILURE = 0x03  # PRG Response Failure: PRI RF set, engine stopped
    DMA_ABORT = 0x04  # ATS UR/CA, bus error, or a translated access refused
    BAD_OPCODE = 0x10
    BAD_DESCRIPTOR = 0x11  # reserved flags, PRIV without PASID, zero-length fill/copy overflow


DESCRIPTOR = RecordLayout("dma_descriptor", DESC_SIZE, [
    bits("Opcode", 7, 0), bits("Flags", 15, 8), bits("PASID_EN", 31), bits("PASID", 51, 32),
    bits("CompletionAddr", 127, 64), bits("Src", 191, 128), bits("Dst", 255, 192),
    bits("Length", 287, 256),
])

COMPLETION = RecordLayout("dma_completion", COMPLETION_SIZE, [
    bits("Status", 7, 0), bits("FaultRnW", 8), bits("BytesCompleted", 63, 32),
    bits("FaultAddr", 127, 64), bits("FaultEvent", 135, 128),
])


class Reg(enum.IntEnum):
    """BAR0 registers of the PCI function (32-bit unless noted)."""

    ID = 0x00  # RO: "DMAE" magic
    CTRL = 0x08  # ENABLE[0]; writing 0 then 1 restarts a halted engine
    STATUS = 0x0C  # RO: ENABLED[0] HALTED[1] WAIT_PRG[2] WAIT_CREDIT[3]
    QUEUE_BASE = 0x10  # 64-bit IOVA of the descriptor ring (64-byte aligned)
    QUEUE_CFG = 0x18  # LOG2SIZE[4:0], PASID_EN[31], PASID[27:8] for ring fetches
    QUEUE_TAIL = 0x20  # doorbell: index of the next free slot (software-owned)
    QUEUE_HEAD = 0x24  # RO: index of the next descriptor to run
    FAULTS = 0x40  # RO counters, one 32-bit word per FaultCounter


ENGINE_ID = 0x45414D44  # "DMAE"
CTRL_ENABLE = 1 << 0
STATUS_ENABLED = 1 << 0
STATUS_HALTED = 1 << 1
STATUS_WAIT_PRG = 1 << 2
STATUS_WAIT_CREDIT = 1 << 3
QCFG_LOG2SIZE_MASK = 0x1F
QCFG_PASID_SHIFT = 8
QCFG_PASID_MASK = 0xFFFFF
QCFG_PASID_EN = 1 << 31


class FaultCounter(enum.IntEnum):
    """Per-type fault counters (index into the FAULTS register block)."""

    TRANSLATION = 0  # SMMU refused an untranslated access
    ATS_NO_ACCESS = 1  # ATS completion with insufficient permission (PRI candidate)
    ATS_ERROR = 2  # ATS UR / CA
    PAGE_REQUEST = 3  # page requests sent
    PRG_SUCCESS = 4
    PRG_INVALID = 5
    PRG_FAILURE = 6
    UNEXPECTED_PRG = 7
    BUS_ERROR = 8
    TRANSLATED_REFUSED = 9


MSIX_VECTOR_COMPLETION = 0
MSIX_VECTOR_ERROR = 1
