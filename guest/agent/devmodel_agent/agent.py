"""The agent daemon's state: devices, logs, policies, interrupt threads and subcommands.

Interrupt driven (like a Linux driver's threaded IRQ handlers): one thread per function
blocks on its :class:`~devmodel_agent.hw.IrqLine`. vIOMMU vectors (0 EVENTQ, 1 PRIQ,
2 GERROR, 3 CMD_SYNC) first wake CMD_SYNC waiters, then, under the hardware lock, handle
GERROR and drain both output queues (edge interrupts may coalesce, so every interrupt
drains everything). DMA engine vectors (0 completion, 1 error) reap completion records;
NIC vectors (0 RX, 1 TX, 2 ERROR/LINK) reap written-back descriptors.
Every handled interrupt notifies :attr:`Agent.changed`, which ``--wait`` requests block on.

Endpoints (the DMA engine, the NIC) may be hot-removed. Each lives in a
:class:`DeviceSlot`; its registers are reached only through a guard that checks the slot
is alive, because a removed function's BAR mapping raises SIGBUS. Removal is noticed when
the interrupt line errors (devmodel_uirq reports EPOLLHUP once the function is unbound)
or the sysfs node vanishes; the slot then drops its driver state, its StreamID's STE goes
to abort, and page requests still listed for it become ``stale`` (never answered
automatically). ``dm rescan``, or the next command that needs the device, finds it
again, possibly at another BDF and so another vSID.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from devmodel.iommu import records as rec
from devmodel.iommu import registers as R
from devmodel.iommu.bitfield import Fields
from devmodel.devices.nic_records import DescStatus
from devmodel.devices.nic_records import Reg as NicReg
from devmodel.iommu.records import EventClass, EventId, Opcode, PriResp
from devmodel.viommu.registers import VIOMMU_EVTQ_LOST, VIOMMU_PRIQ_LOST, VIOMMU_VEVENTQ_LOST

from devmodel_agent.dmaeng import DmaEngineDriver, Job, completion_name, status_names
from devmodel_agent.hw import (PAGE, AgentError, Allocator, DeviceGone, Endpoint, GuardedConfig, GuardedRegs,
                               IrqLine, Memory, PciConfig, Regs)
from devmodel_agent.nic import NicDriver, desc_status_name, frame_fields, generated_frame
from devmodel_agent.nic import status_names as nic_status_names
from devmodel_agent.pcicaps import EndpointCaps, enable_memory_and_master
from devmodel_agent.smmu import Context, SmmuDriver, Stream

log = logging.getLogger(__name__)

SMMU_VECTORS = ("eventq", "priq", "gerror", "cmd_sync")
ENGINE_VECTORS = ("dma_completion", "dma_error")
NIC_VECTORS = ("nic_rx", "nic_tx", "nic_error")
DEVICE_KINDS = {"engine": "DMA engine", "nic": "NIC"}
IRQ_POLL = 0.5
WAIT_SLICE = 0.1
RC_TIMEOUT = 3
HEX_KEYS = frozenset({"sid", "addr", "iova", "pa", "fault_addr", "base", "gerror", "gerrorn", "opcode", "strtab",
                      "ring", "completions", "cr0", "cr0ack", "irq_ctrl", "cmdq_prod", "cmdq_cons", "eventq_prod",
                      "eventq_cons", "priq_prod", "priq_cons", "eng_status", "src", "dst", "pattern", "id",
                      "rx_ring", "tx_ring", "nic_status"})
RESP_CODES = {"success": PriResp.SUCCESS, "invalid": PriResp.INVALID_REQUEST, "failure": PriResp.RESPONSE_FAILURE}


def fmt(kind: str, **kv: object) -> str:
    """One output record: ``kind k=v ...``; ints in HEX_KEYS as hex, strings with spaces quoted."""
    parts = [kind]
    for k, v in kv.items():
        if v is None:
            v = "none"
        elif isinstance(v, bool):
            v = int(v)
        if isinstance(v, int):
            text = f"{v:#x}" if k in HEX_KEYS else str(v)
        else:
            text = str(v)
            if not text or any(c.isspace() or c == '"' for c in text):
                text = '"' + text.replace('"', "'") + '"'
        parts.append(f"{k}={text}")
    return " ".join(parts)


def event_name(event_id: int) -> str:
    try:
        return EventId(event_id).name
    except ValueError:
        return f"EVENT_{event_id:#x}"


@dataclass
class Buffer:
    name: str
    pa: int
    size: int


@dataclass
class PageRequestGroup:
    """Page requests sharing (sid, ssid, PRG index) until the Last one; answered once."""

    sid: int
    ssid: int | None
    prgi: int
    seqs: list[int] = field(default_factory=list)
    pages: list[tuple[int, bool, bool]] = field(default_factory=list)
    last: bool = False
    state: str = "pending"


@dataclass
class Backends:
    """What the agent drives; the guest glue or the host simulation builds one.

    ``discover(kind)`` finds (binds, maps) an endpoint of that kind again after a removal,
    or returns None; ``rescan_bus`` asks the bus to enumerate again (guest: sysfs rescan).
    """

    smmu_regs: Regs
    smmu_irq: IrqLine
    mem: Memory
    reserved_base: int
    reserved_size: int
    engine: Endpoint | None = None
    nic: Endpoint | None = None
    smmu_cfg: PciConfig | None = None
    discover: Callable[[str], Endpoint | None] | None = None
    rescan_bus: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None


@dataclass
class DeviceSlot:
    """One hot-removable endpoint and the driver state the agent keeps for it."""

    kind: str
    ep: Endpoint | None = None
    driver: DmaEngineDriver | NicDriver | None = None
    caps: EndpointCaps | None = None
    gone: bool = False
    vsid: int = 0
    bdf: str = ""
    removals: int = 0

    @property
    def label(self) -> str:
        return DEVICE_KINDS[self.kind]

    def alive(self) -> bool:
        """Safe to touch the function's registers: bound, not seen removed, node still there."""
        ep = self.ep
        return ep is not None and not self.gone and ep.present()

    @property
    def state(self) -> str:
        if self.ep is not None and not self.gone:
            return "present"
        return "gone" if self.removals else "absent"


