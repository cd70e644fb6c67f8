"""Fake host trees: the parts of sysfs and /dev that vmrun reads, built in a directory.

Sysfs is laid out as the kernel does it (device directories under /sys/devices, symlinks
from /sys/bus/pci/devices, driver and iommu_group links), so the code under test walks the
same links it walks on a real host. Device nodes are regular files unless `char_nodes`
is set (then real character nodes made with mknod, which needs root).
"""

from __future__ import annotations

import json
import os
import pathlib
import stat

import attrs

VFIO_MAJOR = 511


# Linux's IORESOURCE_* flags as sysfs `resource` shows them.
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_SIZEALIGN = 0x40000
IORESOURCE_MEM_64 = 0x100000
GiB = 1 << 30
MiB = 1 << 20


@attrs.frozen
class FakeBar:
    """A memory BAR as the kernel assigned it: its number, its size, 64-bit, prefetchable."""

    index: int
    size: int
    is64: bool = True
    prefetch: bool = True


@attrs.frozen
class FakePci:
    address: str
    driver: str | None = "vfio-pci"
    group: int = 1
    cdev: int | None = 0  # N of vfioN; None: no cdev (not vfio-pci, or no VFIO_DEVICE_CDEV)
    vendor: str = "0x1234"
    device: str = "0x11e8"
    class_code: str = "0x00ff00"
    numa_node: int | None = None  # None: no numa_node file; -1: the kernel does not know
    bars: tuple[FakeBar, ...] = ()  # none: no `resource` file (BARs unknown)
    reset_method: str | None = None  # None: no reset_method file; "": the kernel knows no reset
    boot_vga: bool | None = None  # None: no boot_vga file (not a VGA device)


@attrs.frozen
class FakePool:
    """A huge-page pool: hugepages-<size_kib>kB with nr_hugepages and free_hugepages."""

    size_kib: int
    total: int
    free: int


@attrs.frozen
class FakeNode:
    """/sys/devices/system/node/nodeN: its cpulist and huge-page pools."""

    id: int
    cpulist: str
    pools: tuple[FakePool, ...] = ()


@attrs.frozen
class FakeHost:
    devices: tuple[FakePci, ...] = ()
    dev_iommu: bool = True
    vfio_container: bool = True
    char_nodes: bool = False
    node_mode: int = 0o600
    taps: tuple[str, ...] = ()
    uefi: bool = False
    numa_nodes: tuple[FakeNode, ...] = ()
    pools: tuple[FakePool, ...] = ()  # /sys/kernel/mm/hugepages, the whole host
    cpu_phys_bits: int | None = None  # /proc/cpuinfo's "address sizes"; None: no cpuinfo
    iommus: tuple[tuple[str, int], ...] = ()  # (dmarN, its address width): /sys/class/iommu
    kernel: str | None = None  # /proc/sys/kernel/osrelease


def node(path: pathlib.Path, char: bool, mode: int, rdev: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if char:
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(*rdev))
    else:
        path.write_text("")
    os.chmod(path, mode)


def firmware(variant: str, features: list[str]) -> dict[str, object]:
    suffix = f".{variant}" if variant else ""
    return {
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": f"/usr/share/OVMF/OVMF_CODE_4M{suffix}.fd", "format": "raw"},
            "nvram-template": {"filename": f"/usr/share/OVMF/OVMF_VARS_4M{suffix}.fd", "format": "raw"},
        },
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": features,
    }


def pools(directory: pathlib.Path, specs: tuple[FakePool, ...]) -> None:
    for pool in specs:
        d = directory / f"hugepages-{pool.size_kib}kB"
        d.mkdir(parents=True)
        (d / "nr_hugepages").write_text(f"{pool.total}\n")
        (d / "free_hugepages").write_text(f"{pool.free}\n")


def resource(bars: tuple[FakeBar, ...]) -> str:
    """A device's `resource` file: 13 lines of start, end and flags, BARs at their numbers
    (a 64-bit BAR takes the number after it too), assigned from 0x4000000000 up."""
    lines = [(0, 0, 0)] * 13
    base = 0x4000000000
    for bar in sorted(bars, key=lambda b: -b.size):
        flags = IORESOURCE_MEM | IORESOURCE_SIZEALIGN
        flags |= IORESOURCE_MEM_64 if bar.is64 else 0
        flags |= IORESOURCE_PREFETCH if bar.prefetch else 0
        base = (base + bar.size - 1) // bar.size * bar.size
        lines[bar.index] = (base, base + bar.size - 1, flags)
        base += bar.size
    return "".join(f"0x{a:016x} 0x{b:016x} 0x{f:016x}\n" for a, b, f in lines)


