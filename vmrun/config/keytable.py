"""One table per section says which keys exist, how each is parsed and what it means, so
parsing, the did-you-mean for unknown keys, the schema and the documentation cannot
drift apart.
"""

from __future__ import annotations

import attrs

from vmrun.base.sizes import (
    HUGEPAGE_SIZES,
)
from vmrun.config.model import Disk, Iommufd, Net, Vfio
from vmrun.config.parsers import (
    Parser,
    boolean,
    caller_fd,
    choice,
    cpu_model,
    environment,
    file_path,
    forwards,
    integer,
    mac_address,
    memlock,
    memory_size,
    numa,
    pci_address,
    props,
    qemu_binary,
    string,
    string_list,
    sysfs_path,
    vm_name,
)
from vmrun.config.rules import ACCELS, DRIVERS, ID_HINT, ID_RE, IFNAME_RE, MACHINE_RE, SERIAL_RE, USER_RE


@attrs.frozen
class Key:
    name: str
    parse: Parser
    doc: str
    required: bool = False


VM_KEYS = (
    Key("name", vm_name, "unique name of the VM", required=True),
    Key("memory", memory_size, 'guest RAM in whole MiB, e.g. "8G"', required=True),
    Key("cpus", integer(1, 1024), "number of vCPUs (default 1)"),
    Key(
        "machine",
        string(MACHINE_RE, "a QEMU machine type such as q35"),
        "QEMU machine type (default q35)",
    ),
    Key("accel", choice(*ACCELS), "accelerator: kvm (default) or tcg"),
    Key("qemu", qemu_binary, "QEMU binary, a name on PATH or a path (default qemu-system-x86_64)"),
    Key(
        "user",
        string(USER_RE, "a user name such as nobody"),
        "run QEMU as this user (vmrun as root)",
    ),
    Key("cpu", cpu_model, "CPU model (default: host under kvm, QEMU's under tcg)"),
    Key("console", choice("stdio", "socket", "none"), "serial console: stdio (default), socket or none"),
    Key("display", choice("none", "vnc", "gtk", "sdl"), "display: none (default), vnc, gtk or sdl"),
    Key("firmware", choice("bios", "uefi"), "bios (default) or uefi (OVMF)"),
    Key("uefi_vars", file_path, "the VM's own UEFI variable store (made from the template when missing)"),
    Key("viommu", choice("intel", "virtio"), "a virtual IOMMU for the guest: intel or virtio"),
    Key("memlock", memlock, 'RLIMIT_MEMLOCK: "auto" (default), "unlimited", "off" or a size'),
    Key("kernel", file_path, "kernel image for direct boot (relative to the config file)"),
    Key("initrd", file_path, "initial ramdisk for direct boot"),
    Key("append", string(), "kernel command line for direct boot"),
    Key("args", string_list, "raw QEMU arguments appended last (escape hatch)"),
    Key("env", environment, "environment variables added to QEMU's minimal environment"),
    Key("sandbox", boolean, "QEMU's seccomp sandbox (default true)"),
    Key("hotplug_slots", integer(0, 32), "empty PCIe root ports for `vmrun attach` (q35 only; default 4 on q35)"),
    Key("hugepages", choice("off", *HUGEPAGE_SIZES), 'guest RAM on huge pages: "off" (default), "2M" or "1G"'),
    Key(
        "prealloc", boolean, "fault in all guest RAM at start, one thread per vCPU (default false; on with huge pages)"
    ),
    Key("numa", numa, 'host NUMA node of guest RAM and QEMU\'s CPUs: "auto" (default: the devices\' node), "off" or N'),
)
IOMMUFD_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the iommufd object", required=True),
    Key("fd", caller_fd, "an fd on /dev/iommu that the caller opened and vmrun passes on"),
)
VFIO_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the device", required=True),
    Key(
        "driver",
        choice(*DRIVERS),
        "QEMU device: vfio-pci (default), vfio-platform, vfio-ap, vfio-ccw",
    ),
    Key("host", pci_address, "PCI address, DDDD:BB:DD.F"),
    Key("sysfsdev", sysfs_path, "the device's sysfs directory"),
    Key("fd", caller_fd, "an fd on the device's VFIO cdev that the caller opened"),
    Key("iommufd", string(ID_RE, ID_HINT), "id of an [[iommufd]]; absent: legacy VFIO container"),
    Key("props", props, "extra device properties, e.g. { x-vga = true }"),
)
DISK_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the disk", required=True),
    Key("path", file_path, "image file (relative to the config file)", required=True),
    Key("format", choice("raw", "qcow2"), "image format: raw (default) or qcow2"),
    Key("interface", choice("virtio-blk", "nvme", "scsi"), "virtio-blk (default), nvme or scsi"),
    Key("readonly", boolean, "attach read-only (default false)"),
    Key("cache", choice("writeback", "none", "unsafe"), "host cache: writeback (default), none (O_DIRECT), unsafe"),
    Key("serial", string(SERIAL_RE, "letters, digits, '-', '_', '.', at most 20"), "serial number the guest sees"),
    Key("trusted", boolean, "vmrun opens the image and its backing files as root, not as vm.user (default false)"),
)
NET_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the network device", required=True),
    Key("type", choice("user", "tap"), "user (default: NAT, no privileges) or tap"),
    Key("forwards", forwards, 'user: host ports forwarded to the guest, e.g. ["tcp:2222:22"]'),
    Key("ifname", string(IFNAME_RE, "an interface name such as tap0"), "tap: an existing tap interface"),
    Key("mac", mac_address, "MAC address (default: derived from the VM and device names)"),
    Key("model", choice("virtio-net-pci", "e1000e", "e1000"), "NIC model: virtio-net-pci (default), e1000e, e1000"),
)
SECTIONS = {"vm": "table", "iommufd": "array", "vfio": "array", "disk": "array", "net": "array"}
SECTION_KEYS = {"vm": VM_KEYS, "iommufd": IOMMUFD_KEYS, "vfio": VFIO_KEYS, "disk": DISK_KEYS, "net": NET_KEYS}


# The sections `vmrun attach` takes from a fragment, with their keys and models.
ENTRY_SECTIONS: dict[str, tuple[tuple[Key, ...], type[Iommufd | Vfio | Disk | Net]]] = {
    "iommufd": (IOMMUFD_KEYS, Iommufd),
    "vfio": (VFIO_KEYS, Vfio),
    "disk": (DISK_KEYS, Disk),
    "net": (NET_KEYS, Net),
}
