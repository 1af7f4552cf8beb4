"""The iommufd uAPI: request numbers, constants and struct layouts, declared once.

Layouts are cffi declarations written to match ``include/uapi/linux/iommufd.h`` field by
field (``__aligned_u64`` is an 8-byte aligned ``uint64_t`` on every supported host, so
cffi's natural layout equals the kernel's). ``tests/iommufd/test_iommufd_uapi_layout.py``
compiles a C program against the real header and fails if any struct here drifts.

The selftest structs (``iommu_test_cmd`` and the mock driver's data) come from the kernel's
``iommufd_test.h``, which is not installed by linux-libc-dev; they are declared here too.
"""

from __future__ import annotations

import enum

import cffi

ffi = cffi.FFI()

#: Every uAPI struct the model reads or writes (checked against the real header).
UAPI_CDEF = """
struct iommu_destroy { uint32_t size; uint32_t id; };
struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; };
struct iommu_iova_range { uint64_t start; uint64_t last; };
struct iommu_ioas_iova_ranges {
    uint32_t size; uint32_t ioas_id; uint32_t num_iovas; uint32_t __reserved;
    uint64_t allowed_iovas; uint64_t out_iova_alignment;
};
struct iommu_ioas_allow_iovas {
    uint32_t size; uint32_t ioas_id; uint32_t num_iovas; uint32_t __reserved;
    uint64_t allowed_iovas;
};
struct iommu_ioas_map {
    uint32_t size; uint32_t flags; uint32_t ioas_id; uint32_t __reserved;
    uint64_t user_va; uint64_t length; uint64_t iova;
};
struct iommu_ioas_map_file {
    uint32_t size; uint32_t flags; uint32_t ioas_id; int32_t fd;
    uint64_t start; uint64_t length; uint64_t iova;
};
struct iommu_ioas_copy {
    uint32_t size; uint32_t flags; uint32_t dst_ioas_id; uint32_t src_ioas_id;
    uint64_t length; uint64_t dst_iova; uint64_t src_iova;
};
struct iommu_ioas_unmap { uint32_t size; uint32_t ioas_id; uint64_t iova; uint64_t length; };
struct iommu_option {
    uint32_t size; uint32_t option_id; uint16_t op; uint16_t __reserved; uint32_t object_id;
    uint64_t val64;
};
struct iommu_vfio_ioas { uint32_t size; uint32_t ioas_id; uint16_t op; uint16_t __reserved; };
struct iommu_hwpt_vtd_s1 { uint64_t flags; uint64_t pgtbl_addr; uint32_t addr_width; uint32_t __reserved; };
struct iommu_hwpt_arm_smmuv3 { uint64_t ste[2]; };
struct iommu_hwpt_alloc {
    uint32_t size; uint32_t flags; uint32_t dev_id; uint32_t pt_id; uint32_t out_hwpt_id;
    uint32_t __reserved; uint32_t data_type; uint32_t data_len; uint64_t data_uptr;
    uint32_t fault_id; uint32_t __reserved2;
};
struct iommu_hw_info_arm_smmuv3 {
    uint32_t flags; uint32_t __reserved; uint32_t idr[6]; uint32_t iidr; uint32_t aidr;
};
struct iommu_hw_info {
    uint32_t size; uint32_t flags; uint32_t dev_id; uint32_t data_len; uint64_t data_uptr;
    uint32_t out_data_type; uint8_t out_max_pasid_log2; uint8_t __reserved[3];
    uint64_t out_capabilities;
};
struct iommu_hwpt_set_dirty_tracking { uint32_t size; uint32_t flags; uint32_t hwpt_id; uint32_t __reserved; };
struct iommu_hwpt_get_dirty_bitmap {
    uint32_t size; uint32_t hwpt_id; uint32_t flags; uint32_t __reserved;
    uint64_t iova; uint64_t length; uint64_t page_size; uint64_t data;
};
struct iommu_hwpt_vtd_s1_invalidate { uint64_t addr; uint64_t npages; uint32_t flags; uint32_t __reserved; };
struct iommu_viommu_arm_smmuv3_invalidate { uint64_t cmd[2]; };
struct iommu_hwpt_invalidate {
    uint32_t size; uint32_t hwpt_id; uint64_t data_uptr; uint32_t data_type;
    uint32_t entry_len; uint32_t entry_num; uint32_t __reserved;
};
struct iommu_hwpt_pgfault {
    uint32_t flags; uint32_t dev_id; uint32_t pasid; uint32_t grpid; uint32_t perm;
    uint32_t __reserved; uint64_t addr; uint32_t length; uint32_t cookie;
};
struct iommu_hwpt_page_response { uint32_t cookie; uint32_t code; };
struct iommu_fault_alloc { uint32_t size; uint32_t flags; uint32_t out_fault_id; uint32_t out_fault_fd; };
struct iommu_viommu_alloc {
    uint32_t size; uint32_t flags; uint32_t type; uint32_t dev_id; uint32_t hwpt_id;
    uint32_t out_viommu_id; uint32_t data_len; uint32_t __reserved; uint64_t data_uptr;
};
struct iommu_vdevice_alloc {
    uint32_t size; uint32_t viommu_id; uint32_t dev_id; uint32_t out_vdevice_id; uint64_t virt_id;
};
struct iommu_ioas_change_process { uint32_t size; uint32_t __reserved; };
struct iommufd_vevent_header { uint32_t flags; uint32_t sequence; };
struct iommu_vevent_arm_smmuv3 { uint64_t evt[4]; };
struct iommu_veventq_alloc {
    uint32_t size; uint32_t flags; uint32_t viommu_id; uint32_t type; uint32_t veventq_depth;
    uint32_t out_veventq_id; uint32_t out_veventq_fd; uint32_t __reserved;
};
struct iommu_hw_queue_alloc {
    uint32_t size; uint32_t flags; uint32_t viommu_id; uint32_t type; uint32_t index;
    uint32_t out_hw_queue_id; uint64_t nesting_parent_iova; uint64_t length;
};
"""

