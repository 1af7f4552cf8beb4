"""SMMUv3 in-memory record formats, declared once (IHI0070 G.b; reference smmuv3-pcie.md).

Pure Python, stdlib only: imported by the emulated SMMU, the host driver, the VMM's
vIOMMU and the guest agent alike. Bit numbers are absolute within the little-endian
record (bit 0 = LSB of byte 0). Address fields take and return byte addresses.

Contents: event record (32 B, §3 of the reference), PRI queue record (16 B, §4.1),
commands (16 B, §5), STE (64 B, §6.2), CD (64 B, §6.5), L1STD and L1CD (8 B, §6.1/§6.4).
"""

from __future__ import annotations

import enum

from devmodel.iommu.bitfield import BitField, Fields, RecordLayout, bits

EVENT_SIZE = 32
PRI_SIZE = 16
CMD_SIZE = 16
STE_SIZE = 64
CD_SIZE = 64
L1STD_SIZE = 8
L1CD_SIZE = 8


# --------------------------------------------------------------------------- events


class EventId(enum.IntEnum):
    """Event record EventID values (reference §3.2)."""

    F_UUT = 0x01
    C_BAD_STREAMID = 0x02
    F_STE_FETCH = 0x03
    C_BAD_STE = 0x04
    F_BAD_ATS_TREQ = 0x05
    F_STREAM_DISABLED = 0x06
    F_TRANSL_FORBIDDEN = 0x07
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13
    F_TLB_CONFLICT = 0x20
    F_CFG_CONFLICT = 0x21
    E_PAGE_REQUEST = 0x24
    F_VMS_FETCH = 0x25


#: The four Translation-related faults whose recording/termination CD.{A,R,S} and
#: STE.{S2R,S2S} configure (reference §3.3).
TRANSLATION_RELATED = frozenset(
    {EventId.F_TRANSLATION, EventId.F_ADDR_SIZE, EventId.F_ACCESS, EventId.F_PERMISSION}
)


class EventClass(enum.IntEnum):
    """Event CLASS field: which stage-2 input faulted (or IN for stage 1)."""

    CD = 0b00
    TT = 0b01
    IN = 0b10


EVENT = RecordLayout(
    "event",
    EVENT_SIZE,
    [
        bits("EventID", 7, 0),
        bits("SSV", 11),
        bits("SubstreamID", 31, 12),
        bits("StreamID", 63, 32),
        # DW1[15:0] is STAG in the stall-capable faults and Reason in others (same bits).
        bits("STAG", 79, 64),
        bits("GPCF", 80),
        bits("Stall", 95),
        bits("PnU", 97),
        bits("InD", 98),
        bits("RnW", 99),
        bits("NSIPA", 100),
        bits("S2", 103),
        bits("CLASS", 105, 104),
        bits("TTRnW", 108),
        bits("InputAddr", 191, 128),
        # IPA (stage-2 faults) and FetchAddr (*_FETCH, F_WALK_EABT) share DW3.
        bits("IPA", 247, 204, scale=12),
        bits("FetchAddr", 247, 195, scale=3),
    ],
)

#: Fields each event ID carries (reference §3.2); everything else is written as zero.
_FULL_SET = ("StreamID", "SSV", "SubstreamID", "Stall", "STAG", "PnU", "InD", "RnW", "S2",
             "CLASS", "InputAddr", "IPA", "TTRnW")
