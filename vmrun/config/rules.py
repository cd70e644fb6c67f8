"""The config's own words: which names, ids, paths and addresses it accepts, the ids
vmrun keeps for itself, and the small rules other stages ask about (is_q35).
"""

from __future__ import annotations

import os
import re

# Every pattern is applied with fullmatch: `$` would let a trailing newline through.
# QEMU accepts ids that start with a letter and go on with letters, digits, '-', '.', '_'.
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
ID_MAX = 63
# Planner.disk (vmrun/plan/planner.py) names a disk's block nodes ID-file and ID-fmt, and those of
# its backing layers ID-bK-file and ID-bK-fmt, K up to host.MAX_BACKING_DEPTH (16); QEMU's
# node names have at most 31 characters.
DISK_ID_MAX = 31 - len("-b16-file")
# The ids vmrun gives its own devices, chardevs and block nodes (the planner writes them,
# the importer recognises them): a config must not take them, or QEMU would refuse the
# duplicate, or wire the wrong thing together.
SCSI_CONTROLLER = "scsi0"  # -device virtio-scsi-pci, for scsi disks
SCSI_BUS = f"{SCSI_CONTROLLER}.0"  # the bus its disks share
VIOMMU = "viommu0"  # -device intel-iommu / virtio-iommu-pci
VIDEO = "video0"  # -device VGA, for a display
FW_CODE = "fw-code"  # the UEFI code's -blockdev (and FW_CODE-file)
FW_VARS = "fw-vars"  # the UEFI variable store's -blockdev (and FW_VARS-file)
CONSOLE = "console"  # the serial console's -chardev
QMP_CHARDEV = "vmrun-qmp"  # vmrun's QMP -chardev
GUEST_RAM = "guest-ram"  # the guest RAM's -object memory-backend-*
HOTPLUG_PORT = "hotplug"  # hotplug0, hotplug1, ...: the empty root ports for `vmrun attach`
RESERVED_IDS = {
    SCSI_CONTROLLER: "the SCSI controller of scsi disks",
    VIOMMU: "the vIOMMU",
    VIDEO: "the video card of a display",
    FW_CODE: "the UEFI code's block node",
    FW_VARS: "the UEFI variable store's block node",
    CONSOLE: "the serial console's chardev",
    QMP_CHARDEV: "vmrun's QMP chardev",
    GUEST_RAM: "the guest RAM's memory backend",
}
# ID-b1, ID-b2, ...: the backing layers' node names, from Planner.disk.
BACKING_NODE_RE = re.compile(r".*-b[0-9]+")
HOTPLUG_PORT_RE = re.compile(f"{HOTPLUG_PORT}[0-9]+")
# A letter or digit first: the name is a directory under the state base, never "." or
# ".."; at most 64 characters, so every socket path under it fits sun_path.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_MAX = 64
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
SERIAL_RE = re.compile(r"[A-Za-z0-9_.-]{1,20}")
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MACHINE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PCI_RE = re.compile(r"(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-1][0-9a-fA-F])\.(?P<fn>[0-7])")
ACCELS = ("kvm", "tcg")
NET_MODELS = ("virtio-net-pci", "e1000e", "e1000")  # QEMU's NIC devices a [[net]] may be
# Device properties that vmrun sets itself from the config's own keys. `driver` too: QEMU
# takes the last of two, so props.driver would make the device another one.
PLANNED_PROPS = frozenset({"driver", "id", "host", "sysfsdev", "fd", "iommufd"})
FIRST_FREE_FD = 3


def pci_address_of(host: str | None, sysfsdev: str | None) -> str | None:
    """The PCI address a [[vfio]] entry names: its host, or a sysfsdev path that ends in one
    (a platform device's path does not); None for a device passed as an fd."""
    if host is not None:
        return host
    if sysfsdev is not None and PCI_RE.fullmatch(name := os.path.basename(sysfsdev.rstrip("/"))):
        return name
    return None


def is_q35(machine: str) -> bool:
    return machine == "q35" or machine.startswith("pc-q35")


# Empty root ports a q35 VM gets without [vm] hotplug_slots, as libvirt leaves some.
DEFAULT_HOTPLUG_SLOTS = 4


def hotplug_slots(machine: str, slots: int | None) -> int:
    """How many empty root ports the VM gets: as set, else DEFAULT_HOTPLUG_SLOTS on q35 and
    none elsewhere (other machines have no PCIe root ports)."""
    if slots is not None:
        return slots
    return DEFAULT_HOTPLUG_SLOTS if is_q35(machine) else 0


ID_HINT = "start with a letter; then letters, digits, '-', '.' or '_'"
