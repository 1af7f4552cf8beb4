"""The PCI Express capability (ID 0x10), version 2 (PCIe Base Spec §7.5.3; reference §8.1).

What Linux needs to treat the function as PCIe and to enable PASID: a v2 capability
(0x3C bytes) with the Device/Port Type, DevCap (payload, extended tags, FLR), link
registers for an Endpoint (none for an RC Integrated Endpoint) and DevCap2 with
End-End TLP Prefix Supported (bit 21; ``pci_enable_pasid`` refuses without it).

Behaviour:

* DevCtl.Initiate FLR (bit 15) reads 0; writing 1 on an FLR-capable function performs a
  function reset at the end of the config write (PCIe §6.6.2).
* DevSta error bits are RW1C.
* Link Control survives a function reset (FLR must not disturb the link, §6.6.2).

QEMU rewrites Device/Port Type for vfio devices (Endpoint on the root bus becomes an RC
Integrated Endpoint and loses its link registers), so plain ``ENDPOINT`` is the right
default for a device that may be plugged either way.

Python API: :attr:`PciExpressCapability.port_type`, :attr:`flr_capable`,
:attr:`ee_prefix_supported`, :attr:`max_payload_size` (bytes, as programmed),
:attr:`max_read_request_size`, :attr:`extended_tags`.
"""

from __future__ import annotations

import logging

from devmodel.pci import regs
from devmodel.pci.capability import Capability

log = logging.getLogger(__name__)

#: Spec reset value of DevCtl: Relaxed Ordering and No Snoop enabled, MRRS 512 bytes.
DEVCTL_DEFAULT = regs.PCI_EXP_DEVCTL_RELAX_EN | regs.PCI_EXP_DEVCTL_NOSNOOP_EN | regs.PCI_EXP_DEVCTL_READRQ_512B
#: DevCtl fields software may program on any function.
DEVCTL_WMASK = (regs.PCI_EXP_DEVCTL_CERE | regs.PCI_EXP_DEVCTL_NFERE | regs.PCI_EXP_DEVCTL_FERE
                | regs.PCI_EXP_DEVCTL_URRE | regs.PCI_EXP_DEVCTL_RELAX_EN | regs.PCI_EXP_DEVCTL_PAYLOAD_MASK
                | regs.PCI_EXP_DEVCTL_NOSNOOP_EN | regs.PCI_EXP_DEVCTL_READRQ_MASK)
LNKCTL_WMASK = (regs.PCI_EXP_LNKCTL_ASPMC | regs.PCI_EXP_LNKCTL_RCB | regs.PCI_EXP_LNKCTL_CCC
                | regs.PCI_EXP_LNKCTL_ES | regs.PCI_EXP_LNKCTL_HAWD)
PCIE_CAP_VERSION = 2
PAYLOAD_SHIFT = 5  # DevCtl Max_Payload_Size [7:5]
READRQ_SHIFT = 12  # DevCtl Max_Read_Request_Size [14:12]


