"""The kernel interfaces vmrun drives by ioctl, apart from any one command: iommufd's
IOMMU_OPTION (per-process memlock accounting) and the tun driver's TUNSETIFF (attaching to
an existing tap). The launch, `vmrun check` and later `vmrun attach` all use them."""

from __future__ import annotations

import fcntl
import os
import re
import struct

# include/uapi/linux/iommufd.h: IOMMU_OPTION = _IO(IOMMUFD_TYPE=';', 0x87)
IOMMU_OPTION = 0x3B87
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1
RLIMIT_MODE_PER_PROCESS = 1
# struct iommu_option { u32 size; u32 option_id; u16 op; u16 reserved; u32 object_id; u64 val64; }
IOMMU_OPTION_STRUCT = struct.Struct("=IIHHIQ")

# What CPR transfer (`vmrun upgrade`) needs of the kernel to hand DMA mappings to a new
# process: iommufd's IOMMU_IOAS_CHANGE_PROCESS (Linux 6.13), or for the legacy container
# type1's VFIO_UPDATE_VADDR (5.12), which iommufd's compat container lacks.
IOMMU_IOAS_CHANGE_PROCESS = 0x3B92  # _IO(';', 0x92); struct { u32 size; u32 __reserved; }
VFIO_CHECK_EXTENSION = 0x3B65  # _IO(';', 100 + 1)
VFIO_TYPE1v2_IOMMU = 3

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def iommu_option(fd: int, op: int, value: int = 0) -> int:
    """Run IOMMU_OPTION RLIMIT_MODE on an iommufd; returns the value the kernel reports."""
    buf = bytearray(IOMMU_OPTION_STRUCT.pack(IOMMU_OPTION_STRUCT.size, IOMMU_OPTION_RLIMIT_MODE, op, 0, 0, value))
    fcntl.ioctl(fd, IOMMU_OPTION, buf)
    return int(IOMMU_OPTION_STRUCT.unpack(buf)[5])


def trial_per_process_accounting(host_root: str, path: str) -> str | None:
    """Open `path` as an iommufd and switch it to per-process accounting; None on success.

    For `vmrun check`: a fresh iommufd context with no objects, closed again at once.
    """
    try:
        fd = os.open(os.path.join(host_root, path.lstrip("/")), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    try:
        set_per_process_accounting(fd)
        mode = iommu_option(fd, IOMMU_OPTION_OP_GET)
    except OSError as e:
        return f"cannot set per-process accounting on {path}: {e.strerror}"
    finally:
        os.close(fd)
    if mode != RLIMIT_MODE_PER_PROCESS:
        return f"{path} reports accounting mode {mode} after setting per-process"
    return None


def trial_cpr(host_root: str, backend: str) -> str | None:
    """Whether the kernel can move a VM's DMA mappings to a new process (CPR transfer);
    None when it can, else why not. `backend`: "iommufd" (IOMMU_IOAS_CHANGE_PROCESS, a no-op
    on a fresh context) or "legacy" (a real type1 container, not iommufd's compat one)."""
    path = "/dev/iommu" if backend == "iommufd" else "/dev/vfio/vfio"
    try:
        fd = os.open(os.path.join(host_root, path.lstrip("/")), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    try:
        if backend == "iommufd":
            try:
                fcntl.ioctl(fd, IOMMU_IOAS_CHANGE_PROCESS, bytearray(struct.pack("=II", 8, 0)))
            except OSError as e:
                return f"{path} has no IOMMU_IOAS_CHANGE_PROCESS ({e.strerror}; Linux 6.13 and later have it)"
            return None
        # VFIO_UPDATE_VADDR says yes only on a container with a group and type1 set. What
        # tells here: iommufd's compat container (which can never do it) answers iommufd's
        # own ioctls, type1's does not; and type1 has had it since 5.12.
        try:
            iommu_option(fd, IOMMU_OPTION_OP_GET)
        except OSError:
            pass
        else:
            return f"{path} is iommufd's compat container, which has no VFIO_UPDATE_VADDR"
        if fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0:
            return f"{path} offers no type1 IOMMU"
        release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
        if release < (5, 12):
            return f"type1 of Linux {os.uname().release} has no VFIO_UPDATE_VADDR (5.12 and later have it)"
        return None
    except OSError as e:
        return f"cannot ask {path} about CPR: {e.strerror}"
    finally:
        os.close(fd)


def set_per_process_accounting(fd: int) -> None:
    """Charge what this iommufd context pins to its process, not to its user (needs CAP_SYS_RESOURCE;
    EBUSY once the context has objects)."""
    iommu_option(fd, IOMMU_OPTION_OP_SET, RLIMIT_MODE_PER_PROCESS)


def attach_tap(fd: int, ifname: str) -> None:
    """Attach an fd on /dev/net/tun to the existing tap `ifname` (no packet info, vnet headers)."""
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
