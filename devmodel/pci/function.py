"""A PCI(e) function: config space, BARs, capabilities and interrupts behind vfio-user.

Declaring a device (QEMU-like)
------------------------------
Subclass :class:`PciFunction`, set the identity class attributes and build the device
in :meth:`PciFunction.realize`::

    class MyDevice(PciFunction):
        vendor_id = 0x1af4
        device_id = 0x10f0
        class_code = 0xff0000          # base class << 16 | sub class << 8 | prog-if
        revision = 1
        subsystem_vendor_id = 0x1af4
        subsystem_id = 0x10f0
        interrupt_pin = 1              # INTA; 0 for no INTx

        def realize(self) -> None:
            bar0 = self.add_bar(0, Bar.mem32(0x1000, name="regs"))
            bar0.add_mmio(0, 0x100, self.reg_read, self.reg_write)
            self.add_capability(PciExpressCapability(flr=True))
            self.msix = self.add_capability(MsixCapability(4, table_bar=0, table_offset=0x800,
                                                           pba_bar=0, pba_offset=0xC00))
            self.ats = self.add_ext_capability(AtsCapability())

        def device_reset(self) -> None:   # device-specific part of a function reset
            ...

:meth:`PciFunction.__init__` calls :meth:`realize` then records the power-on config
image. A subclass that takes constructor arguments stores them before calling
``super().__init__()``.

Behaviour the framework provides
--------------------------------
* Command register: Memory/I/O Space decode gate trapped BAR accesses (reads return
  all-ones, writes are dropped, as an unclaimed transaction would); **Bus Master Enable**
  gates DMA (:attr:`bus_master`, :meth:`require_bus_master`, :attr:`dma`) and MSI/MSI-X
  (messages are held pending while BME is off); Interrupt Disable gates INTx.
* Status: Capabilities List, Interrupt Status (INTx level), RW1C error bits.
* BARs sized by writing all-ones (PCI 3.0 §6.2.5.1); 64-bit BARs take two slots.
* Standard and extended capability lists, linked as capabilities are added.
* Interrupts: :meth:`raise_irq` picks MSI-X, MSI or INTx like hardware does;
  :meth:`set_intx` is the level-triggered INTx line.
* Function reset (DEVICE_RESET and PCIe FLR): config returns to its defaults except the
  bits marked preserved (sticky/link), every capability resets, then :meth:`device_reset`.

Threading: every entry point here runs with :data:`vfio_user.device.MODEL_LOCK` held
(the backend's rule); device work that does DMA goes through ``ctx.call_soon``.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, TypeVar

from devmodel.memory import BusError, Memory
from devmodel.pci import regs
from devmodel.pci.bar import Bar
from devmodel.pci.capability import Capability, ExtendedCapability
from devmodel.pci.config import ConfigSpace
from vfio_user.device import (
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
    DeviceContext,
    IrqInfo,
    PciIrq,
    PciRegion,
    RegionInfo,
    VfioUserDevice,
)

log = logging.getLogger(__name__)

CapT = TypeVar("CapT", bound=Capability)

#: Command bits software may change (others are hardwired 0 on a PCIe function).
COMMAND_WMASK = (regs.Command.IO | regs.Command.MEMORY | regs.Command.MASTER
                 | regs.Command.PARITY | regs.Command.SERR | regs.Command.INTX_DISABLE)


class BusMasterMemory:
    """The function's DMA port: the client's memory, usable only while BME is set.

    Implements :class:`devmodel.memory.Memory`; a disabled bus master or a detached
    client is a :class:`~devmodel.memory.BusError` (the request never leaves the device).
    """

    def __init__(self, function: PciFunction) -> None:
        self.function = function

    def read(self, addr: int, size: int) -> bytes:
        return self.function.require_bus_master(addr, size, False).read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.function.require_bus_master(addr, len(data), True).write(addr, data)


class PciFunction(VfioUserDevice):
    """A type-0 PCI(e) function served over vfio-user. See the module docstring."""

    vendor_id: int = 0xFFFF
    device_id: int = 0xFFFF
    class_code: int = 0xFF0000
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 1
    config_size: int = regs.PCI_CFG_SPACE_EXP_SIZE

    def __init__(self) -> None:
        self.config = ConfigSpace(self.config_size)
        self.bars: list[Bar | None] = [None] * regs.PCI_NUM_BARS
        self.capabilities: list[Capability] = []
        self.ext_capabilities: list[ExtendedCapability] = []
        self.ctx: DeviceContext | None = None
        self.dma = BusMasterMemory(self)
        #: The MSI-X / MSI capability once added (the interrupt router uses them).
        self.msix = None
        self.msi = None
        self._upper_halves: set[int] = set()
        self._next_std = regs.PCI_STD_CAP_START
        self._next_ext = regs.PCI_EXT_CAP_START
        self._intx_level = False
        self._flr_requested = False
        self._client_listeners: list[Callable[[str], None]] = []
        self._init_header()
        self.realize()
        self.config.snapshot_defaults()
        log.info("%s realized: %04x:%04x class %06x", self.name, self.vendor_id, self.device_id,
                 self.class_code)

    @property
    def name(self) -> str:
        return type(self).__name__

    # --- declaration API ------------------------------------------------------------------
    def realize(self) -> None:
        """Add BARs and capabilities (override)."""

    def device_reset(self) -> None:
        """Device-specific part of a function reset (override)."""

    def command_changed(self, old: int, new: int) -> None:
        """The guest changed the Command register (override to react, e.g. stop DMA)."""

    def _init_header(self) -> None:
        cfg = self.config
        cfg.set16(regs.PCI_VENDOR_ID, self.vendor_id)
        cfg.set16(regs.PCI_DEVICE_ID, self.device_id)
        cfg.set8(regs.PCI_REVISION_ID, self.revision)
        cfg.set8(regs.PCI_CLASS_PROG, self.class_code & 0xFF)
        cfg.set16(regs.PCI_CLASS_DEVICE, self.class_code >> 8)
        cfg.set8(regs.PCI_HEADER_TYPE, regs.PCI_HEADER_TYPE_NORMAL)
        cfg.set16(regs.PCI_SUBSYSTEM_VENDOR_ID, self.subsystem_vendor_id)
        cfg.set16(regs.PCI_SUBSYSTEM_ID, self.subsystem_id)
        cfg.set8(regs.PCI_INTERRUPT_PIN, self.interrupt_pin)
        cfg.set_masks(regs.PCI_COMMAND, 2, wmask=COMMAND_WMASK)
        cfg.set_masks(regs.PCI_STATUS, 2, w1c=regs.STATUS_W1C)
        cfg.set_masks(regs.PCI_CACHE_LINE_SIZE, 1, wmask=0xFF)
        cfg.set_masks(regs.PCI_INTERRUPT_LINE, 1, wmask=0xFF)

    def add_bar(self, index: int, bar: Bar) -> Bar:
        """Declare BAR ``index``; a 64-bit BAR also claims ``index + 1``."""
        if not 0 <= index < regs.PCI_NUM_BARS:
            raise ValueError(f"BAR index {index} out of range")
        if bar.is_64bit and index == regs.PCI_NUM_BARS - 1:
            raise ValueError("a 64-bit BAR cannot start in BAR5")
        slots = [index, index + 1] if bar.is_64bit else [index]
        for slot in slots:
            if self.bars[slot] is not None or slot in self._upper_halves:
                raise ValueError(f"BAR{slot} already in use")
        bar.index = index
        self.bars[index] = bar
        offset = regs.bar_offset(index)
        mask = bar.address_mask()
        self.config.set32(offset, bar.flag_bits())
        self.config.set_masks(offset, 4, wmask=mask & 0xFFFFFFFF)
        if bar.is_64bit:
            self._upper_halves.add(index + 1)
            self.config.set_masks(offset + 4, 4, wmask=mask >> 32)
        return bar

    def add_capability(self, cap: CapT, offset: int | None = None) -> CapT:
        """Place a standard capability (default: next free dword after 0x40) and link it."""
        if cap.extended:
            raise ValueError("use add_ext_capability for extended capabilities")
        offset = self._place(cap, offset, self._next_std, regs.PCI_CFG_SPACE_SIZE)
        self.config.set8(offset + regs.CAP_ID_OFFSET, cap.cap_id)
        self.config.set8(offset + regs.CAP_NEXT_OFFSET, 0)
        if self.capabilities:
            prev = self.capabilities[-1]
            self.config.set8(prev.offset + regs.CAP_NEXT_OFFSET, offset)
        else:
            self.config.set8(regs.PCI_CAPABILITY_LIST, offset)
            self.config.set_bits(regs.PCI_STATUS, 2, regs.Status.CAP_LIST)
        self.capabilities.append(cap)
        self._next_std = max(self._next_std, _align4(offset + cap.size))
        cap.bind(self, offset)
        log.debug("%s: capability %#04x at %#x", self.name, cap.cap_id, offset)
        return cap

    def add_ext_capability(self, cap: CapT, offset: int | None = None) -> CapT:
        """Place an extended capability (first one at 0x100) and link it."""
        if not cap.extended:
            raise ValueError("use add_capability for standard capabilities")
        if self.config_size < regs.PCI_CFG_SPACE_EXP_SIZE:
            raise ValueError("extended capabilities need a 4 KiB config space")
        offset = self._place(cap, offset, self._next_ext, self.config_size)
        if not self.ext_capabilities and offset != regs.PCI_EXT_CAP_START:
            raise ValueError("the first extended capability must be at 0x100")
        version = getattr(cap, "version", 1)
        self.config.set32(offset, regs.ext_cap_header(cap.cap_id, version, 0))
        if self.ext_capabilities:
            prev = self.ext_capabilities[-1]
            pid, pver, _ = regs.ext_cap_fields(self.config.get32(prev.offset))
            self.config.set32(prev.offset, regs.ext_cap_header(pid, pver, offset))
        self.ext_capabilities.append(cap)  # type: ignore[arg-type]
        self._next_ext = max(self._next_ext, _align4(offset + cap.size))
        cap.bind(self, offset)
        log.debug("%s: extended capability %#06x at %#x", self.name, cap.cap_id, offset)
        return cap

    def _place(self, cap: Capability, offset: int | None, default: int, limit: int) -> int:
        offset = default if offset is None else offset
        if offset % 4 or offset + cap.size > limit or offset < regs.PCI_STD_CAP_START:
            raise ValueError(f"capability {cap!r} does not fit at {offset:#x}")
        for other in self.capabilities + self.ext_capabilities:
            if other.contains(offset, cap.size):
                raise ValueError(f"capability at {offset:#x} overlaps {other!r}")
        return offset

    # --- lookup ----------------------------------------------------------------------------
    def find_capability(self, cap_id: int) -> Capability | None:
        return next((c for c in self.capabilities if c.cap_id == cap_id), None)

    def find_ext_capability(self, cap_id: int) -> ExtendedCapability | None:
        return next((c for c in self.ext_capabilities if c.cap_id == cap_id), None)

    # --- command / status --------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.config.get16(regs.PCI_COMMAND)

    @property
    def status(self) -> int:
        return self.config.get16(regs.PCI_STATUS)

    @property
    def bus_master(self) -> bool:
        """Bus Master Enable: the function may issue memory requests (DMA, MSI)."""
        return bool(self.command & regs.Command.MASTER)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & regs.Command.MEMORY)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & regs.Command.IO)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & regs.Command.INTX_DISABLE)

    def require_bus_master(self, addr: int = 0, size: int = 0, write: bool = False) -> Memory:
        """The DMA target if the function may master the bus, else raise BusError.

        Devices call this (or use :attr:`dma`) before every DMA; PCI 3.0 §6.2.2 forbids
        memory requests while Bus Master Enable is clear.
        """
        if not self.bus_master:
            log.info("%s: DMA %s %#x+%d blocked: bus master disabled", self.name,
                     "write" if write else "read", addr, size)
            raise BusError(addr, size, write, "bus master disabled")
        if self.ctx is None:
            raise BusError(addr, size, write, "no client attached")
        return self.ctx.dma

    def signal_master_abort(self) -> None:
        """Record a DMA that got no completion (Status.Received Master Abort, RW1C)."""
        self.config.set_bits(regs.PCI_STATUS, 2, regs.Status.REC_MASTER_ABORT)

    # --- interrupts -------------------------------------------------------------------------
    def trigger(self, index: int, subindex: int = 0) -> bool:
        """Signal an IRQ eventfd through the client context (False if not delivered)."""
        if self.ctx is None:
            log.debug("%s: irq %d/%d dropped: no client", self.name, index, subindex)
            return False
        return bool(self.ctx.trigger_irq(index, subindex))

    def raise_irq(self, vector: int = 0) -> bool:
        """Send interrupt ``vector`` the way the guest configured the function.

        MSI-X if enabled, else MSI if enabled, else assert INTx (level; the device lowers
        it with :meth:`set_intx` when the cause is acknowledged).
        """
        if self.msix is not None and self.msix.enabled:
            return self.msix.notify(vector)
        if self.msi is not None and self.msi.enabled:
            return self.msi.notify(vector)
        return self.set_intx(True)

    def set_intx(self, level: bool) -> bool:
        """Drive the INTx line; returns True when an assertion was signalled."""
        if not self.interrupt_pin:
            return False
        was = self._intx_level
        self._intx_level = level
        self.config.set_bits(regs.PCI_STATUS, 2, regs.Status.INTERRUPT, level)
        if level and not was:
            return self._signal_intx()
        return False

    def _signal_intx(self) -> bool:
        if self.intx_disabled:
            log.debug("%s: INTx asserted but disabled by Command", self.name)
            return False
        if (self.msix is not None and self.msix.enabled) or (self.msi is not None and self.msi.enabled):
            return False
        log.debug("%s: INTx asserted", self.name)
        return self.trigger(PciIrq.INTX)

    @property
    def intx_level(self) -> bool:
        return self._intx_level

    # --- reset ------------------------------------------------------------------------------
    def function_reset(self) -> None:
        """Function reset (PCIe §6.6.2): config to defaults, capabilities, device state."""
        log.info("%s: function reset", self.name)
        self.config.restore_defaults()
        self._intx_level = False
        self.config.set_bits(regs.PCI_STATUS, 2, regs.Status.INTERRUPT, False)
        for cap in self.capabilities + self.ext_capabilities:
            cap.reset()
            cap.notify_listeners()
        self.device_reset()

    # --- VfioUserDevice ---------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: a function reset. Subclasses override :meth:`device_reset`."""
        self.function_reset()

    def attach(self, ctx: DeviceContext) -> None:
        log.info("%s: client attached", self.name)
        self.ctx = ctx
        self._notify_client("attach")

    def detach(self) -> None:
        log.info("%s: client detached", self.name)
        self.ctx = None
        self._notify_client("detach")

    def dma_changed(self) -> None:
        """DMA_MAP/UNMAP changed the client's memory map: tell the client listeners."""
        self._notify_client("dma_changed")

    def add_client_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback("attach" | "dma_changed" | "detach")`` as a client arrives, its
        memory map changes or it goes away (loop thread: no DMA there). The VMM's memory
        and hot-plug listener."""
        self._client_listeners.append(callback)

    def _notify_client(self, what: str) -> None:
        for cb in self._client_listeners:
            cb(what)

    def irqs_changed(self, index: int) -> None:
        """New eventfds or unmasks: re-send what is still pending (level INTx, MSI-X PBA)."""
        if index == PciIrq.INTX and self._intx_level:
            self._signal_intx()
        elif index == PciIrq.MSIX and self.msix is not None:
            self.msix.flush_pending()

    def region_info(self, index: int) -> RegionInfo:
        rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
        if index == PciRegion.CONFIG:
            return RegionInfo(size=self.config_size, flags=rw)
        if 0 <= index < regs.PCI_NUM_BARS:
            bar = self.bars[index]
            if bar is None:
                return RegionInfo()
            info = RegionInfo(size=bar.size, flags=rw)
            if bar.memfd is not None:
                info.flags |= VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS
                info.mmap_fd = bar.memfd
                info.mmap_offset = 0
                info.sparse = bar.sparse_areas()
            return info
        if index in (PciRegion.ROM, PciRegion.VGA):
            return RegionInfo()
        raise OSError(errno.EINVAL, f"no region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        if index == PciIrq.INTX:
            count = 1 if self.interrupt_pin else 0
            return IrqInfo(count, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED)
        if index == PciIrq.MSI:
            count = self.msi.vectors if self.msi is not None else 0
            return IrqInfo(count, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE)
        if index == PciIrq.MSIX:
            # No NORESIZE: the client may add vectors one by one while MSI-X stays enabled.
            count = self.msix.vectors if self.msix is not None else 0
            return IrqInfo(count, VFIO_IRQ_INFO_EVENTFD)
        if index == PciIrq.ERR:
            count = 1 if self.find_capability(regs.CapId.EXP) is not None else 0
            return IrqInfo(count, VFIO_IRQ_INFO_EVENTFD)
        if index == PciIrq.REQ:
            return IrqInfo(0, VFIO_IRQ_INFO_EVENTFD)
        raise OSError(errno.EINVAL, f"no IRQ index {index}")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            return self.config.read(offset, count)
        bar = self._decoding_bar(index, offset, count, False)
        if bar is None:
            return b"\xff" * count
        return bar.read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.CONFIG:
            self._config_write(offset, bytes(data))
            return
        bar = self._decoding_bar(index, offset, len(data), True)
        if bar is not None:
            bar.write(offset, bytes(data))

    def _decoding_bar(self, index: int, offset: int, count: int, write: bool) -> Bar | None:
        """The BAR behind region ``index`` if its decoder is enabled, else None."""
        if not 0 <= index < regs.PCI_NUM_BARS:
            raise OSError(errno.EINVAL, f"region {index} has no accesses")
        bar = self.bars[index]
        if bar is None:
            raise OSError(errno.EINVAL, f"BAR{index} not implemented")
        enabled = self.io_enabled if bar.is_io else self.memory_enabled
        if not enabled:
            log.warning("guest error: %s BAR%d %s %#x+%d with %s decode disabled", self.name, index,
                        "write" if write else "read", offset, count, "I/O" if bar.is_io else "memory")
            return None
        return bar

    # --- config writes ------------------------------------------------------------------------
    def _config_write(self, offset: int, data: bytes) -> None:
        """Apply masks, then the side effects of header and capability registers."""
        old = bytes(self.config.data)
        old_command = self.command
        self.config.guest_write(offset, data)
        log.debug("%s: config write %#x <- %s", self.name, offset, data.hex())
        if offset < regs.PCI_STD_CAP_START:
            self._header_written(old_command)
        for cap in self.capabilities + self.ext_capabilities:
            if cap.contains(offset, len(data)):
                cap_old = old[cap.offset:cap.offset + cap.size]
                cap.config_written(cap_old)
                if bytes(self.config.data[cap.offset:cap.offset + cap.size]) != cap_old:
                    cap.notify_listeners()
        if self._flr_requested:
            self._flr_requested = False
            self.function_reset()

    def request_flr(self) -> None:
        """Schedule a function-level reset at the end of the current config write."""
        self._flr_requested = True

    def _header_written(self, old_command: int) -> None:
        new = self.command
        if new == old_command:
            return
        log.info("%s: command %#06x -> %#06x", self.name, old_command, new)
        changed = old_command ^ new
        if changed & regs.Command.INTX_DISABLE and not self.intx_disabled and self._intx_level:
            self._signal_intx()
        if changed & regs.Command.MASTER and self.bus_master:
            if self.msix is not None:
                self.msix.flush_pending()
            if self.msi is not None:
                self.msi.flush_pending()
        self.command_changed(old_command, new)

    def bar_address(self, index: int) -> int:
        """The address software programmed into BAR ``index`` (flag bits stripped)."""
        bar = self.bars[index]
        if bar is None:
            return 0
        offset = regs.bar_offset(index)
        low = self.config.get32(offset) & ~(regs.BAR_IO_FLAG_BITS if bar.is_io else regs.BAR_MEM_FLAG_BITS)
        if bar.is_64bit:
            return low | (self.config.get32(offset + 4) << 32)
        return low

    def close(self) -> None:
        """Release BAR memfds (the device is being destroyed)."""
        for bar in self.bars:
            if bar is not None:
                bar.close()


def _align4(value: int) -> int:
    return (value + 3) & ~3
