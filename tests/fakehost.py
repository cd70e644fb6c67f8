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