EVENT_FIELDS: dict[EventId, tuple[str, ...]] = {
    EventId.F_UUT: ("StreamID", "SSV", "SubstreamID", "RnW", "InD", "PnU", "InputAddr"),
    EventId.C_BAD_STREAMID: ("StreamID", "SSV", "SubstreamID"),
    EventId.F_STE_FETCH: ("StreamID", "SSV", "SubstreamID", "FetchAddr"),
    EventId.C_BAD_STE: ("StreamID", "SSV", "SubstreamID"),
    EventId.F_BAD_ATS_TREQ: ("StreamID", "SSV", "SubstreamID", "InputAddr", "RnW", "InD", "PnU"),
    EventId.F_STREAM_DISABLED: ("StreamID",),
    EventId.F_TRANSL_FORBIDDEN: ("StreamID", "RnW", "InputAddr"),
    EventId.C_BAD_SUBSTREAMID: ("StreamID", "SubstreamID"),
    EventId.F_CD_FETCH: ("StreamID", "SSV", "SubstreamID", "FetchAddr"),
    EventId.C_BAD_CD: ("StreamID", "SSV", "SubstreamID"),
    EventId.F_WALK_EABT: ("StreamID", "SSV", "SubstreamID", "RnW", "InD", "PnU", "S2", "CLASS",
                          "InputAddr", "FetchAddr"),
    EventId.F_TRANSLATION: _FULL_SET,
    EventId.F_ADDR_SIZE: _FULL_SET,
    EventId.F_ACCESS: _FULL_SET,
    EventId.F_PERMISSION: _FULL_SET,
    EventId.F_TLB_CONFLICT: ("StreamID", "SSV", "SubstreamID", "RnW", "InD", "PnU", "S2",
                             "InputAddr", "IPA"),
    EventId.F_CFG_CONFLICT: ("StreamID", "SSV", "SubstreamID"),
    EventId.E_PAGE_REQUEST: ("StreamID", "SSV", "SubstreamID", "InputAddr"),
    EventId.F_VMS_FETCH: ("StreamID", "SSV", "SubstreamID", "FetchAddr", "GPCF"),
}


def encode_event(event_id: EventId, **fields: int) -> bytes:
    """Build a 32-byte event record keeping only the fields valid for ``event_id``.

    IPA is kept only when S2=1 (it is UNKNOWN for stage-1 faults, §3.1); TTRnW only for
    F_PERMISSION with CLASS=TT.
    """
    allowed = EVENT_FIELDS[EventId(event_id)]
    values = {k: v for k, v in fields.items() if k in allowed and v}
    if not values.get("S2"):
        values.pop("IPA", None)
    if event_id != EventId.F_PERMISSION or values.get("CLASS") != EventClass.TT:
        values.pop("TTRnW", None)
    if not values.get("SSV") and event_id != EventId.C_BAD_SUBSTREAMID:
        values.pop("SubstreamID", None)
    if event_id == EventId.C_BAD_SUBSTREAMID:
        values.pop("SSV", None)
    return EVENT.encode(values, EventID=int(event_id))


def decode_event(data: bytes) -> Fields:
    """Decode an event record (all fields; interpret by EventID)."""
    return EVENT.decode(data)


# --------------------------------------------------------------------------- PRI queue

PRI = RecordLayout(
    "pri",
    PRI_SIZE,
    [
        bits("StreamID", 31, 0),
        bits("SubstreamID", 51, 32),
        bits("Priv", 58),
        bits("Exec", 59),
        bits("R", 60),
        bits("W", 61),
        bits("L", 62),
        bits("SSV", 63),
        bits("PRGIndex", 72, 64),
        bits("PageAddr", 127, 76, scale=12),
    ],
)


def is_stop_marker(rec: Fields) -> bool:
    """A PASID Stop Marker: SSV=1 with L=1, W=0, R=0 (reference §4.1)."""
    return bool(rec.SSV and rec.L and not rec.W and not rec.R)


# --------------------------------------------------------------------------- commands


class Opcode(enum.IntEnum):
    """Command opcodes (reference §5.2)."""

    CMD_PREFETCH_CONFIG = 0x01
    CMD_PREFETCH_ADDR = 0x02
    CMD_CFGI_STE = 0x03
    CMD_CFGI_STE_RANGE = 0x04  # Range=31 is CMD_CFGI_ALL
    CMD_CFGI_CD = 0x05
    CMD_CFGI_CD_ALL = 0x06
    CMD_CFGI_VMS_PIDM = 0x07
    CMD_TLBI_NH_ALL = 0x10
    CMD_TLBI_NH_ASID = 0x11
    CMD_TLBI_NH_VA = 0x12
    CMD_TLBI_NH_VAA = 0x13
    CMD_TLBI_EL3_ALL = 0x18
    CMD_TLBI_EL3_VA = 0x1A
    CMD_TLBI_EL2_ALL = 0x20
    CMD_TLBI_EL2_ASID = 0x21
    CMD_TLBI_EL2_VA = 0x22
    CMD_TLBI_EL2_VAA = 0x23
    CMD_TLBI_S12_VMALL = 0x28
    CMD_TLBI_S2_IPA = 0x2A
    CMD_TLBI_NSNH_ALL = 0x30
    CMD_ATC_INV = 0x40
    CMD_PRI_RESP = 0x41
    CMD_RESUME = 0x44
    CMD_STALL_TERM = 0x45
    CMD_SYNC = 0x46
    CMD_DPTI_ALL = 0x70
    CMD_DPTI_PA = 0x73


