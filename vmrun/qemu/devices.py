"""The QEMU device and backend types vmrun makes for what a config says: one list, which
the planner writes and the importer reads back into the config's words."""

from __future__ import annotations

from vmrun.config.rules import NET_MODELS

# [[disk]] interface -> the QEMU device the guest sees.
DISK_DEVICES = {"virtio-blk": "virtio-blk-pci", "nvme": "nvme", "scsi": "scsi-hd"}
SCSI_CONTROLLER = "virtio-scsi-pci"  # the controller scsi disks share
# [vm] viommu -> the QEMU device.
VIOMMU_DEVICES = {"intel": "intel-iommu", "virtio": "virtio-iommu-pci"}
VIDEO = "VGA"  # the video card of a display
HOTPLUG_PORT = "pcie-root-port"  # an empty slot for `vmrun attach`
# Guest RAM: huge pages from a memfd (no path QEMU must open), else plain anonymous memory.
RAM_HUGE = "memory-backend-memfd"  # huge pages, and shared RAM a new QEMU can take over
RAM_SHARED = RAM_HUGE
RAM_PLAIN = "memory-backend-ram"
# [[net]] model: the config names the QEMU device itself.
NICS = NET_MODELS
