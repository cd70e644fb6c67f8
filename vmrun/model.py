"""The validated VM model: what a config says, with every value already checked and normalised."""

from __future__ import annotations

import pathlib
from typing import Literal

import attrs

MemlockMode = Literal["auto", "unlimited", "off", "size"]
Driver = Literal["vfio-pci", "vfio-platform", "vfio-ap", "vfio-ccw"]
PropValue = str | int | bool


@attrs.frozen
class Memlock:
    mode: MemlockMode = "auto"
    size: int | None = None  # bytes, only for mode "size"


@attrs.frozen
class Vm:
    name: str
    memory: int  # bytes
    cpus: int = 1
    machine: str = "q35"
    accel: str = "kvm"
    qemu: str = "qemu-system-x86_64"
    user: str | None = None
    console: str = "stdio"
    memlock: Memlock = Memlock()
    kernel: pathlib.Path | None = None
    initrd: pathlib.Path | None = None
    append: str | None = None
    args: tuple[str, ...] = ()


@attrs.frozen
class Iommufd:
    id: str
    fd: int | None = None  # inherited from the caller; None: vmrun opens /dev/iommu


@attrs.frozen
class Vfio:
    id: str
    driver: Driver = "vfio-pci"
    host: str | None = None  # normalised DDDD:BB:DD.F
    sysfsdev: str | None = None
    fd: int | None = None
    iommufd: str | None = None  # None: the legacy VFIO container (type1) backend
    props: tuple[tuple[str, PropValue], ...] = ()

    @property
    def source(self) -> str:
        """How the config names the device, for messages."""
        if self.host is not None:
            return f"host={self.host}"
        if self.sysfsdev is not None:
            return f"sysfsdev={self.sysfsdev}"
        return f"fd={self.fd}"


@attrs.frozen
class Config:
    file: pathlib.Path
    vm: Vm
    iommufd: tuple[Iommufd, ...] = ()
    vfio: tuple[Vfio, ...] = ()

    def caller_fds(self) -> set[int]:
        """Fds the caller opened and vmrun passes on untouched."""
        fds = {o.fd for o in self.iommufd if o.fd is not None}
        return fds | {d.fd for d in self.vfio if d.fd is not None}