CFGI_ALL_RANGE = 31

_COMMON = [bits("Opcode", 7, 0), bits("SSec", 10)]
_SID = [bits("StreamID", 63, 32)]
_SSID = [bits("SSV", 11), bits("SubstreamID", 31, 12)]
_TLBI_RANGE = [bits("NUM", 16, 12), bits("SCALE", 25, 20), bits("VMID", 47, 32),
               bits("Leaf", 64), bits("TTL128", 71), bits("TTL", 73, 72), bits("TG", 75, 74)]


def _cmd(name: str, fields: list[BitField]) -> RecordLayout:
    return RecordLayout(name, CMD_SIZE, _COMMON + fields)


#: One layout per opcode. Opcodes absent here are reserved (CERROR_ILL).
COMMANDS: dict[Opcode, RecordLayout] = {
    Opcode.CMD_PREFETCH_CONFIG: _cmd("CMD_PREFETCH_CONFIG", _SSID + _SID),
    Opcode.CMD_PREFETCH_ADDR: _cmd("CMD_PREFETCH_ADDR", _SSID + _SID + [
        bits("Size", 68, 64), bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_CFGI_STE: _cmd("CMD_CFGI_STE", _SID + [bits("Leaf", 64)]),
    Opcode.CMD_CFGI_STE_RANGE: _cmd("CMD_CFGI_STE_RANGE", _SID + [bits("Range", 68, 64)]),
    Opcode.CMD_CFGI_CD: _cmd("CMD_CFGI_CD", _SSID[1:] + _SID + [bits("Leaf", 64)]),
    Opcode.CMD_CFGI_CD_ALL: _cmd("CMD_CFGI_CD_ALL", _SID),
    Opcode.CMD_CFGI_VMS_PIDM: _cmd("CMD_CFGI_VMS_PIDM", [bits("VMID", 47, 32)]),
    Opcode.CMD_TLBI_NH_ALL: _cmd("CMD_TLBI_NH_ALL", [bits("VMID", 47, 32)]),
    Opcode.CMD_TLBI_NH_ASID: _cmd("CMD_TLBI_NH_ASID", [bits("VMID", 47, 32), bits("ASID", 63, 48)]),
    Opcode.CMD_TLBI_NH_VA: _cmd("CMD_TLBI_NH_VA", _TLBI_RANGE + [
        bits("ASID", 63, 48), bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_TLBI_NH_VAA: _cmd("CMD_TLBI_NH_VAA", _TLBI_RANGE + [bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_TLBI_EL3_ALL: _cmd("CMD_TLBI_EL3_ALL", []),
    Opcode.CMD_TLBI_EL3_VA: _cmd("CMD_TLBI_EL3_VA", [bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_TLBI_EL2_ALL: _cmd("CMD_TLBI_EL2_ALL", []),
    Opcode.CMD_TLBI_EL2_ASID: _cmd("CMD_TLBI_EL2_ASID", [bits("ASID", 63, 48)]),
    Opcode.CMD_TLBI_EL2_VA: _cmd("CMD_TLBI_EL2_VA", _TLBI_RANGE + [
        bits("ASID", 63, 48), bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_TLBI_EL2_VAA: _cmd("CMD_TLBI_EL2_VAA", _TLBI_RANGE + [bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_TLBI_S12_VMALL: _cmd("CMD_TLBI_S12_VMALL", [bits("VMID", 47, 32)]),
    Opcode.CMD_TLBI_S2_IPA: _cmd("CMD_TLBI_S2_IPA", _TLBI_RANGE + [bits("IPA", 119, 76, scale=12)]),
    Opcode.CMD_TLBI_NSNH_ALL: _cmd("CMD_TLBI_NSNH_ALL", []),
    Opcode.CMD_ATC_INV: _cmd("CMD_ATC_INV", [bits("Global", 9)] + _SSID + _SID + [
        bits("Size", 69, 64), bits("Addr", 127, 76, scale=12)]),
    Opcode.CMD_PRI_RESP: _cmd("CMD_PRI_RESP", _SSID + _SID + [
        bits("PRGIndex", 72, 64), bits("Resp", 77, 76)]),
    Opcode.CMD_RESUME: _cmd("CMD_RESUME", [bits("Ac", 12), bits("Ab", 13)] + _SID + [
        bits("STAG", 79, 64)]),
    Opcode.CMD_STALL_TERM: _cmd("CMD_STALL_TERM", _SID),
    Opcode.CMD_SYNC: _cmd("CMD_SYNC", [bits("CS", 13, 12), bits("MSH", 23, 22),
                                       bits("MSIAttr", 27, 24), bits("MSIData", 63, 32),
                                       bits("MSIAddress", 119, 66, scale=2)]),
    Opcode.CMD_DPTI_ALL: _cmd("CMD_DPTI_ALL", []),
    Opcode.CMD_DPTI_PA: _cmd("CMD_DPTI_PA", [bits("Addr", 119, 76, scale=12)]),
}


class SyncCS(enum.IntEnum):
    """CMD_SYNC ComplSignal (reference §5.3)."""

    SIG_NONE = 0b00
    SIG_IRQ = 0b01
    SIG_SEV = 0b10


class PriResp(enum.IntEnum):
    """CMD_PRI_RESP Resp encodings (reference §4.2; Linux's enum names differ)."""

    RESPONSE_FAILURE = 0b00
    INVALID_REQUEST = 0b01
    SUCCESS = 0b10


class PrgResponseCode(enum.IntEnum):
    """PCIe PRG Response Message response codes (reference §8.6)."""

    SUCCESS = 0x0
    INVALID_REQUEST = 0x1
    RESPONSE_FAILURE = 0xF


#: CMD_PRI_RESP.Resp -> PCIe response code sent to the endpoint.
PRI_RESP_TO_PCIE = {
    PriResp.RESPONSE_FAILURE: PrgResponseCode.RESPONSE_FAILURE,
    PriResp.INVALID_REQUEST: PrgResponseCode.INVALID_REQUEST,
    PriResp.SUCCESS: PrgResponseCode.SUCCESS,
}


def encode_command(opcode: Opcode, **fields: int) -> bytes:
    """Build a 16-byte command for ``opcode`` (fields named as in :data:`COMMANDS`)."""
    return COMMANDS[Opcode(opcode)].encode(fields, Opcode=int(opcode))


def decode_command(data: bytes) -> tuple[int, Fields | None]:
    """Return ``(opcode, fields)``; fields is None for a reserved opcode."""
    op = data[0]
    try:
        layout = COMMANDS[Opcode(op)]
    except ValueError:
        return op, None
    return op, layout.decode(data)


# --------------------------------------------------------------------------- STE / CD


class SteConfig(enum.IntEnum):
    """STE.Config (reference §6.2). 0b0xx other than ABORT behave as ABORT."""

    ABORT = 0b000
    BYPASS = 0b100
    S1_TRANS = 0b101
    S2_TRANS = 0b110
    NESTED = 0b111


STE = RecordLayout(
    "STE",
    STE_SIZE,
    [
        bits("V", 0), bits("Config", 3, 1), bits("S1Fmt", 5, 4),
        bits("S1ContextPtr", 55, 6, scale=6), bits("S1CDMax", 63, 59),
        bits("S1DSS", 65, 64), bits("S1CIR", 67, 66), bits("S1COR", 69, 68), bits("S1CSH", 71, 70),
        bits("DRE", 76), bits("CONT", 80, 77), bits("DCP", 81), bits("PPAR", 82), bits("MEV", 83),
        bits("S1PIE", 88), bits("S2FWB", 89), bits("S1MPAM", 90), bits("S1STALLD", 91),
        bits("EATS", 93, 92), bits("STRW", 95, 94),
        bits("MemAttr", 99, 96), bits("MTCFG", 100), bits("ALLOCCFG", 104, 101),
        bits("SHCFG", 109, 108), bits("NSCFG", 111, 110), bits("PRIVCFG", 113, 112),
        bits("INSTCFG", 115, 114),
        bits("S2VMID", 143, 128), bits("S2T0SZ", 165, 160), bits("S2SL0", 167, 166),
        bits("S2IR0", 169, 168), bits("S2OR0", 171, 170), bits("S2SH0", 173, 172),
        bits("S2TG", 175, 174), bits("S2PS", 178, 176), bits("S2AA64", 179), bits("S2ENDI", 180),
        bits("S2AFFD", 181), bits("S2PTW", 182), bits("S2HD", 183), bits("S2HA", 184),
        bits("S2S", 185), bits("S2R", 186),
        bits("S2TTB", 247, 196, scale=4),
    ],
)

# S1Fmt, S1DSS, EATS, PRIVCFG, INSTCFG encodings.
S1FMT_LINEAR, S1FMT_64_4K, S1FMT_64_64K = 0b00, 0b01, 0b10
S1DSS_TERMINATE, S1DSS_BYPASS, S1DSS_SSID0 = 0b00, 0b01, 0b10
EATS_OFF, EATS_FULL, EATS_SPLIT, EATS_DPT = 0b00, 0b01, 0b10, 0b11
PRIVCFG_FORCE_UNPRIV, PRIVCFG_FORCE_PRIV = 0b10, 0b11
INSTCFG_FORCE_DATA, INSTCFG_FORCE_INSTR = 0b10, 0b11

CD = RecordLayout(
    "CD",
    CD_SIZE,
    [
        bits("T0SZ", 5, 0), bits("TG0", 7, 6), bits("IR0", 9, 8), bits("OR0", 11, 10),
        bits("SH0", 13, 12), bits("EPD0", 14), bits("ENDI", 15),
        bits("T1SZ", 21, 16), bits("TG1", 23, 22), bits("IR1", 25, 24), bits("OR1", 27, 26),
        bits("SH1", 29, 28), bits("EPD1", 30), bits("V", 31),
        bits("IPS", 34, 32), bits("AFFD", 35), bits("WXN", 36), bits("UWXN", 37),
        bits("TBI0", 38), bits("TBI1", 39), bits("PAN", 40), bits("AA64", 41),
        bits("HD", 42), bits("HA", 43), bits("S", 44), bits("R", 45), bits("A", 46),
        bits("ASET", 47), bits("ASID", 63, 48),
        bits("NSCFG0", 64), bits("HAD0", 65), bits("E0PD0", 66), bits("HAFT", 67),
        bits("TTB0", 119, 68, scale=4),
        bits("NSCFG1", 128), bits("HAD1", 129), bits("E0PD1", 130), bits("AIE", 131),
        bits("TTB1", 183, 132, scale=4),
        bits("DS", 186), bits("PIE", 187),
        bits("MAIR0", 223, 192), bits("MAIR1", 255, 224),
        bits("AMAIR0", 287, 256), bits("AMAIR1", 319, 288),
        bits("PARTID", 367, 352), bits("PMG", 375, 368),
    ],
)

# TG0 and TG1 use different encodings for the same granules (reference §6.5, pitfall 8).
TG0_4K, TG0_64K, TG0_16K = 0b00, 0b01, 0b10
TG1_16K, TG1_4K, TG1_64K = 0b01, 0b10, 0b11

L1STD = RecordLayout("L1STD", L1STD_SIZE, [bits("Span", 4, 0), bits("L2Ptr", 55, 6, scale=6)])
L1CD = RecordLayout("L1CD", L1CD_SIZE, [bits("V", 0), bits("L2Ptr", 55, 12, scale=12)])

#: IPS / OAS / S2PS encoding -> address bits.
PA_BITS = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52, 7: 56}

__all__ = [
    "BitField", "Fields", "RecordLayout", "EventId", "EventClass", "EVENT", "EVENT_FIELDS",
    "encode_event", "decode_event", "PRI", "is_stop_marker", "Opcode", "COMMANDS",
    "encode_command", "decode_command", "SyncCS", "PriResp", "PrgResponseCode",
    "PRI_RESP_TO_PCIE", "SteConfig", "STE", "CD", "L1STD", "L1CD", "PA_BITS",
]