class Agent:
    """The daemon. Subcommand handlers return output lines and an exit code."""

    def __init__(self, backends: Backends, *, cmdq_log2: int = 8, evtq_log2: int = 8, priq_log2: int = 8,
                 sid_bits: int = 9, ring_log2: int = 6) -> None:
        self.b = backends
        self.mem = backends.mem
        self.alloc = Allocator(self.mem, backends.reserved_base, backends.reserved_size)
        vsids = [ep.vsid for ep in (backends.engine, backends.nic) if ep is not None]
        self.smmu = SmmuDriver(backends.smmu_regs, self.mem, self.alloc, cmdq_log2=cmdq_log2, evtq_log2=evtq_log2,
                               priq_log2=priq_log2, sid_bits=max([sid_bits, *(v.bit_length() for v in vsids)]))
        self.lock = self.smmu.lock
        self.ring_log2 = ring_log2
        self.slots = {kind: DeviceSlot(kind) for kind in DEVICE_KINDS}
        self.gone_sids: set[int] = set()
        for kind, ep in (("engine", backends.engine), ("nic", backends.nic)):
            if ep is not None:
                self._attach(kind, ep)
        self.nic_log: list[dict] = []
        self.nic_errors: list[dict] = []
        self.changed = threading.Condition()
        self.events: list[dict] = []
        self.prq: list[dict] = []
        self.groups: dict[tuple[int, int | None, int], PageRequestGroup] = {}
        self.group_log: list[PageRequestGroup] = []
        self.buffers: dict[str, Buffer] = {}
        self.dma_log: list[Job] = []
        self.pri_policy = "off"
        self.evtq_hold = False
        self.irq_counts = {name: 0 for name in (*SMMU_VECTORS, *ENGINE_VECTORS, *NIC_VECTORS)}
        self.counters = dict(dma_submitted=0, dma_completed=0, pri_auto=0, pri_resp=0, pri_stop_markers=0,
                             evtq_overflow_seen=0, priq_overflow_seen=0)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.up = False

    # ------------------------------------------------------------ endpoints (slots)
    @property
    def engine(self) -> DmaEngineDriver | None:
        """The DMA-engine driver while the engine is present (None when absent or gone)."""
        slot = self.slots["engine"]
        return None if slot.gone else slot.driver  # type: ignore[return-value]

    @property
    def caps(self) -> EndpointCaps | None:
        slot = self.slots["engine"]
        return None if slot.gone else slot.caps

    @property
    def vsid(self) -> int:
        """The DMA engine's StreamID (the default SID of map/unmap/ste), last one known."""
        return self.slots["engine"].vsid

    def _attach(self, kind: str, ep: Endpoint) -> DeviceSlot:
        """Create the driver state of a found endpoint (no register access yet)."""
        slot = self.slots[kind]
        slot.ep, slot.gone, slot.vsid, slot.bdf = ep, False, ep.vsid, ep.bdf
        self.gone_sids.discard(ep.vsid)
        what = f"{slot.label} {ep.bdf}"
        regs = GuardedRegs(ep.regs, lambda: slot.ep is ep and slot.alive(), what)
        if kind == "engine":
            slot.driver = DmaEngineDriver(regs, self.mem, self.alloc, self.ring_log2)
        else:
            slot.driver = NicDriver(regs, self.mem, self.alloc)
        slot.caps = None
        if ep.cfg is not None:
            ep.cfg = GuardedConfig(ep.cfg, lambda: slot.ep is ep and slot.alive(), what)
        log.info("%s at %s (vSID %#x): driver state created", slot.label, ep.bdf, ep.vsid)
        return slot

    def _bring_up(self, slot: DeviceSlot) -> None:
        """Probe the endpoint: the engine's ring is programmed and its STE written (s1)."""
        ep = slot.ep
        if ep.cfg is not None:
            enable_memory_and_master(ep.cfg)
            slot.caps = EndpointCaps(ep.cfg)
        drv = slot.driver
        drv.probe()
        if isinstance(drv, DmaEngineDriver):
            drv.allocate()
            self.write_ste(slot.vsid, "s1")
            drv.start()

    def _spawn_endpoint(self, slot: DeviceSlot) -> None:
        ep = slot.ep
        if ep is None or ep.irq is None:
            return
        names, handler = (ENGINE_VECTORS, self._engine_irq) if slot.kind == "engine" else (NIC_VECTORS,
                                                                                             self._nic_irq)
        self._spawn(f"irq-{slot.kind}", ep.irq, names, handler, owner=(slot, ep))

    def device_gone(self, kind: str, ep: Endpoint, why: str) -> bool:
        """The endpoint ``ep`` was removed: drop its driver state (idempotent)."""
        slot = self.slots[kind]
        if slot.ep is not ep or slot.gone:
            return False
        slot.gone = True  # first, without the lock: commands in flight stop touching its BAR
        log.warning("%s at %s (vSID %#x) is gone: %s", slot.label, ep.bdf, ep.vsid, why)
        with self.lock:
            slot.removals += 1
            slot.driver = None
            slot.caps = None
            self.gone_sids.add(ep.vsid)
            self._stale_requests(ep.vsid)
            st = self.smmu.streams.get(ep.vsid)
            if st is not None and self.smmu.up:
                try:
                    self.smmu.write_ste(ep.vsid, "abort")
                except AgentError as e:
                    log.warning("abort STE of removed vSID %#x: %s", ep.vsid, e)
                st.cd_table, st.contexts, st.eats = 0, {}, False  # a returning device gets fresh tables
            if kind == "nic":
                self.nic_errors.append(dict(seq=len(self.nic_errors) + 1, kind="gone", bdf=ep.bdf))
            if ep.irq is None:
                self._close_endpoint(ep)
            # else: its interrupt thread closes it when it leaves (it may still be polling the fd)
        with self.changed:
            self.changed.notify_all()
        return True

    @staticmethod
    def _close_endpoint(ep: Endpoint) -> None:
        try:
            ep.close()
        except OSError as e:
            log.info("closing removed %s: %s", ep.bdf, e)

    def _stale_requests(self, sid: int) -> None:
        """Page requests of a removed function: never answered automatically (Linux drops
        a device's pending faults when it goes; a response would reach nobody, or a new device)."""
        for key in [k for k in self.groups if k[0] == sid]:
            grp = self.groups.pop(key)
            grp.state = "stale"
            for e in self.prq:
                if e.get("seq") in grp.seqs:
                    e["state"] = "stale"
            log.info("page-request group sid=%#x ssid=%s prg=%d marked stale", *key)

    def _check_removed(self) -> None:
        """Notice removals the interrupt thread has not reported yet (sysfs node gone)."""
        for slot in self.slots.values():
            ep = slot.ep
            if ep is not None and not slot.gone and not ep.present():
                self.device_gone(slot.kind, ep, "function no longer on the bus")

    def rescan(self, kind: str) -> tuple[str, DeviceSlot]:
        """Find ``kind`` again when it is gone or absent; re-create its driver state."""
        slot = self.slots[kind]
        with self.lock:
            self._check_removed()
            if slot.ep is not None and not slot.gone:
                return "present", slot
            if self.b.discover is None:
                return "absent", slot
            try:
                ep = self.b.discover(kind)
            except (AgentError, OSError) as e:
                log.warning("rescan %s: %s", slot.label, e)
                return f"error:{getattr(e, 'strerror', None) or e}", slot
            if ep is None:
                return "absent", slot
            if ep.vsid >= 1 << self.smmu.sid_bits:
                ep.close()
                raise AgentError(errno.ERANGE, f"{slot.label} at {ep.bdf}: vSID {ep.vsid:#x} beyond the "
                                 f"{self.smmu.sid_bits}-bit stream table (dm up --sid-bits)")
            self._attach(kind, ep)
            try:
                self._bring_up(slot)
            except AgentError:
                self.device_gone(kind, ep, "bring-up after rescan failed")
                raise
        self._spawn_endpoint(slot)
        return "found", slot

    def _need(self, kind: str) -> DeviceSlot:
        """The slot of a present ``kind``; a gone or absent one is looked for once (auto rescan)."""
        slot = self.slots[kind]
        with self.lock:
            self._check_removed()
        if slot.gone or slot.driver is None:
            state, slot = self.rescan(kind)
            if slot.driver is None or slot.gone:
                if slot.removals:
                    raise DeviceGone(f"{slot.label} {slot.bdf}")
                raise AgentError(errno.ENODEV, f"no {slot.label}")
        return slot

    # ------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Bring the vIOMMU and the endpoints up and start the interrupt threads."""
        with self.lock:
            if self.b.smmu_cfg is not None:
                enable_memory_and_master(self.b.smmu_cfg)
            self.smmu.bring_up()
            for slot in self.slots.values():
                if slot.ep is not None:
                    self._bring_up(slot)
        self._spawn("irq-smmu", self.b.smmu_irq, SMMU_VECTORS, self._smmu_irq)
        for slot in self.slots.values():
            self._spawn_endpoint(slot)
        self.up = True
        return self.status_lines()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for slot in self.slots.values():
                if slot.driver is None or slot.gone:
                    continue
                try:
                    slot.driver.stop()
                except (AgentError, OSError) as e:
                    log.warning("shutdown of %s: %s", slot.label, e)
            try:
                self.smmu.shut_down()
            except (AgentError, OSError) as e:
                log.warning("shutdown: %s", e)
        lines = [self.b.smmu_irq] + [s.ep.irq for s in self.slots.values() if s.ep is not None]
        for line in lines:
            wake = getattr(line, "wake", None)  # optional: lines that can end a wait early
            if wake is not None:
                wake()
        for t in self._threads:
            t.join(timeout=2 * IRQ_POLL + 1)
        self.up = False

    # ------------------------------------------------------------ interrupts
    def _spawn(self, name: str, line: IrqLine, names: tuple[str, ...], handler: Callable[[set[str]], None],
               owner: tuple[DeviceSlot, Endpoint] | None = None) -> None:
        t = threading.Thread(target=self._irq_loop, args=(line, names, handler, owner), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _irq_loop(self, line: IrqLine, names: tuple[str, ...], handler: Callable[[set[str]], None],
                  owner: tuple[DeviceSlot, Endpoint] | None = None) -> None:
        """One function's interrupt thread; an endpoint's ends when its line errors (removal)
        and then closes the endpoint's files (nobody else polls them)."""
        try:
            self._irq_serve(line, names, handler, owner)
        finally:
            if owner is not None and (owner[0].ep is not owner[1] or owner[0].gone):
                self._close_endpoint(owner[1])

    def _irq_serve(self, line: IrqLine, names: tuple[str, ...], handler: Callable[[set[str]], None],
                   owner: tuple[DeviceSlot, Endpoint] | None) -> None:
        last = [0] * line.nvec
        while not self._stop.is_set():
            if owner is not None and (owner[0].ep is not owner[1] or owner[0].gone):
                return  # the endpoint was replaced or dropped
            try:
                counts = line.wait(IRQ_POLL)
            except OSError as e:
                if owner is not None:
                    self.device_gone(owner[0].kind, owner[1], f"interrupt line: {e.strerror or e}")
                else:
                    log.error("interrupt line failed: %s", e)
                return
            if counts is None:
                continue
            fired = set()
            for i, (old, new) in enumerate(zip(last, counts)):
                if new != old and i < len(names):
                    self.irq_counts[names[i]] += (new - old) & ((1 << 64) - 1)
                    fired.add(names[i])
            last = list(counts)
            try:
                handler(fired)
            except AgentError as e:
                log.error("interrupt handler: %s", e)
            except Exception:  # noqa: BLE001 - the thread must keep serving interrupts
                log.exception("interrupt handler crashed")
            with self.changed:
                self.changed.notify_all()

    def _smmu_irq(self, fired: set[str]) -> None:
        log.debug("vIOMMU interrupt: %s", ",".join(sorted(fired)))
        self.smmu.notify()  # CMD_SYNC waiters hold the lock: wake them first
        with self.lock:
            if not self.smmu.up:
                return
            if self.smmu.gerror_active():
                self.smmu.handle_gerror()
            if not self.evtq_hold:
                self.drain_events()
            self.drain_prq()

    def _engine_irq(self, fired: set[str]) -> None:
        with self.lock:
            self.reap()
            if "dma_error" in fired and self.engine is not None:
                log.warning("DMA engine error interrupt: status %s", status_names(self.engine.status()))

    def _nic_irq(self, fired: set[str]) -> None:
        """RX: reap and re-post; TX: reap; ERROR/LINK: log the ring state (halts, link)."""
        with self.lock:
            slot = self.slots["nic"]
            drv = slot.driver
            if slot.gone or not isinstance(drv, NicDriver):
                return
            drv.ack_irqs()
            self._nic_reap()
            if "nic_error" in fired:
                st = drv.status()
                entry = dict(seq=len(self.nic_errors) + 1, kind="error", nic_status=st, state=nic_status_names(st))
                self.nic_errors.append(entry)
                log.warning("NIC error/link interrupt: status %s", entry["state"])

    # ------------------------------------------------------------ queues -> logs
    def drain_events(self) -> tuple[int, bool]:
        d = self.smmu.drain_events()
        for ev in d.records:
            self.events.append(self._event_dict(len(self.events) + 1, ev))
        if d.overflow:
            self.counters["evtq_overflow_seen"] += 1
            self.events.append(dict(seq=len(self.events) + 1, kind="overflow"))
        return len(d.records), d.overflow

    @staticmethod
    def _event_dict(seq: int, ev: Fields) -> dict:
        try:
            cls = EventClass(ev.CLASS).name
        except ValueError:
            cls = str(ev.CLASS)
        entry = dict(seq=seq, id=ev.EventID, name=event_name(ev.EventID), sid=ev.StreamID, ssv=ev.SSV,
                     ssid=ev.SubstreamID, addr=ev.InputAddr, rnw=ev.RnW, pnu=ev.PnU, ind=ev.InD, s2=ev.S2,
                     **{"class": cls}, stag=ev.STAG)
        if ev.EventID in (EventId.F_STE_FETCH, EventId.F_CD_FETCH, EventId.F_WALK_EABT):
            entry["fetch_addr"] = ev.FetchAddr
        log.info("event %d: %s sid=%#x ssid=%s addr=%#x", seq, entry["name"], ev.StreamID,
                 ev.SubstreamID if ev.SSV else None, ev.InputAddr)
        return entry

    def drain_prq(self) -> None:
        d = self.smmu.drain_page_requests()
        for r in d.records:
            self._page_request(r)
        if d.overflow:
            self.counters["priq_overflow_seen"] += 1
            self.prq.append(dict(seq=len(self.prq) + 1, kind="overflow"))

    def _page_request(self, r: Fields) -> None:
        ssid = r.SubstreamID if r.SSV else None
        entry = dict(seq=len(self.prq) + 1, sid=r.StreamID, ssv=r.SSV, ssid=r.SubstreamID, prgi=r.PRGIndex,
                     addr=r.PageAddr, r=r.R, w=r.W, l=r.L, priv=r.Priv, exec=r.Exec, state="pending")
        self.prq.append(entry)
        log.info("page request %d: sid=%#x ssid=%s prg=%d addr=%#x R=%d W=%d L=%d", entry["seq"], r.StreamID,
                 ssid, r.PRGIndex, r.PageAddr, r.R, r.W, r.L)
        if r.StreamID in self.gone_sids:
            entry["state"] = "stale"  # queued before the function went away: nobody to answer
            log.info("page request %d: sid %#x was removed: stale", entry["seq"], r.StreamID)
            return
        if rec.is_stop_marker(r):
            entry["state"] = "stop-marker"
            self.counters["pri_stop_markers"] += 1
            return
        key = (r.StreamID, ssid, r.PRGIndex)
        grp = self.groups.get(key)
        if grp is None:
            grp = self.groups[key] = PageRequestGroup(r.StreamID, ssid, r.PRGIndex)
            self.group_log.append(grp)
        grp.seqs.append(entry["seq"])
        grp.pages.append((r.PageAddr, bool(r.R), bool(r.W)))
        if r.L:
            grp.last = True
            if self.pri_policy != "off":
                self._auto_respond(grp)

    def _auto_respond(self, grp: PageRequestGroup) -> None:
        """Policy answer: success maps each requested page first (fresh zeroed pages)."""
        code = self.pri_policy
        if code == "success":
            ctx = self.smmu.context(grp.sid, grp.ssid or 0)
            for page, _, write in grp.pages:
                leaf = ctx.table.lookup(page)
                if leaf is None or (write and not leaf.writable):
                    pa = leaf.pa if leaf is not None else self._fault_page(grp.sid, page)
                    ctx.table.map(page, pa, writable=True)
                    self.smmu.invalidate_page(grp.sid, ctx, page)
            self._nic_remapped(grp.sid)
        self.counters["pri_auto"] += 1
        self.respond(grp.sid, grp.ssid, grp.prgi, code, auto=True)

    def respond(self, sid: int, ssid: int | None, prgi: int, code: str, auto: bool = False) -> tuple[bool, object]:
        key = (sid, ssid, prgi)
        grp = self.groups.pop(key, None)
        result = self.smmu.pri_response(sid, ssid, prgi, RESP_CODES[code])
        state = ("auto-" if auto else "") + code
        if grp is not None:
            grp.state = state
            for e in self.prq:
                if e.get("seq") in grp.seqs:
                    e["state"] = state
        self.counters["pri_resp"] += 1
        return grp is not None, result

    def _fault_page(self, sid: int, page: int) -> int:
        """What a page request for ``page`` gets mapped to: the NIC's own RX buffer page when
        the driver had unmapped it (identity), else a fresh zeroed page."""
        slot = self.slots["nic"]
        drv = slot.driver
        if sid == slot.vsid and isinstance(drv, NicDriver) and drv.rings is not None:
            for buf in drv.rings.buffers:
                if page in buf.pages():
                    return page
        return self.alloc.alloc(PAGE)

    def _nic_remapped(self, sid: int) -> None:
        """Buffers whose pages are all mapped again (by a PRI fix-up) count as mapped."""
        slot = self.slots["nic"]
        drv = slot.driver
        if sid != slot.vsid or not isinstance(drv, NicDriver) or drv.rings is None:
            return
        ctx = self.smmu.streams[sid].contexts.get(drv.rings.pasid)
        for buf in drv.rings.buffers:
            if not buf.mapped and ctx is not None and all(ctx.table.lookup(p) for p in buf.pages()):
                buf.mapped = True
                log.info("nic: buffer %d mapped again by a page-request fix-up", buf.index)

    def _reaped(self) -> bool:
        """Reap completion records (for wait predicates); always True."""
        self.reap()
        return True

    def reap(self) -> list[Job]:
        """Completed DMA-engine jobs; DeviceGone once the engine was removed (waiters fail fast)."""
        slot = self.slots["engine"]
        if slot.gone:
            raise DeviceGone(f"{slot.label} {slot.bdf}")
        if self.engine is None:
            return []
        done = self.engine.reap()
        self.counters["dma_completed"] += len(done)
        return done

    # ------------------------------------------------------------ helpers
    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block (on interrupts, re-checking at WAIT_SLICE) until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if predicate():
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self.changed:
                self.changed.wait(min(WAIT_SLICE, remaining))

    def need_engine(self) -> DmaEngineDriver:
        return self._need("engine").driver  # type: ignore[return-value]

    def need_nic(self) -> NicDriver:
        return self._need("nic").driver  # type: ignore[return-value]

    def need_caps(self, kind: str = "engine") -> EndpointCaps:
        slot = self._need(kind)
        if slot.caps is None:
            raise AgentError(errno.ENODEV, f"no config space for the {slot.label}")
        return slot.caps

    def _slot_of_sid(self, sid: int) -> DeviceSlot | None:
        return next((s for s in self.slots.values() if s.ep is not None and not s.gone and s.vsid == sid), None)

    def ensure_context(self, sid: int, pasid: int) -> Context:
        """The CD of ``pasid``; new engine contexts get the ring / completion pages mapped."""
        st = self.smmu.stream(sid)
        fresh = pasid not in st.contexts
        ctx = self.smmu.context(sid, pasid)
        if fresh and self.engine is not None and sid == self.vsid:
            pages = self.engine.control_pages() if pasid == 0 else self.engine.completion_pages()
            for page in pages:
                ctx.table.map(page, page, writable=True)
        return ctx

    def write_ste(self, sid: int, mode: str, *, new_cd: bool = False, eats: str = "auto") -> Stream:
        if eats == "auto":
            slot = self._slot_of_sid(sid)
            want_eats = bool(slot is not None and slot.caps is not None and slot.caps.ats_enabled())
        else:
            want_eats = eats == "on"
        st = self.smmu.stream(sid)
        if mode == "s1" and (new_cd or not st.cd_table):
            pasids = sorted(st.contexts)
            self.smmu.new_cd_table(st)
            # CDs exist before the STE points at them: CD 0 (ring, completions) and, for a
            # replace, the PASIDs that were attached (fresh, empty page tables).
            for pasid in sorted({0, *pasids}):
                self.ensure_context(sid, pasid)
        return self.smmu.write_ste(sid, mode, eats=want_eats)

    def buffer(self, name: str) -> Buffer:
        buf = self.buffers.get(name)
        if buf is None:
            raise AgentError(errno.ENOENT, f"no buffer named {name!r}")
        return buf

    def job_line(self, job: Job) -> str:
        c = job.completion
        if c is None:
            return fmt("dma", slot=job.slot, op=job.op, pasid=job.pasid, status="PENDING", bytes=0)
        return fmt("dma", slot=job.slot, op=job.op, pasid=job.pasid, status=completion_name(c.Status),
                   bytes=c.BytesCompleted, fault_addr=c.FaultAddr, fault_rnw=c.FaultRnW,
                   fault_event=event_name(c.FaultEvent) if c.FaultEvent else "none")

    def status_lines(self) -> list[str]:
        with self.lock:
            s = self.smmu
            lines = [fmt("smmu", up=s.up, strtab=s.strtab, sid_bits=s.sid_bits,
                         cmdq_entries=s.cmdq.entries if s.cmdq else 0, evtq_entries=s.evtq.entries if s.evtq else 0,
                         priq_entries=s.priq.entries if s.priq else 0, ats=int(bool(s.ids and s.ids.ats)),
                         pri=int(bool(s.ids and s.ids.pri)), ssid_bits=s.ids.ssid_bits if s.ids else 0)]
            if s.up:
                lines.append(fmt("regs", **s.regs_snapshot()))
            self._check_removed()
            lines += self._device_status(self.slots["engine"], self._engine_lines)
            nic = self.slots["nic"]
            lines += self._device_status(nic, lambda: [self._nic_line(nic.driver)] if nic.driver else [])
            for sid, st in sorted(self.smmu.streams.items()):
                lines.append(fmt("stream", sid=sid, mode=st.mode, cd_table=hex(st.cd_table), eats=st.eats,
                                 pasids=",".join(map(str, sorted(st.contexts))) or "none"))
            lines.append(fmt("policy", pri_auto=self.pri_policy, evtq_hold=self.evtq_hold,
                             reserved_used=self.alloc.used))
            return lines

    def _engine_lines(self) -> list[str]:
        eng = self.engine
        if eng is None:
            return []
        st = eng.status()
        lines = [fmt("engine", sid=self.vsid, ring=eng.ring, completions=eng.completions, entries=eng.entries,
                     eng_status=st, state=status_names(st), head=eng.head(), tail=eng.tail)]
        if self.caps is not None:
            caps = dict(ats=int(self.caps.ats_enabled()), pasid=int(self.caps.pasid_enabled()))
            if self.caps.pri is not None:
                caps.update({f"pri_{k}": v for k, v in self.caps.pri_status().items()})
            lines.append(fmt("caps", **caps))
        return lines

    def _device_status(self, slot: DeviceSlot, detail: Callable[[], list[str]]) -> list[str]:
        """A ``device`` line (present / gone / absent) and, while present, the driver's lines.

        The detail reads registers; a removal racing with it ends in DeviceGone, not a crash.
        """
        if slot.ep is None and not slot.removals:
            return []
        extra: list[str] = []
        if not slot.gone and slot.driver is not None:
            try:
                extra = detail()
            except DeviceGone:
                extra = []
        return [*extra, fmt("device", dev=slot.kind, state=slot.state, bdf=slot.bdf or "none", sid=slot.vsid,
                            removals=slot.removals)]

    # ------------------------------------------------------------ dispatch
    def handle(self, args) -> tuple[int, list[str]]:
        """Run one parsed subcommand; errors become an ``error`` record and exit code 1."""
        name = args.cmd
        for attr in ("buf_cmd", "dma_cmd", "pri_cmd", "cmd_cmd", "nic_cmd"):
            sub = getattr(args, attr, None)
            if sub:
                name = f"{name}_{sub}"
        fn = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if fn is None:
            return 1, [fmt("error", errno="ENOSYS", msg=f"no handler for {name}")]
        try:
            out = fn(args)
        except AgentError as e:
            return 1, [fmt("error", errno=e.name, msg=e.message)]
        except ValueError as e:
            return 1, [fmt("error", errno="EINVAL", msg=str(e))]
        except OSError as e:  # a device file failed under us (e.g. removed while in use)
            code = errno.errorcode.get(e.errno or errno.EIO, "EIO")
            return 1, [fmt("error", errno=code, msg=str(e.strerror or e))]
        if isinstance(out, tuple):
            return out
        return 0, list(out)

    # ------------------------------------------------------------ subcommands
    def cmd_status(self, args) -> list[str]:
        return self.status_lines()

    def cmd_counters(self, args) -> list[str]:
        with self.lock:
            kv = {f"irq_{k}": v for k, v in self.irq_counts.items()}
            kv.update(self.smmu.counters)
            kv.update(self.counters)
            # The vIOMMU's IMPLEMENTATION DEFINED lost counters (0 on plain SMMUv3 hardware):
            # the exact number of records that never reached the guest queues.
            kv["viommu_evtq_lost"] = self.smmu.regs.read32(VIOMMU_EVTQ_LOST)
            kv["viommu_priq_lost"] = self.smmu.regs.read32(VIOMMU_PRIQ_LOST)
            kv["viommu_veventq_lost"] = self.smmu.regs.read32(VIOMMU_VEVENTQ_LOST)
            kv["events_logged"] = sum(1 for e in self.events if "name" in e)
            kv["prq_logged"] = sum(1 for e in self.prq if "prgi" in e)
            if self.engine is not None:
                kv.update(self.engine.fault_counters())
        return [fmt("counters", **kv)]

    def cmd_gerror(self, args) -> list[str]:
        with self.lock:
            lines = [fmt("gerror", **e) for e in self.smmu.gerror_log]
            lines.append(fmt("gerror_regs", gerror=self.smmu.regs.read32(R.GERROR),
                             gerrorn=self.smmu.regs.read32(R.GERRORN), active=self.smmu.gerror_active()))
        return lines

    def cmd_ste(self, args) -> list[str]:
        with self.lock:
            answered = 0
            if args.pending == "invalid":
                # Like Linux flushing a device's pending faults before its domain changes.
                for key in [k for k in self.groups if k[0] == args.vsid]:
                    self.respond(*key, "invalid")
                    answered += 1
            st = self.write_ste(args.vsid, args.mode, new_cd=args.new_cd, eats=args.eats)
        return [fmt("ste", sid=args.vsid, mode=st.mode, addr=self.smmu.ste_addr(args.vsid),
                    cd_table=hex(st.cd_table), eats=st.eats, pending_answered=answered)]

    def _map_targets(self, args) -> Iterable[tuple[int, int]]:
        if args.pages < 1:
            raise AgentError(errno.EINVAL, "--pages must be >= 1")
        if args.page_for_buffer:
            buf = self.buffer(args.page_for_buffer)
            for i in range(args.pages):
                off = args.buffer_offset + i * PAGE
                if off % PAGE or off >= buf.size:
                    raise AgentError(errno.EINVAL, f"buffer {buf.name} has no page at offset {off:#x}")
                yield args.iova + i * PAGE, buf.pa + off
        else:
            for i in range(args.pages):
                yield args.iova + i * PAGE, -1

    def cmd_map(self, args) -> list[str]:
        sid = self.vsid if args.sid is None else args.sid
        out = []
        with self.lock:
            ctx = self.ensure_context(sid, args.pasid)
            for iova, pa in list(self._map_targets(args)):
                ctx.table.check_iova(iova)
                old = ctx.table.lookup(iova)
                if pa < 0:
                    pa = old.pa if old is not None else self.alloc.alloc(PAGE)
                leaf = ctx.table.map(iova, pa, writable=not args.ro)
                if old is not None:
                    self.smmu.invalidate_page(sid, ctx, iova)
                out.append(fmt("map", sid=sid, pasid=args.pasid, iova=iova, pa=leaf.pa,
                               perm="rw" if leaf.writable else "ro", asid=ctx.asid))
        return out

    def cmd_unmap(self, args) -> list[str]:
        sid = self.vsid if args.sid is None else args.sid
        out = []
        with self.lock:
            ctx = self.smmu.context(sid, args.pasid, create=False)
            for i in range(max(args.pages, 1)):
                iova = args.iova + i * PAGE
                leaf = ctx.table.unmap(iova)
                if leaf is not None:
                    self.smmu.invalidate_page(sid, ctx, iova)
                out.append(fmt("unmap", sid=sid, pasid=args.pasid, iova=iova, was_mapped=leaf is not None))
        return out

    # buffers
    def cmd_buf_alloc(self, args) -> list[str]:
        if args.name in self.buffers:
            raise AgentError(errno.EEXIST, f"buffer {args.name!r} exists")
        if not 0 < args.size <= self.b.reserved_size:
            raise AgentError(errno.EINVAL, "bad buffer size")
        with self.lock:
            size = (args.size + PAGE - 1) & ~(PAGE - 1)
            pa = self.alloc.alloc(size)
            if args.fill:
                self.mem.write(pa, bytes([args.fill & 0xFF]) * size)
            self.buffers[args.name] = Buffer(args.name, pa, size)
        return [fmt("buf", name=args.name, pa=pa, size=size)]

    def _range(self, buf: Buffer, offset: int, length: int | None) -> tuple[int, int]:
        length = buf.size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > buf.size:
            raise AgentError(errno.ERANGE, f"range outside buffer {buf.name} ({buf.size:#x} bytes)")
        return buf.pa + offset, length

    def cmd_buf_read(self, args) -> list[str]:
        buf = self.buffer(args.name)
        pa, n = self._range(buf, args.offset, args.len if args.len is not None else min(64, buf.size - args.offset))
        data = self.mem.read(pa, n)
        return [fmt("data", name=buf.name, offset=args.offset, len=n, hex=data.hex() or "-")]

    def cmd_buf_write(self, args) -> list[str]:
        buf = self.buffer(args.name)
        data = bytes.fromhex(args.hex)
        pa, n = self._range(buf, args.offset, len(data))
        self.mem.write(pa, data)
        return [fmt("data", name=buf.name, offset=args.offset, len=n, written=n)]

    def cmd_buf_cmp(self, args) -> list[str]:
        a, b = self.buffer(args.a), self.buffer(args.b)
        n = min(a.size, b.size) if args.len is None else args.len
        if n > min(a.size, b.size):
            raise AgentError(errno.ERANGE, "length beyond a buffer")
        da, db = self.mem.read(a.pa, n), self.mem.read(b.pa, n)
        first = next((i for i in range(n) if da[i] != db[i]), -1)
        return [fmt("cmp", a=a.name, b=b.name, len=n, equal=da == db, first_diff=first)]

    def cmd_buf_list(self, args) -> list[str]:
        return [fmt("buf", name=b.name, pa=b.pa, size=b.size) for b in self.buffers.values()]

    # DMA
    def _submit(self, op: str, args, **kw: int) -> Job:
        eng = self.need_engine()
        with self.lock:
            self.ensure_context(self.vsid, args.pasid)
            job = eng.submit(op, pasid=args.pasid, **kw)
            self.dma_log.append(job)
            self.counters["dma_submitted"] += 1
            self.reap()
        return job

    def _finish(self, job: Job, no_wait: bool, timeout: float) -> tuple[int, list[str]]:
        if no_wait:
            return 0, [self.job_line(job)]
        ok = self.wait_until(lambda: self._reaped() and job.done, timeout)
        line = self.job_line(job)
        if not ok:
            return RC_TIMEOUT, [line, fmt("timeout", slot=job.slot, waited=timeout,
                                          eng_status=self.need_engine().status(),
                                          state=status_names(self.need_engine().status()))]
        return 0, [line]

    def cmd_dma_copy(self, args) -> tuple[int, list[str]]:
        job = self._submit("copy", args, src=args.src, dst=args.dst, length=args.len)
        return self._finish(job, args.no_wait, args.timeout)

    def cmd_dma_fill(self, args) -> tuple[int, list[str]]:
        job = self._submit("fill", args, src=args.pattern & ((1 << 64) - 1), dst=args.dst, length=args.len)
        return self._finish(job, args.no_wait, args.timeout)

    def cmd_dma_wait(self, args) -> tuple[int, list[str]]:
        eng = self.need_engine()
        job = eng.jobs.get(args.slot)
        if job is None:
            raise AgentError(errno.ENOENT, f"no descriptor in slot {args.slot}")
        return self._finish(job, False, args.timeout)

    def cmd_dma_list(self, args) -> list[str]:
        with self.lock:
            self.reap()
            return [self.job_line(j) for j in self.dma_log]

    def cmd_dma_status(self, args) -> list[str]:
        eng = self.need_engine()
        with self.lock:
            st = eng.status()
            return [fmt("engine", eng_status=st, state=status_names(st), head=eng.head(), tail=eng.tail,
                        in_flight=eng.in_flight(), **eng.fault_counters())]

    def cmd_dma_restart(self, args) -> list[str]:
        eng = self.need_engine()
        with self.lock:
            eng.start()
            st = eng.status()
        return [fmt("engine", eng_status=st, state=status_names(st), head=eng.head(), tail=eng.tail)]

    def cmd_dma_burst(self, args) -> tuple[int, list[str]]:
        """N one-page FILLs at unmapped IOVAs, EVTQ held: count exactly which faults got no event."""
        eng = self.need_engine()
        if not 0 < args.count < eng.entries:
            raise AgentError(errno.EINVAL, f"--count must be 1..{eng.entries - 1}")
        addrs = [args.iova + i * PAGE for i in range(args.count)]
        hold = not args.no_hold
        with self.lock:
            ctx = self.ensure_context(self.vsid, args.pasid)
            if any(ctx.table.lookup(a) is not None for a in addrs):
                raise AgentError(errno.EEXIST, "burst IOVAs must be unmapped")
            self.evtq_hold = hold
            first_event = len(self.events)
            jobs = [eng.submit("fill", pasid=args.pasid, src=0, dst=a, length=8, doorbell=False) for a in addrs]
            self.dma_log.extend(jobs)
            self.counters["dma_submitted"] += len(jobs)
            eng.ring_doorbell()
        try:
            done = self.wait_until(lambda: self._reaped() and all(j.done for j in jobs), args.timeout)
            faulted = {j.completion.FaultAddr for j in jobs if j.done and j.completion.Status != 0x01}
            qsize = self.smmu.evtq.entries

            def settled() -> bool:
                pending, overflow = self.smmu.evtq_pending()
                got = sum(1 for e in self.events[first_event:] if e.get("addr") in faulted)
                return got + pending >= len(faulted) or (overflow and pending >= qsize) or (
                    not hold and overflow)
            self.wait_until(settled, args.settle)
        finally:
            with self.lock:
                self.evtq_hold = False
                self.drain_events()
        with self.lock:
            mine = [e for e in self.events[first_event:] if e.get("addr") in faulted and "name" in e]
            seen = {e["addr"] for e in mine}
            overflow = any(e.get("kind") == "overflow" for e in self.events[first_event:])
        lost = len(faulted - seen)
        line = fmt("burst", count=args.count, completed=sum(j.done for j in jobs), faulted=len(faulted),
                   events=len(mine), lost=lost, overflow=overflow, evtq_entries=self.smmu.evtq.entries, held=hold)
        return (0 if done else RC_TIMEOUT), [line]

    # logs
    def _wait_log(self, records: list[dict], args, select: Callable[[dict], bool], kind: str | None = None,
                  refresh: Callable[[], bool] = lambda: True) -> tuple[int, list[str]]:
        def matching() -> list[dict]:
            return [e for e in records if e["seq"] > args.since and select(e)]
        ok = True
        if args.wait:
            ok = self.wait_until(lambda: refresh() and len(matching()) >= args.wait, args.timeout)
        with self.lock:
            out = []
            for e in matching():
                rec_kind = e.get("kind", None)
                fields = {k: v for k, v in e.items() if k != "kind"}
                out.append(fmt(rec_kind or kind or self._log_kind(records), **fields))
        if not ok:
            out.append(fmt("timeout", want=args.wait, got=len(out), waited=args.timeout))
            return RC_TIMEOUT, out
        return 0, out

    def _log_kind(self, records: list[dict]) -> str:
        return "event" if records is self.events else "prq"

    def cmd_events(self, args) -> tuple[int, list[str]]:
        return self._wait_log(self.events, args, lambda e: True)

    def cmd_prq(self, args) -> tuple[int, list[str]]:
        want_pending = getattr(args, "pending", False)
        return self._wait_log(self.prq, args, lambda e: not want_pending or e.get("state") == "pending")

    def cmd_evtq(self, args) -> list[str]:
        with self.lock:
            if args.action == "hold":
                self.evtq_hold = True
            elif args.action == "release":
                self.evtq_hold = False
                n, overflow = self.drain_events()
                return [fmt("evtq", hold=0, drained=n, overflow=overflow)]
            pending, overflow = self.smmu.evtq_pending()
            return [fmt("evtq", hold=self.evtq_hold, pending=pending, overflow_flagged=overflow,
                        entries=self.smmu.evtq.entries, overflows=self.smmu.counters["evtq_overflows"])]

    # PRI
    def cmd_resp(self, args) -> list[str]:
        with self.lock:
            known, result = self.respond(args.sid, args.ssid, args.grpid, args.code)
        return [fmt("resp", sid=args.sid, ssid=args.ssid, grpid=args.grpid, code=args.code, known=known,
                    synced=result.synced, cmd_errors=len(result.errors))]

    def cmd_pri_auto(self, args) -> list[str]:
        with self.lock:
            self.pri_policy = args.policy
            answered = 0
            if args.policy != "off":
                for grp in [g for g in self.groups.values() if g.last]:
                    self._auto_respond(grp)
                    answered += 1
        return [fmt("pri", auto=self.pri_policy, answered_now=answered)]

    def _pri_line(self, st: dict) -> list[str]:
        return [fmt("pri", auto=self.pri_policy, **st)]

    def cmd_pri_enable(self, args) -> list[str]:
        caps = self.need_caps(args.dev)
        with self.lock:
            if caps.pasid is not None:
                caps.set_pasid(True)
            return self._pri_line(caps.enable_pri(args.alloc))

    def cmd_pri_disable(self, args) -> list[str]:
        with self.lock:
            return self._pri_line(self.need_caps(args.dev).disable_pri(args.reset))

    def cmd_pri_reset(self, args) -> list[str]:
        with self.lock:
            return self._pri_line(self.need_caps(args.dev).disable_pri(True))

    def cmd_pri_status(self, args) -> list[str]:
        with self.lock:
            return self._pri_line(self.need_caps(args.dev).pri_status())

    def cmd_ats(self, args) -> list[str]:
        caps = self.need_caps(args.dev)
        slot = self.slots[args.dev]
        sid = slot.vsid
        with self.lock:
            if args.state != "status":
                on = args.state == "on"
                if on and caps.pasid is not None:
                    caps.set_pasid(True)
                caps.set_ats(on)
                st = self.smmu.streams.get(sid)
                if st is not None and st.mode == "s1" and st.eats != on:
                    self.smmu.write_ste(sid, "s1", eats=on)
                if args.dev == "engine" and self.engine is not None:
                    self.engine.stop()
                    self.engine.start()  # the engine drops its ATC on disable; restart cleanly
            st = self.smmu.streams.get(sid)
            return [fmt("ats", dev=args.dev, sid=sid, enabled=caps.ats_enabled(), ste_eats=bool(st and st.eats))]

    def cmd_pasid(self, args) -> list[str]:
        caps = self.need_caps(args.dev)
        with self.lock:
            if args.state != "status":
                caps.set_pasid(args.state == "on")
            return [fmt("pasid", enabled=caps.pasid_enabled())]

    # commands
    def _cmd_lines(self, name: str, data: bytes, result) -> tuple[int, list[str]]:
        ok = not result.errors and result.synced
        lines = [fmt("cmd", name=name, index=result.indices[0], opcode=data[0], result="ok" if ok else "error",
                     synced=result.synced)]
        for e in result.errors:
            lines.append(fmt("gerror", **e))
        return (0 if ok else 1), lines

    def _issue(self, name: str, data: bytes) -> tuple[int, list[str]]:
        with self.lock:
            return self._cmd_lines(name, data, self.smmu.submit([data]))

    def cmd_cmd_raw(self, args) -> tuple[int, list[str]]:
        words = args.words
        if len(words) == 4 and all(0 <= w < 1 << 32 for w in words):
            data = b"".join(w.to_bytes(4, "little") for w in words)
        elif len(words) == 2 and all(0 <= w < 1 << 64 for w in words):
            data = b"".join(w.to_bytes(8, "little") for w in words)
        else:
            raise AgentError(errno.EINVAL, "give 4 32-bit or 2 64-bit words, low word first")
        return self._issue("raw", data)

    def cmd_cmd_tlbi(self, args) -> tuple[int, list[str]]:
        op = {"nh-all": Opcode.CMD_TLBI_NH_ALL, "nh-asid": Opcode.CMD_TLBI_NH_ASID, "nh-va": Opcode.CMD_TLBI_NH_VA,
              "nh-vaa": Opcode.CMD_TLBI_NH_VAA, "nsnh-all": Opcode.CMD_TLBI_NSNH_ALL,
              "s12-vmall": Opcode.CMD_TLBI_S12_VMALL, "s2-ipa": Opcode.CMD_TLBI_S2_IPA,
              "el2-all": Opcode.CMD_TLBI_EL2_ALL}[args.kind]
        layout = rec.COMMANDS[op]
        wanted = dict(ASID=args.asid, VMID=args.vmid, Addr=args.addr & ~(PAGE - 1), IPA=args.addr & ~(PAGE - 1),
                      Leaf=int(args.leaf), TG=args.tg, NUM=args.num, SCALE=args.scale, TTL=args.ttl)
        fields = {k: v for k, v in wanted.items() if k in layout.fields and v}
        return self._issue(op.name, rec.encode_command(op, **fields))

    def cmd_cmd_sync(self, args) -> tuple[int, list[str]]:
        with self.lock:
            result = self.smmu.submit([])
        return (0 if result.synced and not result.errors else 1), [
            fmt("cmd", name="CMD_SYNC", result="ok" if result.synced else "error", synced=result.synced)]

    def cmd_cmd_cfgi(self, args) -> tuple[int, list[str]]:
        if args.what == "all":
            data = rec.encode_command(Opcode.CMD_CFGI_STE_RANGE, Range=rec.CFGI_ALL_RANGE)
        elif args.what == "ste":
            data = rec.encode_command(Opcode.CMD_CFGI_STE, StreamID=args.sid, Leaf=1)
        else:
            data = rec.encode_command(Opcode.CMD_CFGI_CD, StreamID=args.sid, SubstreamID=args.ssid, Leaf=1)
        return self._issue(f"CFGI_{args.what.upper()}", data)

    # ------------------------------------------------------------ hot-plug
    def cmd_rescan(self, args) -> list[str]:
        """Ask the bus to enumerate again (unless --no-bus), then find every endpoint again."""
        if not args.no_bus:
            try:
                self.b.rescan_bus()
            except OSError as e:
                raise AgentError(e.errno or errno.EIO, f"bus rescan failed: {e.strerror or e}") from e
        out = []
        for kind in DEVICE_KINDS:
            result, slot = self.rescan(kind)
            out.append(fmt("device", dev=kind, state=slot.state, result=result, bdf=slot.bdf or "none",
                           sid=slot.vsid, removals=slot.removals))
        return out

    # ------------------------------------------------------------ NIC
    def _nic_line(self, drv: NicDriver) -> str:
        slot = self.slots["nic"]
        st = drv.status()
        r = drv.rings
        kv: dict = dict(sid=slot.vsid, bdf=slot.bdf, mac=drv.mac.hex(":") or "none", up=drv.is_up, nic_status=st,
                        state=nic_status_names(st))
        if r is not None:
            kv.update(pasid=r.pasid, rx_ring=r.rx_ring, tx_ring=r.tx_ring, rx_entries=1 << r.rx_log2,
                      tx_entries=1 << r.tx_log2, rx_head=drv.regs.read32(NicReg.RX_HEAD), rx_tail=drv.rx_tail,
                      tx_head=drv.regs.read32(NicReg.TX_HEAD), tx_tail=drv.tx_tail, posted=len(drv.posted),
                      parked=len(drv.parked), unmapped=sum(not b.mapped for b in r.buffers))
        kv.update(rx_frames=len(self.nic_log), errors=sum(1 for e in self.nic_errors if e["kind"] == "error"))
        return fmt("nic", **kv)

    def _nic_reap(self) -> bool:
        """Reap RX and TX write-backs into the logs (for the IRQ handler and wait predicates)."""
        slot = self.slots["nic"]
        if slot.gone:
            raise DeviceGone(f"{slot.label} {slot.bdf}")
        drv = slot.driver
        if not isinstance(drv, NicDriver):
            return True
        for f in drv.reap_rx(len(self.nic_log)):
            entry = dict(seq=f.seq, slot=f.slot, buffer=f.buffer, status=desc_status_name(f.status), len=f.length,
                         event=event_name(f.event) if f.event else "none")
            if f.status == DescStatus.DONE:  # the bytes are in the buffer
                entry.update(frame_fields(f.data))
            self.nic_log.append(entry)
        drv.reap_tx()
        return True

    def cmd_nic_up(self, args) -> list[str]:
        """Rings and buffers in reserved RAM, mapped (identity) in the NIC's context, RX/TX on."""
        drv = self.need_nic()
        slot = self.slots["nic"]
        with self.lock:
            if drv.is_up:
                raise AgentError(errno.EBUSY, "NIC already up ('dm nic down' first)")
            st = self.smmu.stream(slot.vsid)
            if st.mode != "s1":
                self.write_ste(slot.vsid, "s1")  # the NIC's stream context, like a driver's default domain
            ctx = self.smmu.context(slot.vsid, args.pasid)
            rings = drv.allocate(args.rx_log2, args.tx_log2, args.buffers, args.buf_size, args.pasid)
            for page in drv.dma_pages(rings):
                ctx.table.map(page, page, writable=True)
            drv.start(rings)
            lines = [fmt("nic_up", sid=slot.vsid, pasid=args.pasid, rx_ring=rings.rx_ring, tx_ring=rings.tx_ring,
                         rx_entries=1 << rings.rx_log2, tx_entries=1 << rings.tx_log2, buffers=len(rings.buffers),
                         buf_size=rings.buf_size, mac=drv.mac.hex(":"))]
            for slot_no, buf in sorted(drv.posted.items()):
                lines.append(fmt("rxbuf", slot=slot_no, buffer=buf.index, iova=buf.iova, size=buf.size))
        return lines

    def cmd_nic_down(self, args) -> list[str]:
        drv = self.need_nic()
        with self.lock:
            rings = drv.rings
            drv.stop()
            unmapped = 0
            if rings is not None:
                ctx = self.smmu.context(self.slots["nic"].vsid, rings.pasid)
                for page in drv.dma_pages(rings):
                    if ctx.table.unmap(page) is not None:
                        self.smmu.invalidate_page(self.slots["nic"].vsid, ctx, page)
                        unmapped += 1
                drv.release(rings)  # stopped and out of its page tables: nothing can reach it
        return [fmt("nic_down", unmapped_pages=unmapped, reserved_used=self.alloc.used)]

    def _frames(self, args, drv: NicDriver) -> list[bytes]:
        if args.hex is not None:
            if args.len is not None:
                raise AgentError(errno.EINVAL, "give HEX or --len, not both")
            return [bytes.fromhex(args.hex)] * max(args.count, 1)
        if args.len is None:
            raise AgentError(errno.EINVAL, "give the frame as HEX or --len N [--seed S]")
        return [generated_frame(args.len, args.seed + i, drv.mac) for i in range(max(args.count, 1))]

    def cmd_nic_send(self, args) -> tuple[int, list[str]]:
        """Queue the frames (in ring-sized batches) and wait for each write-back."""
        drv = self.need_nic()
        if not drv.is_up:
            raise AgentError(errno.ENETDOWN, "NIC not up ('dm nic up')")
        frames = self._frames(args, drv)
        out: list[str] = []
        while frames:
            with self.lock:
                room = (1 << drv.rings.tx_log2) - 1 - drv.tx_in_flight()
                batch, frames = frames[:max(room, 1)], frames[max(room, 1):]
                jobs = [(drv.send(f, doorbell=False), f) for f in batch]
                drv.ring_tx()
            ok = self.wait_until(lambda: self._nic_reap() and all(j.done for j, _ in jobs), args.timeout)
            for job, frame in jobs:
                out.append(fmt("tx", slot=job.slot, len=job.length,
                               status=desc_status_name(job.status) if job.done else "PENDING",
                               event=event_name(job.event) if job.event else "none",
                               sha256=frame_fields(frame)["sha256"]))
            if not ok:
                out.append(fmt("timeout", waited=args.timeout, nic_status=drv.status(),
                               state=nic_status_names(drv.status())))
                return RC_TIMEOUT, out
        return 0, out

    def cmd_nic_recv(self, args) -> tuple[int, list[str]]:
        self.need_nic()
        with self.lock:
            self._nic_reap()
        return self._wait_log(self.nic_log, args, lambda e: True, kind="rx", refresh=self._nic_reap)

    def cmd_nic_unmap_rx(self, args) -> list[str]:
        """The driver unmapped the next N posted, unfilled buffers (+ TLBI / ATC_INV each page)."""
        drv = self.need_nic()
        vsid = self.slots["nic"].vsid
        if args.count < 1:
            raise AgentError(errno.EINVAL, "--count must be >= 1")
        with self.lock:
            if drv.rings is None:
                raise AgentError(errno.ENETDOWN, "NIC not up ('dm nic up')")
            ctx = self.smmu.context(vsid, drv.rings.pasid)
            targets = [(s, b) for s, b in drv.unfilled() if b.mapped][:args.count]
            out = []
            for slot_no, buf in targets:
                for page in buf.pages():
                    if ctx.table.unmap(page) is not None:
                        self.smmu.invalidate_page(vsid, ctx, page)
                buf.mapped = False
                out.append(fmt("unmap_rx", slot=slot_no, buffer=buf.index, iova=buf.iova, pages=len(buf.pages()),
                               sid=vsid, pasid=drv.rings.pasid))
        if not out:
            raise AgentError(errno.ENOENT, "no posted, unfilled, mapped RX buffer")
        return out

    def cmd_nic_remap_rx(self, args) -> list[str]:
        """Map every unmapped buffer back (identity) and re-post the parked ones."""
        drv = self.need_nic()
        vsid = self.slots["nic"].vsid
        with self.lock:
            if drv.rings is None:
                raise AgentError(errno.ENETDOWN, "NIC not up ('dm nic up')")
            ctx = self.smmu.context(vsid, drv.rings.pasid)
            out = []
            for buf in drv.rings.buffers:
                if buf.mapped:
                    continue
                for page in buf.pages():
                    ctx.table.map(page, page, writable=True)
                buf.mapped = True
                out.append(fmt("remap_rx", buffer=buf.index, iova=buf.iova, pages=len(buf.pages())))
            for slot_no, buf in drv.repost_parked():
                out.append(fmt("rxbuf", slot=slot_no, buffer=buf.index, iova=buf.iova, size=buf.size))
        return out or [fmt("remap_rx", buffers=0)]

    def cmd_nic_counters(self, args) -> list[str]:
        drv = self.need_nic()
        with self.lock:
            return [fmt("nic_counters", **drv.counters())]

    def cmd_nic_status(self, args) -> list[str]:
        drv = self.need_nic()
        with self.lock:
            lines = [self._nic_line(drv)]
            lines += [fmt("nic_event", **{k: v for k, v in e.items() if k != "kind"}, what=e["kind"])
                      for e in self.nic_errors]
        return lines

    def cmd_nic_restart(self, args) -> list[str]:
        drv = self.need_nic()
        with self.lock:
            drv.restart()
            return [self._nic_line(drv)]
