"""Physical STEs the host writes (reference smmuv3-pcie.md section 6.2), built from the
shared :data:`devmodel.iommu.records.STE` layout.

* blocked: V=1, Config=abort (Linux's blocking domain; traffic aborts without an event);
* paging HWPT: Config=S2 translate (stage 1 bypassed), stage 2 from the IOAS;
* nested HWPT: Config=nested; the stage-1 fields (S1ContextPtr, S1Fmt, S1CDMax, S1DSS and
  the CD-fetch attributes) come from the guest STE in the HWPT data, stage 2 from the
  vIOMMU's parent IOAS, MEV=1 (event merging allowed, as Linux sets for nested STEs).
  A guest STE that is not valid or says abort gives the blocked STE; guest bypass gives
  the stage-2-only STE (iommufd.md section 3.7, Linux ``arm_smmu_make_nested_domain_ste``).

How stage 2 is expressed: the STE carries a real, legal stage-2 configuration (4 KiB
granule, AArch64, 48-bit IPA: S2T0SZ=16 and S2SL0=2 start at level 0, S2R=1 so stage-2
faults are recorded) and its VMID, but S2TTB is 0: no stage-2 page table exists in
memory. The emulated SMMU's stage-2 hook for that VMID (``SMMUv3.set_stage2``) stands in
for the table walk and answers IPA -> user VA from ``Ioas.translate`` (see
:mod:`devmodel.host.stage2`).
"""

from __future__ import annotations

from devmodel.iommu import records as rec
from devmodel.iommu.records import SteConfig

S2T0SZ_48BIT = 16
S2SL0_LEVEL0 = 2
S2TG_4K = 0
SHCFG_INCOMING = 1
S1CSH_ISH = 3
S1C_WBRA = 1

#: Guest STE fields carried into the physical nested STE.
GUEST_S1_FIELDS = ("S1Fmt", "S1ContextPtr", "S1CDMax", "S1DSS", "S1CIR", "S1COR", "S1CSH")


def blocked_ste() -> bytes:
    """V=1, Config=abort: transactions abort silently (no event)."""
    return rec.STE.encode(V=1, Config=SteConfig.ABORT, SHCFG=SHCFG_INCOMING)


def stage2_fields(vmid: int, s2ps: int) -> dict[str, int]:
    """A legal stage-2 configuration whose walk is replaced by the VMID's stage-2 hook."""
    return dict(S2VMID=vmid, S2T0SZ=S2T0SZ_48BIT, S2SL0=S2SL0_LEVEL0, S2TG=S2TG_4K, S2PS=s2ps,
                S2AA64=1, S2R=1, S2TTB=0)


def s2_ste(vmid: int, s2ps: int, eats: int = rec.EATS_OFF) -> bytes:
    """A paging HWPT: stage 1 bypassed, stage 2 = the IOAS."""
    return rec.STE.encode(dict(V=1, Config=SteConfig.S2_TRANS, SHCFG=SHCFG_INCOMING, EATS=eats,
                               **stage2_fields(vmid, s2ps)))


def guest_ste_fields(ste0: int, ste1: int) -> rec.Fields:
    """Decode the two guest STE doublewords of ``struct iommu_hwpt_arm_smmuv3``."""
    return rec.STE.unpack(ste0 | ste1 << 64)


def nested_ste(ste0: int, ste1: int, vmid: int, s2ps: int, eats: int = rec.EATS_OFF,
               allow_s1stalld: bool = False) -> bytes:
    """The physical STE for a nested HWPT (guest stage 1 over the host's stage 2)."""
    guest = guest_ste_fields(ste0, ste1)
    if not guest.V or not guest.Config & 0b100:
        return blocked_ste()
    if guest.Config == SteConfig.BYPASS:
        return s2_ste(vmid, s2ps, eats)
    fields = {name: guest[name] for name in GUEST_S1_FIELDS}
    if allow_s1stalld:
        fields["S1STALLD"] = guest.S1STALLD
    fields.update(V=1, Config=SteConfig.NESTED, MEV=1, SHCFG=SHCFG_INCOMING, EATS=eats,
                  **stage2_fields(vmid, s2ps))
    return rec.STE.encode(fields)


def guest_s1_ste(cd_ptr: int, s1cdmax: int = 0, s1fmt: int = rec.S1FMT_LINEAR,
                 s1dss: int = rec.S1DSS_SSID0) -> bytes:
    """The 16 bytes a guest (or the VMM on its behalf) passes as nested HWPT data: only
    the fields a vSTE may set (V, Config=S1, S1Fmt, S1ContextPtr, S1CDMax, S1DSS, S1C*)."""
    raw = rec.STE.encode(V=1, Config=SteConfig.S1_TRANS, S1Fmt=s1fmt, S1ContextPtr=cd_ptr,
                         S1CDMax=s1cdmax, S1DSS=s1dss, S1CIR=S1C_WBRA, S1COR=S1C_WBRA,
                         S1CSH=S1CSH_ISH)
    return raw[:16]