#: The mock driver's structs (kernel iommufd_test.h; not shipped in linux-libc-dev).
SELFTEST_CDEF = """
struct iommu_test_cmd {
    uint32_t size; uint32_t op; uint32_t id; uint32_t __reserved;
    union {
        struct { uint64_t start; uint64_t length; } add_reserved;
        struct { uint32_t out_stdev_id; uint32_t out_hwpt_id; uint32_t out_idev_id; } mock_domain;
        struct { uint32_t out_stdev_id; uint32_t out_hwpt_id; uint32_t out_idev_id; uint32_t dev_flags; } mock_domain_flags;
        struct { uint32_t pt_id; } mock_domain_replace;
        struct { uint32_t flags; uint64_t iova; uint64_t length; uint64_t page_size; uint64_t uptr; uint64_t out_nr_dirty; } dirty;
        struct { uint32_t id; uint32_t iotlb; } check_iotlb;
        struct { uint32_t dev_id; uint32_t pasid; uint32_t grpid; uint32_t perm; uint64_t addr; } trigger_iopf;
        struct { uint32_t id; uint32_t cache; } check_dev_cache;
        struct { uint32_t dev_id; } trigger_vevent;
        struct { uint32_t pasid; uint32_t pt_id; } pasid_attach;
        struct { uint32_t pasid; uint32_t pt_id; } pasid_replace;
        struct { uint32_t pasid; } pasid_detach;
        struct { uint32_t pasid; uint32_t hwpt_id; } pasid_check;
    };
    uint32_t last;
};
struct iommu_hwpt_selftest { uint32_t iotlb; };
struct iommu_hwpt_invalidate_selftest { uint32_t flags; uint32_t iotlb_id; };
struct iommu_viommu_selftest { uint32_t in_data; uint32_t out_data; uint64_t out_mmap_offset; uint64_t out_mmap_length; };
struct iommu_viommu_invalidate_selftest { uint32_t flags; uint32_t vdev_id; uint32_t cache_id; };
struct iommu_viommu_event_selftest { uint32_t virt_id; };
"""

ffi.cdef(UAPI_CDEF)
ffi.cdef(SELFTEST_CDEF)

#: Struct names checked against the kernel header (every struct in UAPI_CDEF).
UAPI_STRUCTS = [
    "iommu_destroy", "iommu_ioas_alloc", "iommu_iova_range", "iommu_ioas_iova_ranges",
    "iommu_ioas_allow_iovas", "iommu_ioas_map", "iommu_ioas_map_file", "iommu_ioas_copy",
    "iommu_ioas_unmap", "iommu_option", "iommu_vfio_ioas", "iommu_hwpt_vtd_s1",
    "iommu_hwpt_arm_smmuv3", "iommu_hwpt_alloc", "iommu_hw_info_arm_smmuv3", "iommu_hw_info",
    "iommu_hwpt_set_dirty_tracking", "iommu_hwpt_get_dirty_bitmap",
    "iommu_hwpt_vtd_s1_invalidate", "iommu_viommu_arm_smmuv3_invalidate",
    "iommu_hwpt_invalidate", "iommu_hwpt_pgfault", "iommu_hwpt_page_response",
    "iommu_fault_alloc", "iommu_viommu_alloc", "iommu_vdevice_alloc",
    "iommu_ioas_change_process", "iommufd_vevent_header", "iommu_vevent_arm_smmuv3",
    "iommu_veventq_alloc", "iommu_hw_queue_alloc",
]


