"""Typed wrappers over the byte-level ioctl: what the VMM layer uses.

Every wrapper builds the real uAPI struct, stages any pointed-to array in the context's
scratch window of user memory, and goes through ``ioctl`` so the same validation runs as
for raw bytes. Errors are OSError with the kernel's errno; HWPT_INVALIDATE failures also
carry ``entry_num`` (entries handled before the failing one).
"""

from __future__ import annotations

import struct

from devmodel.iommufd import uapi
from devmodel.iommufd.uapi import TestOp, new, pack


class IommufdApi:
    """Mixin for :class:`devmodel.iommufd.main.IommufdContext`."""

    def ioctl(self, request: int, buf: bytearray | None) -> int:  # provided by the context
        raise NotImplementedError

    def _call(self, request: int, obj) -> object:  # noqa: ANN001
        buf = bytearray(pack(obj))
        self.ioctl(request, buf)
        return uapi.unpack(uapi.ffi.typeof(obj).item.cname.removeprefix("struct "), buf)

    def _stage(self, data: bytes) -> int:
        """Put ``data`` in the scratch window; its user address (0 for no data)."""
        if not data:
            return 0
        scratch = self.user.scratch  # type: ignore[attr-defined]
        if len(data) > scratch.size:
            raise OSError(12, "argument larger than the scratch window")
        scratch.write(scratch.base, data)
        return scratch.base

    # --- IOAS ---------------------------------------------------------------------
    def ioas_alloc(self) -> int:
        return self._call(uapi.IOMMU_IOAS_ALLOC, new("iommu_ioas_alloc")).out_ioas_id

    def ioas_map(self, ioas_id: int, user_va: int, length: int, iova: int | None = None,
                 prot: int = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE) -> int:
        """Map ``[user_va, +length)`` of user memory; returns the IOVA (fixed if given)."""
        flags = prot | (uapi.IOMMU_IOAS_MAP_FIXED_IOVA if iova is not None else 0)
        cmd = new("iommu_ioas_map", flags=flags, ioas_id=ioas_id, user_va=user_va,
                  length=length, iova=iova or 0)
        return self._call(uapi.IOMMU_IOAS_MAP, cmd).iova

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        cmd = new("iommu_ioas_unmap", ioas_id=ioas_id, iova=iova, length=length)
        return self._call(uapi.IOMMU_IOAS_UNMAP, cmd).length

    # --- HWPT ---------------------------------------------------------------------
    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0, data_type: int = 0,
                   data: bytes = b"", fault_id: int | None = None) -> int:
        """IOMMU_HWPT_ALLOC; ``fault_id`` sets IOMMU_HWPT_FAULT_ID_VALID."""
        with self.lock:  # type: ignore[attr-defined]
            if fault_id is not None:
                flags |= uapi.IOMMU_HWPT_FAULT_ID_VALID
            cmd = new("iommu_hwpt_alloc", flags=flags, dev_id=dev_id, pt_id=pt_id,
                      data_type=data_type, data_len=len(data), data_uptr=self._stage(data),
                      fault_id=fault_id or 0)
            return self._call(uapi.IOMMU_HWPT_ALLOC, cmd).out_hwpt_id

    def hwpt_invalidate(self, hwpt_id: int, data_type: int, entries: list[bytes],
                        entry_len: int | None = None) -> int:
        """IOMMU_HWPT_INVALIDATE on a nested HWPT or a vIOMMU; returns entries handled.
        On failure the OSError has ``entry_num``."""
        with self.lock:  # type: ignore[attr-defined]
            entry_len = entry_len if entry_len is not None else (len(entries[0]) if entries else 0)
            blob = b"".join(e.ljust(entry_len, b"\0")[:entry_len] for e in entries)
            cmd = new("iommu_hwpt_invalidate", hwpt_id=hwpt_id, data_uptr=self._stage(blob),
                      data_type=data_type, entry_len=entry_len, entry_num=len(entries))
            buf = bytearray(pack(cmd))
            try:
                self.ioctl(uapi.IOMMU_HWPT_INVALIDATE, buf)
            except OSError as exc:
                exc.entry_num = uapi.unpack("iommu_hwpt_invalidate", buf).entry_num  # type: ignore[attr-defined]
                raise
            return uapi.unpack("iommu_hwpt_invalidate", buf).entry_num

    # --- vIOMMU / vDEVICE -----------------------------------------------------------
    def viommu_alloc(self, dev_id: int, hwpt_id: int, vtype: int, data: bytes = b"") -> int:
        with self.lock:  # type: ignore[attr-defined]
            cmd = new("iommu_viommu_alloc", type=vtype, dev_id=dev_id, hwpt_id=hwpt_id,
                      data_len=len(data), data_uptr=self._stage(data))
            return self._call(uapi.IOMMU_VIOMMU_ALLOC, cmd).out_viommu_id

    def vdevice_alloc(self, viommu_id: int, dev_id: int, virt_id: int) -> int:
        cmd = new("iommu_vdevice_alloc", viommu_id=viommu_id, dev_id=dev_id, virt_id=virt_id)
        return self._call(uapi.IOMMU_VDEVICE_ALLOC, cmd).out_vdevice_id

    # --- queues -------------------------------------------------------------------
    def fault_alloc(self) -> tuple[int, int]:
        """IOMMU_FAULT_QUEUE_ALLOC -> (fault_id, fd)."""
        out = self._call(uapi.IOMMU_FAULT_QUEUE_ALLOC, new("iommu_fault_alloc"))
        return out.out_fault_id, out.out_fault_fd

    def veventq_alloc(self, viommu_id: int, qtype: int, depth: int) -> tuple[int, int]:
        """IOMMU_VEVENTQ_ALLOC -> (veventq_id, fd)."""
        cmd = new("iommu_veventq_alloc", viommu_id=viommu_id, type=qtype, veventq_depth=depth)
        out = self._call(uapi.IOMMU_VEVENTQ_ALLOC, cmd)
        return out.out_veventq_id, out.out_veventq_fd

    def page_response(self, fault_fd: int, cookie: int, code: int) -> int:
        """Write one ``struct iommu_hwpt_page_response`` to a FAULT fd."""
        return self.write(fault_fd, struct.pack("<II", cookie, code))  # type: ignore[attr-defined]

    # --- misc ---------------------------------------------------------------------
    def destroy(self, obj_id: int) -> None:
        self._call(uapi.IOMMU_DESTROY, new("iommu_destroy", id=obj_id))

    def get_hw_info(self, dev_id: int, data_len: int = 256) -> tuple[int, bytes]:
        """IOMMU_GET_HW_INFO -> (out_data_type, driver data)."""
        with self.lock:  # type: ignore[attr-defined]
            base = self._stage(bytes(data_len))
            cmd = new("iommu_hw_info", dev_id=dev_id, data_len=data_len, data_uptr=base)
            out = self._call(uapi.IOMMU_GET_HW_INFO, cmd)
            return out.out_data_type, self.read_user(base, out.data_len)  # type: ignore[attr-defined]

    def mock_domain(self, pt_id: int, dev_flags: int = 0) -> tuple[int, int, int]:
        """Selftest MOCK_DOMAIN(_FLAGS) -> (stdev_id, hwpt_id, idev_id)."""
        op = TestOp.MOCK_DOMAIN_FLAGS if dev_flags else TestOp.MOCK_DOMAIN
        cmd = new("iommu_test_cmd", op=op, id=pt_id)
        cmd.mock_domain_flags.dev_flags = dev_flags
        out = self._call(uapi.IOMMU_TEST_CMD, cmd)
        return out.mock_domain.out_stdev_id, out.mock_domain.out_hwpt_id, out.mock_domain.out_idev_id

    def mock_domain_replace(self, stdev_id: int, pt_id: int) -> int:
        cmd = new("iommu_test_cmd", op=TestOp.MOCK_DOMAIN_REPLACE, id=stdev_id)
        cmd.mock_domain_replace.pt_id = pt_id
        return self._call(uapi.IOMMU_TEST_CMD, cmd).mock_domain_replace.pt_id

    def trigger_iopf(self, dev_id: int, pasid: int, grpid: int, perm: int, addr: int) -> None:
        cmd = new("iommu_test_cmd", op=TestOp.TRIGGER_IOPF)
        t = cmd.trigger_iopf
        t.dev_id, t.pasid, t.grpid, t.perm, t.addr = dev_id, pasid, grpid, perm, addr
        self._call(uapi.IOMMU_TEST_CMD, cmd)

    def trigger_vevent(self, dev_id: int) -> None:
        cmd = new("iommu_test_cmd", op=TestOp.TRIGGER_VEVENT)
        cmd.trigger_vevent.dev_id = dev_id
        self._call(uapi.IOMMU_TEST_CMD, cmd)
