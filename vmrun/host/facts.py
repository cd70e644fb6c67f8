"""Read-only facts about the host that the plan needs, read under a root directory, typed.

The reading itself is host/reader.py's (plain data, shared with the plan cache); this module
turns its record into the HostFacts value the plan consumes. Tests point `root` at a fake
tree (plain files, symlinks, mknod'ed nodes); nothing here opens a device, writes, or
changes the process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
from collections.abc import Callable
from typing import Any

import attrs

from vmrun.config.model import Config
from vmrun.host import numa, reader
from vmrun.host.numa import MemoryFacts
from vmrun.host.qemu_caps import QemuCaps, probe
from vmrun.kernel.opener import Opener
from vmrun.kernel.users import User


class Host(reader.Host):
    """host/reader.py's view of the host, for the tools that work on it (devices, bind, init, import)."""

    def under(self, path: str) -> pathlib.Path:
        return pathlib.Path(self.at(path))


@attrs.frozen
class Node:
    """A device node as stat shows it: enough to tell whether a user may open it."""

    path: str
    is_char: bool
    mode: int
    uid: int
    gid: int

    def accessible(self, uid: int, gids: tuple[int, ...]) -> bool:
        if uid == 0:
            return True
        if self.uid == uid:
            return self.mode & 0o600 == 0o600
        if self.gid in gids:
            return self.mode & 0o060 == 0o060
        return self.mode & 0o006 == 0o006


@attrs.frozen
class Bar:
    """A memory BAR of a device, as the host kernel sized it."""

    index: int
    size: int  # bytes, a power of two
    is64: bool
    prefetch: bool

    @property
    def kind(self) -> str:
        return f"{'64' if self.is64 else '32'}-bit{' prefetchable' if self.prefetch else ''}"


@attrs.frozen
class DeviceFacts:
    sysfs: str | None  # the device's sysfs directory (host path), None when absent
    driver: str | None = None
    iommu_group: str | None = None
    group_members: tuple[tuple[str, str | None, str | None], ...] = ()  # (address, driver, class code)
    cdev: str | None = None  # /dev/vfio/devices/vfioN, from <dev>/vfio-dev/vfioN
    cdev_node: Node | None = None
    group_node: Node | None = None  # /dev/vfio/<group>, for the legacy backend
    numa_node: int | None = None  # the host NUMA node it sits on; None: unknown
    bars: tuple[Bar, ...] | None = None  # None: the kernel does not say (no resource file)
    reset_method: str | None = None  # the kernel's ways to reset it ("flr bus"); "": none; None: unknown
    boot_vga: bool | None = None  # the VGA device the host's firmware and console use


@attrs.frozen
class Launcher:
    """The process that runs vmrun: who it is and which limits it may change."""

    uid: int
    cap_sys_resource: bool
    cap_ipc_lock: bool
    memlock_soft: int  # sizes.UNLIMITED for unlimited
    memlock_hard: int


@attrs.frozen
class Firmware:
    """A UEFI build as QEMU's firmware descriptors (docs/interop/firmware.json) list it."""

    descriptor: str
    code: str
    vars_template: str


@attrs.frozen
class Layer:
    path: str
    format: str  # qcow2 or raw


@attrs.frozen
class ImageFacts:
    exists: bool
    detected_format: str | None = None  # from the first bytes: qcow2, or raw for anything else
    backing: tuple[Layer, ...] = ()  # the qcow2 backing chain, nearest first
    backing_problem: str | None = None  # a chain that cannot be followed: unreadable, a loop, too deep
    open_problem: str | None = None  # the image itself cannot be opened as the VM user (or is no file)


@attrs.frozen
class HostFacts:
    root: str
    qemu: QemuCaps | None  # None: the binary was not found
    qemu_name: str
    dev_iommu: Node | None
    vfio_container: Node | None
    devices: dict[str, DeviceFacts]  # by device id
    run_as: User | None  # None when the config names no user, or the user does not exist
    launcher: Launcher
    # vm.kernel / vm.initrd -> why QEMU's user cannot read it; QEMU opens them by path itself
    unreadable: dict[str, str] = attrs.field(factory=dict)
    state_base: str | None = "/run/vmrun"  # None: no safe place (see state_base())
    data_base: str = "/var/lib/vmrun"
    uefi: Firmware | None = None
    images: dict[str, ImageFacts] = attrs.field(factory=dict)  # by disk id
    dev_tun: Node | None = None
    net_interfaces: frozenset[str] = frozenset()
    caller: User | None = None  # who runs vmrun: QEMU's identity when the config names no user
    locale: tuple[tuple[str, str], ...] = ()  # the caller's LANG and TZ, all QEMU keeps of its environment
    memory: MemoryFacts = attrs.field(factory=MemoryFacts)  # NUMA nodes, huge pages, CPUs vmrun may use
    cpu_phys_bits: int | None = None  # the host CPU's physical address bits; None: unknown
    iommus: tuple[tuple[str, int | None], ...] = ()  # each host IOMMU and its address width (None: unknown)
    kernel: str | None = None  # the host kernel's release, e.g. "6.12.48"