def build(root: pathlib.Path, spec: FakeHost) -> pathlib.Path:
    sys_ = root / "sys"
    for n in spec.numa_nodes:
        node_dir = sys_ / "devices" / "system" / "node" / f"node{n.id}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(n.cpulist + "\n")
        pools(node_dir / "hugepages", n.pools)
    pools(sys_ / "kernel" / "mm" / "hugepages", spec.pools)
    for d in spec.devices:
        real = sys_ / "devices" / "pci0000:00" / d.address
        real.mkdir(parents=True)
        (real / "vendor").write_text(d.vendor + "\n")
        (real / "device").write_text(d.device + "\n")
        (real / "class").write_text(d.class_code + "\n")
        (real / "driver_override").write_text("(null)\n")
        if d.numa_node is not None:
            (real / "numa_node").write_text(f"{d.numa_node}\n")
        if d.bars:
            (real / "resource").write_text(resource(d.bars))
        if d.reset_method is not None:
            (real / "reset_method").write_text(d.reset_method + "\n")
        if d.boot_vga is not None:
            (real / "boot_vga").write_text(f"{int(d.boot_vga)}\n")
        bus = sys_ / "bus" / "pci" / "devices"
        bus.mkdir(parents=True, exist_ok=True)
        (bus / d.address).symlink_to(f"../../../devices/pci0000:00/{d.address}")
        if d.driver:
            drv = sys_ / "bus" / "pci" / "drivers" / d.driver
            drv.mkdir(parents=True, exist_ok=True)
            for name in ("bind", "unbind"):
                (drv / name).touch()
            (real / "driver").symlink_to(f"../../../bus/pci/drivers/{d.driver}")
        group = sys_ / "kernel" / "iommu_groups" / str(d.group) / "devices"
        group.mkdir(parents=True, exist_ok=True)
        (group / d.address).symlink_to(f"../../../../devices/pci0000:00/{d.address}")
        (real / "iommu_group").symlink_to(f"../../../kernel/iommu_groups/{d.group}")
        if d.driver == "vfio-pci":
            node(
                root / "dev" / "vfio" / str(d.group),
                spec.char_nodes,
                spec.node_mode,
                (VFIO_MAJOR - 1, d.group),
            )
            if d.cdev is not None:
                cdev = real / "vfio-dev" / f"vfio{d.cdev}"
                cdev.mkdir(parents=True)
                (cdev / "dev").write_text(f"{VFIO_MAJOR}:{d.cdev}\n")
                node(
                    root / "dev" / "vfio" / "devices" / f"vfio{d.cdev}",
                    spec.char_nodes,
                    spec.node_mode,
                    (VFIO_MAJOR, d.cdev),
                )
    probe = sys_ / "bus" / "pci" / "drivers_probe"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.touch()
    if spec.uefi:
        desc = root / "usr" / "share" / "qemu" / "firmware"
        desc.mkdir(parents=True)
        (desc / "50-edk2-x86_64-secure.json").write_text(
            json.dumps(firmware("secure", ["secure-boot", "requires-smm"]))
        )
        (desc / "60-edk2-x86_64.json").write_text(json.dumps(firmware("", ["acpi-s3"])))
    for tap in spec.taps:
        (sys_ / "class" / "net" / tap).mkdir(parents=True)
        node(root / "dev" / "net" / "tun", spec.char_nodes, 0o666, (10, 200))
    if spec.dev_iommu:
        node(root / "dev" / "iommu", spec.char_nodes, spec.node_mode, (10, 123))
    proc = root / "proc"
    if spec.cpu_phys_bits is not None:
        proc.mkdir(exist_ok=True)
        (proc / "cpuinfo").write_text(
            "processor\t: 0\nmodel name\t: Fake CPU\n"
            f"address sizes\t: {spec.cpu_phys_bits} bits physical, 48 bits virtual\n\n"
        )
    if spec.kernel is not None:
        (proc / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
        (proc / "sys" / "kernel" / "osrelease").write_text(spec.kernel + "\n")
    for name, width in spec.iommus:
        cap = sys_ / "class" / "iommu" / name / "intel-iommu" / "cap"
        cap.parent.mkdir(parents=True)
        # MGAW, bits 21:16, is the width less one; SAGAW and the rest as a client part shows them.
        cap.write_text(f"{(0xD2008C40660462 & ~(0x3F << 16)) | ((width - 1) << 16):x}\n")
    if spec.vfio_container:
        node(root / "dev" / "vfio" / "vfio", spec.char_nodes, 0o666, (10, 196))
    return root


STANDARD = FakeHost(
    devices=(
        FakePci("0000:01:00.0", group=1, cdev=0),
        FakePci("0000:02:00.0", group=2, cdev=1),
        FakePci("0000:03:00.0", group=3, cdev=2),
        FakePci("0000:04:00.0", driver="nvme", group=4, cdev=None),
        FakePci("0000:05:00.0", group=5, cdev=3),
        FakePci("0000:05:00.1", driver="snd_hda_intel", group=5, cdev=None),
    ),
    taps=("tap0",),
    uefi=True,
)

# Two NUMA nodes of four CPUs each. 01:00.0 and 02:00.0 sit on node 1, 03:00.0 on node 0,
# 05:00.0 reports no node (-1). Node 1 has 4096 free 2M pages (8G) and 8 free 1G pages;
# node 0 has 100 free 2M pages and no 1G pages at all.
TWO_NODES = FakeHost(
    devices=(
        FakePci("0000:01:00.0", group=1, cdev=0, numa_node=1),
        FakePci("0000:02:00.0", group=2, cdev=1, numa_node=1),
        FakePci("0000:03:00.0", group=3, cdev=2, numa_node=0),
        FakePci("0000:05:00.0", group=5, cdev=3, numa_node=-1),
    ),
    numa_nodes=(
        FakeNode(0, "0-3", (FakePool(2048, 100, 100),)),
        FakeNode(1, "4-7", (FakePool(2048, 4096, 4096), FakePool(1048576, 8, 8))),
    ),
    pools=(FakePool(2048, 4196, 4196), FakePool(1048576, 8, 8)),
)


def gpu(address: str, group: int, cdev: int, bar1: int, **more: object) -> FakePci:
    """A datacenter-style GPU: 16 MiB of registers below 4 GiB, the big BAR1 and a 32 MiB BAR3,
    both 64-bit prefetchable; resets by FLR."""
    bars = (FakeBar(0, 16 * MiB, is64=False, prefetch=False), FakeBar(1, bar1), FakeBar(3, 32 * MiB))
    return FakePci(
        address,
        group=group,
        cdev=cdev,
        vendor="0x10de",
        device="0x2330",
        class_code="0x030200",
        bars=bars,
        reset_method="flr bus",
        **more,  # type: ignore[arg-type]
    )


GPU_DEVICES = (
    gpu("0000:41:00.0", 41, 0, 128 * GiB),  # an H100: 16 MiB + 128 GiB + 32 MiB
    *(gpu(f"0000:{bus:02x}:00.0", bus, 1 + k, 256 * GiB) for k, bus in enumerate((0x81, 0x82, 0x83, 0x84))),
    # A workstation GPU that is the host's boot VGA, its HDMI audio function in its group.
    FakePci(
        "0000:0a:00.0",
        group=10,
        cdev=5,
        vendor="0x10de",
        device="0x2684",
        class_code="0x030000",
        bars=(FakeBar(0, 16 * MiB, is64=False, prefetch=False), FakeBar(1, 16 * GiB), FakeBar(3, 32 * MiB)),
        reset_method="bus",
        boot_vga=True,
    ),
    FakePci(
        "0000:0a:00.1",
        group=10,
        cdev=6,
        vendor="0x10de",
        device="0x22ba",
        class_code="0x040300",
        bars=(FakeBar(0, 16 * 1024, is64=False, prefetch=False),),
        reset_method="flr",
    ),
    # A NIC the kernel knows no way to reset.
    FakePci(
        "0000:06:00.0",
        group=6,
        cdev=7,
        vendor="0x8086",
        device="0x1533",
        class_code="0x020000",
        bars=(FakeBar(0, 128 * 1024, is64=False, prefetch=False),),
        reset_method="",
    ),
)
# A server: 46-bit CPU, 48-bit VT-d, Linux 6.12 (whose iommufd maps no BARs).
GPU_SERVER = FakeHost(
    devices=GPU_DEVICES, uefi=True, cpu_phys_bits=46, iommus=(("dmar0", 48), ("dmar1", 48)), kernel="6.12.48"
)
# A client part: 39-bit CPU and VT-d.
NARROW = FakeHost(devices=GPU_DEVICES, uefi=True, cpu_phys_bits=39, iommus=(("dmar0", 39),), kernel="6.12.48")
