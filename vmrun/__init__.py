"""vmrun: a declarative QEMU launcher for VFIO passthrough with iommufd."""

__version__ = "0.1.0"