def node(record: dict[str, Any] | None) -> Node | None:
    return None if record is None else Node(**record)


def user(record: dict[str, Any] | None) -> User | None:
    return None if record is None else User(**{**record, "groups": tuple(record["groups"])})


def device(record: dict[str, Any]) -> DeviceFacts:
    if record["sysfs"] is None:
        return DeviceFacts(sysfs=None)
    return DeviceFacts(
        **{
            **record,
            "group_members": tuple((a, d, c) for a, d, c in record["group_members"]),
            "bars": None if record["bars"] is None else tuple(Bar(*b) for b in record["bars"]),
            "cdev_node": node(record["cdev_node"]),
            "group_node": node(record["group_node"]),
        }
    )


def image(record: dict[str, Any]) -> ImageFacts:
    return ImageFacts(**{**record, "backing": tuple(Layer(p, f) for p, f in record.get("backing", ()))})


def image_facts(path: str | os.PathLike[str], opener: Opener, writable: bool = False) -> ImageFacts:
    """The image at `path` and its backing chain, each layer opened as the opener's user."""
    return image(reader.image(os.fspath(path), opener, writable))


def lookup_user(name: str) -> User | None:
    return user(reader.user(name))


def user_by_uid(uid: int) -> User | None:
    return user(reader.user_by_uid(uid))


def current_launcher() -> Launcher:
    return Launcher(**reader.launcher())


def facts(record: dict[str, Any], caps: QemuCaps | None, qemu_name: str) -> HostFacts:
    """HostFacts from host/reader.py's record and the QEMU binary's capabilities."""
    uefi = record["uefi"]
    return HostFacts(
        root=record["root"],
        qemu=caps,
        qemu_name=qemu_name,
        dev_iommu=node(record["dev_iommu"]),
        vfio_container=node(record["vfio_container"]),
        devices={k: device(v) for k, v in record["devices"].items()},
        run_as=user(record["run_as"]),
        launcher=Launcher(**record["launcher"]),
        unreadable=dict(record["unreadable"]),
        state_base=record["state_base"],
        data_base=record["data_base"],
        uefi=None if uefi is None else Firmware(**uefi),
        images={k: image(v) for k, v in record["images"].items()},
        dev_tun=node(record["dev_tun"]),
        net_interfaces=frozenset(record["net_interfaces"]),
        caller=user(record["caller"]),
        locale=tuple((k, v) for k, v in record["locale"]),
        memory=numa.from_record(record["memory"]),
        cpu_phys_bits=record["cpu_phys_bits"],
        iommus=tuple((name, bits) for name, bits in record["iommus"]),
        kernel=record["kernel"],
    )


def gather(
    config: Config,
    root: str | os.PathLike[str] = "/",
    qemu_caps: Callable[[str], QemuCaps | None] | None = None,
    launcher: Launcher | None = None,
    opener: Opener | None = None,
    allowed_cpus: frozenset[int] | None = None,
) -> HostFacts:
    """Everything the plan needs to know about this host for `config`.

    Files QEMU will get are opened as the VM user (through `opener`, made here when not
    given), so the facts say what that user may open, not what root may. `allowed_cpus`
    defaults to the CPUs this process may run on.
    """
    return gather_record(config, root, qemu_caps, launcher, opener, allowed_cpus)[1]


def gather_record(
    config: Config,
    root: str | os.PathLike[str] = "/",
    qemu_caps: Callable[[str], QemuCaps | None] | None = None,
    launcher: Launcher | None = None,
    opener: Opener | None = None,
    allowed_cpus: frozenset[int] | None = None,
) -> tuple[dict[str, Any], HostFacts]:
    """gather's facts with the record they were made from (what the plan cache compares)."""
    query = reader.query(config)
    with contextlib.ExitStack() as stack:
        run_as = lookup_user(config.vm.user) if config.vm.user else None
        as_user = opener if opener is not None else stack.enter_context(Opener(run_as))
        as_vmrun = stack.enter_context(Opener(None))
        me = attrs.asdict(launcher) if launcher is not None else None
        record = reader.read(query, root, as_user, as_vmrun, me, allowed_cpus)
    if qemu_caps is None:
        # The probe runs the binary: never as root, with QEMU's own environment.
        prober = user(record["run_as"]) or (lookup_user("nobody") if record["launcher"]["uid"] == 0 else None)
        qemu_caps = functools.partial(probe, as_user=prober)
    return record, facts(record, qemu_caps(config.vm.qemu), config.vm.qemu)
