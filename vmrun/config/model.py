"""The validated VM model: what a config says, with every value already checked and normalised."""

from __future__ import annotations

import pathlib
from typing import Literal, get_args

import attrs

from vmrun.base.problems import Sources

MemlockMode = Literal["auto", "unlimited", "off", "size"]
HugePages = Literal["off", "2M", "1G"]
# "auto": next to the passed-through devices; "off": no binding; an int: that host node.
Numa = Literal["auto", "off"] | int
Driver = Literal["vfio-pci", "vfio-platform", "vfio-ap", "vfio-ccw"]
DRIVERS: tuple[str, ...] = get_args(Driver)  # the [[vfio]] drivers: this Literal is their one home
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
    cpu: str | None = None  # QEMU's default model when None
    console: str = "stdio"
    display: str = "none"
    firmware: str = "bios"
    uefi_vars: pathlib.Path | None = None  # per-VM copy of the UEFI variable store
    viommu: str | None = None
    memlock: Memlock = Memlock()
    kernel: pathlib.Path | None = None
    initrd: pathlib.Path | None = None
    append: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # added to QEMU's minimal environment
    sandbox: bool = True  # QEMU's seccomp sandbox
    hotplug_slots: int | None = None  # None: rules.hotplug_slots decides by the machine
    hugepages: HugePages = "off"  # guest RAM on huge pages of this size
    prealloc: bool = False  # fault all guest RAM in at start (always with huge pages)
    numa: Numa = "auto"
    hotplug_reserve: int | None = None  # bytes of 64-bit prefetchable window per hot-plug root port
    memlock_bars: bool = False  # count the passed devices' BARs in the memlock limit
    shared_ram: bool | None = None  # guest RAM on a shared memfd; None: where QEMU has cpr-transfer


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
class Disk:
    id: str
    path: pathlib.Path
    format: str = "raw"
    interface: str = "virtio-blk"
    readonly: bool = False
    cache: str = "writeback"
    serial: str | None = None
    trusted: bool = False  # opened with vmrun's rights instead of the VM user's


@attrs.frozen
class Forward:
    protocol: str  # tcp | udp
    host_addr: str
    host_port: int
    guest_port: int

    def hostfwd(self) -> str:
        return f"{self.protocol}:{self.host_addr}:{self.host_port}-:{self.guest_port}"


@attrs.frozen
class Net:
    id: str
    type: str = "user"
    forwards: tuple[Forward, ...] = ()
    ifname: str | None = None  # tap: an existing interface vmrun attaches to
    mac: str | None = None
    model: str = "virtio-net-pci"


@attrs.frozen
class Config:
    file: pathlib.Path
    vm: Vm
    iommufd: tuple[Iommufd, ...] = ()
    vfio: tuple[Vfio, ...] = ()
    disk: tuple[Disk, ...] = ()
    net: tuple[Net, ...] = ()
    # Which file (the config or a drop-in) wrote each key; not part of what the VM is.
    sources: Sources = attrs.field(
        default=attrs.Factory(lambda self: Sources(str(self.file)), takes_self=True), eq=False
    )
    # The uid that owns the config file (None for a config not read from a file): its
    # drop-ins and the fragments attached to its VM must be root's or this user's.
    owner: int | None = attrs.field(default=None, eq=False)

    def caller_fds(self) -> set[int]:
        """Fds the caller opened and vmrun passes on untouched."""
        fds = {o.fd for o in self.iommufd if o.fd is not None}
        return fds | {d.fd for d in self.vfio if d.fd is not None}