class PciExpressCapability(Capability):
    """PCI Express capability of an Endpoint or RC Integrated Endpoint."""

    cap_id = regs.CapId.EXP
    size = regs.PCI_CAP_EXP_SIZEOF_V2

    def __init__(self, port_type: regs.PcieType = regs.PcieType.ENDPOINT, flr: bool = True,
                 max_payload: int = 1, extended_tags: bool = True, link_speed: int = 1,
                 link_width: int = 1, ee_prefix: bool = True, max_ee_prefixes: int = 1,
                 interrupt_message: int = 0) -> None:
        """``max_payload``: DevCap encoding (128 << n bytes); ``link_speed``: 1 = 2.5 GT/s,
        2 = 5, 3 = 8, 4 = 16 GT/s; ``max_ee_prefixes``: 1..4 (4 is encoded as 00b)."""
        super().__init__()
        if not 0 <= max_payload <= 5 or not 1 <= link_speed <= 6 or not 1 <= link_width <= 32:
            raise ValueError("bad PCIe capability parameters")
        if not 1 <= max_ee_prefixes <= 4:
            raise ValueError("max_ee_prefixes must be 1..4")
        self.port_type = regs.PcieType(port_type)
        self.flr_capable = flr
        self.max_payload_supported = max_payload
        self.extended_tags_supported = extended_tags
        self.link_speed = link_speed
        self.link_width = link_width
        self.ee_prefix_supported = ee_prefix
        self.max_ee_prefixes = max_ee_prefixes
        self.interrupt_message = interrupt_message

    @property
    def has_link(self) -> bool:
        """RC Integrated Endpoints have no link registers (reference §8.1)."""
        return self.port_type != regs.PcieType.RC_END

    def install(self) -> None:
        flags = (PCIE_CAP_VERSION | (self.port_type << regs.PCI_EXP_FLAGS_TYPE_SHIFT)
                 | (self.interrupt_message << regs.PCI_EXP_FLAGS_IRQ_SHIFT))
        self.set(regs.PCI_EXP_FLAGS, 2, flags)
        devcap = self.max_payload_supported | regs.PCI_EXP_DEVCAP_RBER
        devctl_wmask = DEVCTL_WMASK
        if self.extended_tags_supported:
            devcap |= regs.PCI_EXP_DEVCAP_EXT_TAG
            devctl_wmask |= regs.PCI_EXP_DEVCTL_EXT_TAG
        if self.flr_capable:
            devcap |= regs.PCI_EXP_DEVCAP_FLR
            devctl_wmask |= regs.PCI_EXP_DEVCTL_BCR_FLR
        self.set(regs.PCI_EXP_DEVCAP, 4, devcap)
        self.set(regs.PCI_EXP_DEVCTL, 2, DEVCTL_DEFAULT)
        self.set_masks(regs.PCI_EXP_DEVCTL, 2, wmask=devctl_wmask)
        self.set_masks(regs.PCI_EXP_DEVSTA, 2, w1c=regs.PCI_EXP_DEVSTA_W1C)
        if self.has_link:
            self._install_link()
        devcap2 = regs.PCI_EXP_DEVCAP2_COMP_TMOUT_DIS
        devctl2_wmask = regs.PCI_EXP_DEVCTL2_COMP_TMOUT_DIS
        if self.ee_prefix_supported:
            encoded = self.max_ee_prefixes % 4  # 00b means 4
            devcap2 |= regs.PCI_EXP_DEVCAP2_EE_PREFIX | (encoded << regs.PCI_EXP_DEVCAP2_EE_PREFIX_MAX_SHIFT)
            devctl2_wmask |= regs.PCI_EXP_DEVCTL2_EETLP_BLOCK
        self.set(regs.PCI_EXP_DEVCAP2, 4, devcap2)
        self.set_masks(regs.PCI_EXP_DEVCTL2, 2, wmask=devctl2_wmask)

    def _install_link(self) -> None:
        lnkcap = self.link_speed | (self.link_width << regs.PCI_EXP_LNKCAP_MLW_SHIFT)
        self.set(regs.PCI_EXP_LNKCAP, 4, lnkcap)
        self.set_masks(regs.PCI_EXP_LNKCTL, 2, wmask=LNKCTL_WMASK, preserve=LNKCTL_WMASK)
        self.set(regs.PCI_EXP_LNKSTA, 2, self.link_speed | (self.link_width << regs.PCI_EXP_LNKSTA_NLW_SHIFT))
        speeds = ((1 << self.link_speed) - 1) << regs.PCI_EXP_LNKCAP2_SLS_SHIFT
        self.set(regs.PCI_EXP_LNKCAP2, 4, speeds)
        self.set(regs.PCI_EXP_LNKCTL2, 2, self.link_speed)
        self.set_masks(regs.PCI_EXP_LNKCTL2, 2, wmask=regs.PCI_EXP_LNKCTL2_TLS_MASK,
                       preserve=regs.PCI_EXP_LNKCTL2_TLS_MASK)

    def config_written(self, old: bytes) -> None:
        devctl = self.get(regs.PCI_EXP_DEVCTL, 2)
        if devctl & regs.PCI_EXP_DEVCTL_BCR_FLR:
            # Initiate FLR always reads 0 (PCIe §7.5.3.4).
            self.set(regs.PCI_EXP_DEVCTL, 2, devctl & ~regs.PCI_EXP_DEVCTL_BCR_FLR)
            log.info("FLR initiated through DevCtl")
            assert self.function is not None
            self.function.request_flr()

    # --- Python API ------------------------------------------------------------------------
    @property
    def devctl(self) -> int:
        return self.get(regs.PCI_EXP_DEVCTL, 2)

    @property
    def max_payload_size(self) -> int:
        """Max_Payload_Size software programmed, in bytes."""
        return 128 << ((self.devctl & regs.PCI_EXP_DEVCTL_PAYLOAD_MASK) >> PAYLOAD_SHIFT)

    @property
    def max_read_request_size(self) -> int:
        """Max_Read_Request_Size software programmed, in bytes."""
        return 128 << ((self.devctl & regs.PCI_EXP_DEVCTL_READRQ_MASK) >> READRQ_SHIFT)

    @property
    def extended_tags(self) -> bool:
        return bool(self.devctl & regs.PCI_EXP_DEVCTL_EXT_TAG)

    def report_error(self, status_bit: int) -> None:
        """Hardware sets a DevSta error bit (CED/NFED/FED/URD), software clears it (RW1C)."""
        self.config.set_bits(self.offset + regs.PCI_EXP_DEVSTA, 2, status_bit & regs.PCI_EXP_DEVSTA_W1C)
