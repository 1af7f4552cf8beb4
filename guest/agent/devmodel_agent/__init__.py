"""devmodel guest agent: a Linux-like SMMUv3, DMA-engine and NIC driver in userspace, driven by ``dm``.

Layout (why: the driver logic must run unchanged on the host against the hardware models):

* :mod:`.hw` — the abstract ``Regs`` / ``Memory`` / ``PciConfig`` / ``IrqLine`` interfaces
  and the reserved-RAM allocator;
* :mod:`.pgtable`, :mod:`.smmu`, :mod:`.pcicaps`, :mod:`.dmaeng`, :mod:`.nic` — driver logic over them
  (endpoints are hot-removable: :class:`.hw.Endpoint`, :class:`.hw.GuardedRegs`);
* :mod:`.agent` — the daemon state (logs, policies, interrupt threads, subcommands);
* :mod:`.server` — the UNIX-socket protocol; :mod:`.cli` — the ``dm`` command;
* :mod:`.guestio` — guest glue (sysfs, ``/dev/mem``, BAR mmap, devmodel_uirq);
* :mod:`.hostsim` — host-only backends (emulated SMMUv3, DMA engine core, NIC model), never shipped.
"""

DEFAULT_SOCKET = "/run/dm.sock"
