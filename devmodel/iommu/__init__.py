"""Emulated SMMUv3 (hardware layer).

Public API: :class:`devmodel.iommu.smmu.SMMUv3` (registers + device-facing translate /
ats_translate / page_request), record formats in :mod:`devmodel.iommu.records`, register
offsets in :mod:`devmodel.iommu.registers`. Submodules are named after the spec's
structures and queues (strtab, cd, stage1, tlb, cmdq, eventq, priq, irq).
"""