def sizeof(struct: str) -> int:
    """Size in bytes of ``struct <name>``."""
    return ffi.sizeof(f"struct {struct}")


def end_of(struct: str, field: str) -> int:
    """Offset just past ``field`` (the kernel's ``offsetofend``), used for min sizes."""
    f = dict(ffi.typeof(f"struct {struct}").fields)[field]
    return f.offset + ffi.sizeof(f.type)


def unpack(struct: str, data: bytes | bytearray | memoryview):
    """A cffi struct object holding a copy of ``data`` (zero-extended to the struct size)."""
    size = sizeof(struct)
    obj = ffi.new(f"struct {struct} *")
    raw = bytes(data[:size])
    ffi.memmove(obj, raw, len(raw))
    return obj


def pack(obj) -> bytes:
    """The bytes of a cffi struct pointer."""
    return bytes(ffi.buffer(obj))


def new(struct: str, **fields: int):
    """A zeroed struct with ``fields`` set; ``size`` defaults to the struct size if present."""
    obj = ffi.new(f"struct {struct} *")
    names = [n for n, _ in ffi.typeof(f"struct {struct}").fields]
    if "size" in names and "size" not in fields:
        obj.size = sizeof(struct)
    for k, v in fields.items():
        setattr(obj, k, v)
    return obj


# --- ioctl numbers (section 1.1): _IO(';', nr) has no direction or size bits -------------
IOMMUFD_TYPE = ord(";")
IOMMUFD_CMD_BASE = 0x80


def _IO(type_: int, nr: int) -> int:
    return (type_ << 8) | nr


class Cmd(enum.IntEnum):
    """Command numbers (``nr``) of ``enum { IOMMUFD_CMD_* }``."""
    DESTROY = 0x80
    IOAS_ALLOC = 0x81
    IOAS_ALLOW_IOVAS = 0x82
    IOAS_COPY = 0x83
    IOAS_IOVA_RANGES = 0x84
    IOAS_MAP = 0x85
    IOAS_UNMAP = 0x86
    OPTION = 0x87
    VFIO_IOAS = 0x88
    HWPT_ALLOC = 0x89
    GET_HW_INFO = 0x8A
    HWPT_SET_DIRTY_TRACKING = 0x8B
    HWPT_GET_DIRTY_BITMAP = 0x8C
    HWPT_INVALIDATE = 0x8D
    FAULT_QUEUE_ALLOC = 0x8E
    IOAS_MAP_FILE = 0x8F
    VIOMMU_ALLOC = 0x90
    VDEVICE_ALLOC = 0x91
    IOAS_CHANGE_PROCESS = 0x92
    VEVENTQ_ALLOC = 0x93
    HW_QUEUE_ALLOC = 0x94
    TEST = IOMMUFD_CMD_BASE + 32


IOMMU_DESTROY = _IO(IOMMUFD_TYPE, Cmd.DESTROY)
IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, Cmd.IOAS_ALLOC)
IOMMU_IOAS_ALLOW_IOVAS = _IO(IOMMUFD_TYPE, Cmd.IOAS_ALLOW_IOVAS)
IOMMU_IOAS_COPY = _IO(IOMMUFD_TYPE, Cmd.IOAS_COPY)
IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, Cmd.IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = _IO(IOMMUFD_TYPE, Cmd.IOAS_MAP)
IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, Cmd.IOAS_UNMAP)
IOMMU_OPTION = _IO(IOMMUFD_TYPE, Cmd.OPTION)
IOMMU_VFIO_IOAS = _IO(IOMMUFD_TYPE, Cmd.VFIO_IOAS)
IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, Cmd.HWPT_ALLOC)
IOMMU_GET_HW_INFO = _IO(IOMMUFD_TYPE, Cmd.GET_HW_INFO)
IOMMU_HWPT_SET_DIRTY_TRACKING = _IO(IOMMUFD_TYPE, Cmd.HWPT_SET_DIRTY_TRACKING)
IOMMU_HWPT_GET_DIRTY_BITMAP = _IO(IOMMUFD_TYPE, Cmd.HWPT_GET_DIRTY_BITMAP)
IOMMU_HWPT_INVALIDATE = _IO(IOMMUFD_TYPE, Cmd.HWPT_INVALIDATE)
IOMMU_FAULT_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, Cmd.FAULT_QUEUE_ALLOC)
IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, Cmd.IOAS_MAP_FILE)
IOMMU_VIOMMU_ALLOC = _IO(IOMMUFD_TYPE, Cmd.VIOMMU_ALLOC)
IOMMU_VDEVICE_ALLOC = _IO(IOMMUFD_TYPE, Cmd.VDEVICE_ALLOC)
IOMMU_IOAS_CHANGE_PROCESS = _IO(IOMMUFD_TYPE, Cmd.IOAS_CHANGE_PROCESS)
IOMMU_VEVENTQ_ALLOC = _IO(IOMMUFD_TYPE, Cmd.VEVENTQ_ALLOC)
IOMMU_HW_QUEUE_ALLOC = _IO(IOMMUFD_TYPE, Cmd.HW_QUEUE_ALLOC)
IOMMU_TEST_CMD = _IO(IOMMUFD_TYPE, Cmd.TEST)

