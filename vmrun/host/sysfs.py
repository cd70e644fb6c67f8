"""Where sysfs keeps PCI devices, their drivers and IOMMU groups, and the kernel's rule for
when an IOMMU group may be given to VFIO. Every module that builds a /sys path for a PCI
device or judges a group asks here (host/reader.py, requirements, bind, init, import).

On the kept-plan launch's path: no attrs, no typing.
"""

from __future__ import annotations

PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"
DRIVERS_PROBE = "/sys/bus/pci/drivers_probe"
IOMMU_GROUPS = "/sys/kernel/iommu_groups"
# Class codes as sysfs writes them (0x060400): host bridges and PCI-to-PCI bridges, the
# host's own plumbing.
BRIDGE_CLASSES = ("0x0600", "0x0604")
# Drivers that VFIO lets a group member keep (the kernel's vfio_driver_allowed and VFIO's
# own drivers). A bridge may keep any driver: the kernel never counts bridges (pcieport).
VIABLE_DRIVERS = ("vfio-pci", "vfio-platform", "pci-stub")


def pci_device(address: str) -> str:
    return f"{PCI_DEVICES}/{address}"


def pci_driver(name: str) -> str:
    return f"{PCI_DRIVERS}/{name}"


def group_devices(group: str) -> str:
    return f"{IOMMU_GROUPS}/{group}/devices"


def is_bridge(class_code: str | None) -> bool:
    return (class_code or "").startswith(BRIDGE_CLASSES)


def keeps_group_viable(driver: str | None, class_code: str | None) -> bool:
    """Whether a member of an IOMMU group on `driver` (None: unbound) lets VFIO use the group."""
    return driver is None or driver in VIABLE_DRIVERS or is_bridge(class_code)
