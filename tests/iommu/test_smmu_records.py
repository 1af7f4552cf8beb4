"""Record layouts: sizes, field positions and round trips (reference §3.1, §4.1, §5, §6.2, §6.5)."""

import pytest

from devmodel.iommu import records as rec
from devmodel.iommu.records import COMMANDS, EventClass, EventId, Opcode


def test_record_sizes():
    """Event 32 B, PRI 16 B, command 16 B, STE/CD 64 B, L1STD/L1CD 8 B (§2, §6)."""
    assert rec.EVENT.size == 32 and rec.PRI.size == 16
    assert all(layout.size == 16 for layout in COMMANDS.values())
    assert rec.STE.size == 64 and rec.CD.size == 64
    assert rec.L1STD.size == 8 and rec.L1CD.size == 8
    assert len(rec.encode_event(EventId.F_TRANSLATION, StreamID=1)) == 32


def test_event_bit_positions():
    """§3.1: RnW bit 99, S2 bit 103, CLASS 105:104, StreamID DW0[63:32], IPA DW3[55:12]."""
    raw = int.from_bytes(rec.encode_event(EventId.F_PERMISSION, StreamID=0x1234, SSV=1, SubstreamID=5,
                                          RnW=1, S2=1, CLASS=EventClass.TT, TTRnW=1,
                                          InputAddr=0xdead000, IPA=0x45000), "little")
    assert raw & 0xFF == 0x13
    assert (raw >> 32) & 0xFFFFFFFF == 0x1234
    assert (raw >> 11) & 1 == 1 and (raw >> 12) & 0xFFFFF == 5
    assert (raw >> 99) & 1 == 1 and (raw >> 103) & 1 == 1 and (raw >> 104) & 3 == 1
    assert (raw >> 108) & 1 == 1
    assert (raw >> 128) & ((1 << 64) - 1) == 0xdead000
    assert (raw >> 204) << 12 == 0x45000


def test_event_keeps_only_valid_fields():
    """§3.2: F_STREAM_DISABLED carries only the StreamID; IPA only when S2=1; C_BAD_SUBSTREAMID has no SSV."""
    ev = rec.decode_event(rec.encode_event(EventId.F_STREAM_DISABLED, StreamID=7, SSV=1, SubstreamID=3,
                                           InputAddr=0x1000, RnW=1))
    assert (ev.StreamID, ev.SSV, ev.SubstreamID, ev.InputAddr, ev.RnW) == (7, 0, 0, 0, 0)
    ev = rec.decode_event(rec.encode_event(EventId.F_TRANSLATION, StreamID=1, S2=0, IPA=0x5000))
    assert ev.IPA == 0
    ev = rec.decode_event(rec.encode_event(EventId.C_BAD_SUBSTREAMID, StreamID=1, SSV=1, SubstreamID=9))
    assert ev.SSV == 0 and ev.SubstreamID == 9


def test_pri_record_layout():
    """§4.1: L bit 62, SSV bit 63, PRGIndex DW1[8:0], page address DW1[63:12]."""
    data = rec.PRI.encode(StreamID=0x10, SubstreamID=0x42, SSV=1, R=1, W=1, L=1, PRGIndex=0x1FF,
                          PageAddr=0x7fff_f000)
    raw = int.from_bytes(data, "little")
    assert (raw >> 62) & 1 and (raw >> 63) & 1 and (raw >> 60) & 1 and (raw >> 61) & 1
    assert (raw >> 64) & 0x1FF == 0x1FF and (raw >> 76) << 12 == 0x7fff_f000
    assert rec.is_stop_marker(rec.PRI.decode(rec.PRI.encode(SSV=1, L=1)))
    assert not rec.is_stop_marker(rec.PRI.decode(rec.PRI.encode(SSV=0, L=1)))


@pytest.mark.parametrize("opcode", list(Opcode))
def test_every_command_round_trips(opcode):
    """§5.2: every opcode has a layout; the opcode byte and StreamID survive encode/decode."""
    fields = {"StreamID": 0x55} if "StreamID" in COMMANDS[opcode].fields else {}
    data = rec.encode_command(opcode, **fields)
    op, f = rec.decode_command(data)
    assert op == opcode and f.Opcode == opcode
    assert f.get("StreamID", 0x55) == 0x55


def test_reserved_opcode_decodes_to_none():
    """§5.2: opcodes without a definition are reserved."""
    assert rec.decode_command(bytes([0x99]) + bytes(15)) == (0x99, None)


def test_command_field_positions():
    """§4.2 PRI_RESP Resp DW1[13:12]; §5.3 CMD_SYNC CS DW0[13:12], MSIAddress DW1[55:2]."""
    raw = int.from_bytes(rec.encode_command(Opcode.CMD_PRI_RESP, StreamID=3, PRGIndex=7, Resp=2), "little")
    assert (raw >> 76) & 3 == 2 and (raw >> 64) & 0x1FF == 7
    raw = int.from_bytes(rec.encode_command(Opcode.CMD_SYNC, CS=1, MSIData=0xAB, MSIAddress=0x1004), "little")
    assert (raw >> 12) & 3 == 1 and (raw >> 32) & 0xFFFFFFFF == 0xAB and ((raw >> 66) << 2) & ((1 << 56) - 1) == 0x1004


def test_ste_cd_field_positions():
    """§6.2: Config bits 3:1, S1ContextPtr 55:6, EATS 93:92, S2VMID 143:128; §6.5: TTB0 DW1[55:4], V bit 31."""
    raw = rec.STE.pack(V=1, Config=5, S1ContextPtr=0x12340, EATS=1, S2VMID=0xBEEF)
    assert raw & 1 and (raw >> 1) & 7 == 5 and ((raw >> 6) << 6) & ((1 << 56) - 1) == 0x12340
    assert (raw >> 92) & 3 == 1 and (raw >> 128) & 0xFFFF == 0xBEEF
    raw = rec.CD.pack(V=1, TTB0=0x8000, ASID=9, TG1=rec.TG1_4K)
    assert (raw >> 31) & 1 and (raw >> 68) << 4 & ((1 << 56) - 1) == 0x8000 and (raw >> 48) & 0xFFFF == 9
    assert (raw >> 22) & 3 == 0b10


def test_encode_rejects_bad_values():
    """Address fields must be aligned and values must fit their width."""
    with pytest.raises(ValueError):
        rec.STE.encode(S1ContextPtr=0x1001)
    with pytest.raises(ValueError):
        rec.STE.encode(Config=8)
    with pytest.raises(ValueError):
        rec.EVENT.decode(bytes(31))