# --- enums and flags ------------------------------------------------------------------
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1
IOMMU_HWPT_DATA_ARM_SMMUV3 = 2
IOMMU_HWPT_DATA_AMD_GUEST = 3

IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0
IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1

IOMMU_PGFAULT_FLAGS_PASID_VALID = 1 << 0
IOMMU_PGFAULT_FLAGS_LAST_PAGE = 1 << 1
IOMMU_PGFAULT_PERM_READ = 1 << 0
IOMMU_PGFAULT_PERM_WRITE = 1 << 1
IOMMU_PGFAULT_PERM_EXEC = 1 << 2
IOMMU_PGFAULT_PERM_PRIV = 1 << 3

IOMMUFD_PAGE_RESP_SUCCESS = 0
IOMMUFD_PAGE_RESP_INVALID = 1

IOMMU_VIOMMU_TYPE_DEFAULT = 0
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1
IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV = 2

IOMMU_VEVENTQ_FLAG_LOST_EVENTS = 1 << 0
IOMMU_VEVENTQ_TYPE_DEFAULT = 0
IOMMU_VEVENTQ_TYPE_ARM_SMMUV3 = 1
IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV = 2

#: Kernel-internal page-response codes (include/linux/iommu.h); SUCCESS/INVALID equal uAPI.
IOMMU_PAGE_RESP_SUCCESS = 0
IOMMU_PAGE_RESP_INVALID = 1
IOMMU_PAGE_RESP_FAILURE = 2
#: Kernel-internal page-request flag (VT-d); copied to user space as-is.
IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID = 1 << 2

IOMMU_NO_PASID = 0
INT_MAX = 0x7FFFFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF

# --- selftest (mock driver) constants: iommufd_test.h ---------------------------------
class TestOp(enum.IntEnum):
    """``IOMMU_TEST_OP_*``."""
    ADD_RESERVED = 1
    MOCK_DOMAIN = 2
    MD_CHECK_MAP = 3
    MD_CHECK_REFS = 4
    CREATE_ACCESS = 5
    DESTROY_ACCESS_PAGES = 6
    ACCESS_PAGES = 7
    ACCESS_RW = 8
    SET_TEMP_MEMORY_LIMIT = 9
    MOCK_DOMAIN_REPLACE = 10
    ACCESS_REPLACE_IOAS = 11
    MOCK_DOMAIN_FLAGS = 12
    DIRTY = 13
    MD_CHECK_IOTLB = 14
    TRIGGER_IOPF = 15
    DEV_CHECK_CACHE = 16
    TRIGGER_VEVENT = 17
    PASID_ATTACH = 18
    PASID_REPLACE = 19
    PASID_DETACH = 20
    PASID_CHECK_HWPT = 21


IOMMU_HWPT_DATA_SELFTEST = 0xDEAD
IOMMU_TEST_IOTLB_DEFAULT = 0xBADBEEF
IOMMU_TEST_DEV_CACHE_DEFAULT = 0xBADDAD
MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3
MOCK_NESTED_DOMAIN_IOTLB_NUM = 4
MOCK_DEV_CACHE_ID_MAX = 3
MOCK_DEV_CACHE_NUM = 4
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST = 0xDEADBEEF
IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID = 0xDADBEEF
IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0
IOMMU_VIOMMU_TYPE_SELFTEST = 0xDEADBEEF
IOMMU_VEVENTQ_TYPE_SELFTEST = 0xBEEFBEEF
MOCK_PASID_WIDTH = 20
MOCK_FLAGS_DEVICE_PASID = 1 << 2
MOCK_APERTURE_START = 1 << 24
MOCK_APERTURE_LAST = (1 << 31) - 1

#: Record sizes user space reads/writes on the fds.
PGFAULT_SIZE = 40
PAGE_RESPONSE_SIZE = 8
VEVENT_HEADER_SIZE = 8
