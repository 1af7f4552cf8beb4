"""NIC model throughput, in-process: frames per second through RX and TX.

Every descriptor and buffer access is translated by the emulated SMMUv3 (stage 1, PASID
ring, 4 KiB pages, IOTLB warm: a small set of buffers is reused), the wire is a real
SocketPairBackend, and the event loop / worker are played by this script with the
LoopbackContext (reader callback when the fd is readable, then the queued work).

Metrics (one line each): ``nic-rx-frames-per-s`` and ``nic-tx-frames-per-s`` with 64-byte
frames, and the same with a ``-1514`` suffix for full-size frames.
"""

from __future__ import annotations

import select
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devmodel.devices.nic_pci import NicFunction  # noqa: E402
from devmodel.devices.nic_records import (CFG_PASID_EN, CFG_PASID_SHIFT, DESC_SIZE, RX_DESC, TX_DESC,  # noqa: E402
                                          CtrlBit, NicCounter, Reg)
from devmodel.devices.packet_backend import SocketPairBackend  # noqa: E402
from devmodel.iommu import records as rec  # noqa: E402
from devmodel.iommu.builder import make_s1_stream, make_world  # noqa: E402
from devmodel.pci import regs  # noqa: E402
from vfio_user.device import PciIrq, PciRegion  # noqa: E402
from vfio_user.loopback import LoopbackContext  # noqa: E402

SID = 0x108
PASID = 5
RING_LOG2 = 12
RING = 1 << RING_LOG2
RX_RING, TX_RING = 0x100000, 0x110000
RX_BUF, TX_BUF = 0x300000, 0x400000
BUFFERS = 16
PAGE = 0x1000
BATCH = 256
SECONDS = 1.5


class Bench:
    def __init__(self) -> None:
        self.mem, _, self.smmu, self.sw = make_world(sid_bits=9)
        self.sw.enable()
        pt = make_s1_stream(self.sw, SID, ssids=(PASID,), s1cdmax=3, eats=rec.EATS_FULL).tables[PASID]
        pa = 0x800000
        for va in [RX_RING + i * PAGE for i in range(RING * DESC_SIZE // PAGE)] + \
                  [TX_RING + i * PAGE for i in range(RING * DESC_SIZE // PAGE)] + \
                  [RX_BUF + i * PAGE for i in range(BUFFERS)] + [TX_BUF + i * PAGE for i in range(BUFFERS)]:
            pt.map(va, pa)
            pa += PAGE
        self.pt = pt
        self.wire = SocketPairBackend()
        self.dev = NicFunction(self.smmu, SID, self.mem, backend=self.wire)
        self.ctx = LoopbackContext(self.mem)
        for vector in range(3):
            self.ctx.install_eventfd(PciIrq.MSIX, vector)
        self.dev.attach(self.ctx)
        self.set_cfg(regs.PCI_COMMAND, 2, regs.Command.MEMORY | regs.Command.MASTER)
        self.set_cfg(self.dev.msix.offset + regs.PCI_MSIX_FLAGS, 2, regs.PCI_MSIX_FLAGS_ENABLE)
        cfg = RING_LOG2 | PASID << CFG_PASID_SHIFT | CFG_PASID_EN
        for base_reg, cfg_reg, base in ((Reg.RX_BASE, Reg.RX_CFG, RX_RING), (Reg.TX_BASE, Reg.TX_CFG, TX_RING)):
            self.set_reg(base_reg, base, 8)
            self.set_reg(cfg_reg, cfg)
        self.set_reg(Reg.CTRL, CtrlBit.RX_ENABLE | CtrlBit.TX_ENABLE)

    def set_cfg(self, offset: int, size: int, value: int) -> None:
        self.dev.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.dev.region_write(PciRegion.BAR0, offset, value.to_bytes(size, "little"))

    def reg(self, offset: int) -> int:
        return int.from_bytes(self.dev.region_read(PciRegion.BAR0, offset, 4), "little")

    def pa(self, va: int) -> int:
        return self.smmu.translate(SID, PASID, va).pa

    def pump(self) -> None:
        fd = self.wire.fileno()
        while True:
            ran = self.ctx.run_pending()
            cb = self.ctx.readers.get(fd)
            if cb is not None and select.select([fd], [], [], 0)[0]:
                cb()
                continue
            if not ran:
                return

    def rx(self, size: int) -> float:
        for i in range(RING):
            self.mem.write(self.pa(RX_RING + i * DESC_SIZE),
                           RX_DESC.encode(Addr=RX_BUF + (i % BUFFERS) * PAGE, BufLen=2048))
        frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
        start_count = self.dev.nic.count(NicCounter.RX_PACKETS)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < SECONDS:
            self.set_reg(Reg.RX_TAIL, (self.reg(Reg.RX_HEAD) - 1) % RING)  # repost everything
            for _ in range(BATCH):
                self.wire.inject(frame)
            self.pump()
        dt = time.perf_counter() - t0
        n = self.dev.nic.count(NicCounter.RX_PACKETS) - start_count
        assert self.dev.nic.count(NicCounter.RX_DROPS) == 0, self.dev.counters()
        return n / dt

    def tx(self, size: int) -> float:
        frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
        for i in range(BUFFERS):
            self.mem.write(self.pa(TX_BUF + i * PAGE), frame)
        for i in range(RING):
            self.mem.write(self.pa(TX_RING + i * DESC_SIZE),
                           TX_DESC.encode(Addr=TX_BUF + (i % BUFFERS) * PAGE, Length=size))
        sent = 0
        tail = self.reg(Reg.TX_TAIL)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < SECONDS:
            tail = (tail + BATCH) % RING
            self.set_reg(Reg.TX_TAIL, tail)
            self.pump()
            sent += len(self.wire.collect())
        dt = time.perf_counter() - t0
        assert self.dev.nic.count(NicCounter.TX_DROPS) == 0, self.dev.counters()
        return sent / dt


def main() -> int:
    b = Bench()
    for size, suffix in ((64, ""), (1514, "-1514")):
        print(f"nic-rx-frames-per-s{suffix}: {b.rx(size):.0f} frames/s", flush=True)
        print(f"nic-tx-frames-per-s{suffix}: {b.tx(size):.0f} frames/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
