"""Read-only facts about the host that the plan needs, read under a root directory.

Tests point `root` at a fake tree (plain files, symlinks, mknod'ed nodes); nothing here
opens a device, writes, or changes the process. The plan consumes a HostFacts value.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import os
import pathlib
import pwd
import resource
import stat
from collections.abc import Callable

import attrs

from vmrun.model import Config, Vfio
from vmrun.numa import MemoryFacts, device_node, memory_facts
from vmrun.opener import Opener, describe_type, not_an_image
from vmrun.qemu_caps import QemuCaps, probe

CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24
VFIO_OK_DRIVERS = ("vfio-pci", "pci-stub", "pcieport")


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
class DeviceFacts:
    sysfs: str | None  # the device's sysfs directory (host path), None when absent
    driver: str | None = None
    iommu_group: str | None = None
    group_members: tuple[tuple[str, str | None], ...] = ()  # (address, driver)
    cdev: str | None = None  # /dev/vfio/devices/vfioN, from <dev>/vfio-dev/vfioN
    cdev_node: Node | None = None
    group_node: Node | None = None  # /dev/vfio/<group>, for the legacy backend
    numa_node: int | None = None  # the host NUMA node it sits on; None: unknown


@attrs.frozen
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str = "/"


@attrs.frozen
class Launcher:
    """The process that runs vmrun: who it is and which limits it may change."""

    uid: int
    cap_sys_resource: bool
    cap_ipc_lock: bool
    memlock_soft: int  # resource.RLIM_INFINITY for unlimited
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


class Host:
    """A view of the host under `root` (normally /)."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = pathlib.Path(root)

    def under(self, path: str) -> pathlib.Path:
        return self.root / path.lstrip("/")

    def node(self, path: str) -> Node | None:
        try:
            st = self.under(path).stat()
        except OSError:
            return None
        return Node(path, stat.S_ISCHR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)

    def read(self, path: str) -> str | None:
        try:
            return self.under(path).read_text().strip()
        except OSError:
            return None

    def link_name(self, path: str) -> str | None:
        """The last component of a symlink's target: how sysfs names drivers and groups."""
        try:
            return os.path.basename(os.readlink(self.under(path)))
        except OSError:
            return None

    def cdev(self, sysfs: str) -> str | None:
        """The VFIO cdev of the device at `sysfs` (from its vfio-dev/vfioN), None if it has none."""
        try:
            names = sorted(n for n in os.listdir(self.under(f"{sysfs}/vfio-dev")) if n.startswith("vfio"))
        except OSError:
            return None
        return f"/dev/vfio/devices/{names[0]}" if names else None

    def group_members(self, group: str) -> list[str]:
        """The addresses of the devices in IOMMU group `group`."""
        try:
            return sorted(os.listdir(self.under(f"/sys/kernel/iommu_groups/{group}/devices")))
        except OSError:
            return []

    def device(self, dev: Vfio) -> DeviceFacts:
        if dev.host is not None:
            sysfs = f"/sys/bus/pci/devices/{dev.host}"
        elif dev.sysfsdev is not None:
            sysfs = dev.sysfsdev
        else:
            return DeviceFacts(sysfs=None)  # passed by the caller as an fd: nothing to look up
        if not self.under(sysfs).exists():
            return DeviceFacts(sysfs=None)
        group = self.link_name(f"{sysfs}/iommu_group")
        members: list[tuple[str, str | None]] = []
        if group is not None:
            members = [
                (n, self.link_name(f"/sys/kernel/iommu_groups/{group}/devices/{n}/driver"))
                for n in self.group_members(group)
            ]
        cdev = self.cdev(sysfs)
        return DeviceFacts(
            sysfs=sysfs,
            driver=self.link_name(f"{sysfs}/driver"),
            iommu_group=group,
            group_members=tuple(members),
            cdev=cdev,
            cdev_node=self.node(cdev) if cdev else None,
            group_node=self.node(f"/dev/vfio/{group}") if group else None,
            numa_node=device_node(self.read(f"{sysfs}/numa_node")),
        )


FIRMWARE_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")
QCOW2_MAGIC = b"QFI\xfb"


def find_uefi(host: Host) -> Firmware | None:
    """The first plain (no Secure Boot, no SMM) x86_64 UEFI flash build, by descriptor priority."""
    names: dict[str, str] = {}
    for directory in reversed(FIRMWARE_DIRS):  # /etc overrides /usr/share by file name
        try:
            for name in os.listdir(host.under(directory)):
                if name.endswith(".json"):
                    names[name] = f"{directory}/{name}"
        except OSError:
            continue
    for name in sorted(names):
        text = host.read(names[name])
        try:
            desc = json.loads(text or "")
            mapping = desc["mapping"]
            archs = {t["architecture"] for t in desc["targets"]}
            features = set(desc.get("features", []))
            if (
                "uefi" in desc["interface-types"]
                and mapping.get("device") == "flash"
                and "x86_64" in archs
                and not features & {"secure-boot", "requires-smm", "enrolled-keys"}
            ):
                return Firmware(names[name], mapping["executable"]["filename"], mapping["nvram-template"]["filename"])
        except (ValueError, KeyError, TypeError):
            continue  # a descriptor we cannot read is one we cannot use
    return None


QCOW2_BACKING_FORMAT_EXT = 0xE2792ACA
QCOW2_DATA_FILE_EXT = 0x44415441
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
MAX_BACKING_DEPTH = 16


@attrs.frozen
class Header:
    format: str  # qcow2, or raw for anything else
    backing: str | None = None  # the backing file name as the header says it
    backing_format: str | None = None  # from the header extension
    data_file: str | None = None  # a qcow2 external data file's name ("" when the header names none)


def read_header(fd: int) -> Header:
    """What an image's first bytes say about it, read from an open fd."""
    header = os.pread(fd, 112, 0)
    if header[:4] != QCOW2_MAGIC or len(header) < 72:
        return Header("raw")
    version = int.from_bytes(header[4:8], "big")
    offset = int.from_bytes(header[8:16], "big")
    size = int.from_bytes(header[16:20], "big")
    backing = None
    if offset and 0 < size < 4096:
        backing = os.pread(fd, size, offset).decode("utf-8", "replace")
    v3 = version >= 3 and len(header) >= 104
    incompatible = int.from_bytes(header[72:80], "big") if v3 else 0
    data_file = "" if incompatible & QCOW2_INCOMPAT_DATA_FILE else None
    # Header extensions follow the header: type, length, data padded to 8 bytes.
    at = int.from_bytes(header[100:104], "big") if v3 else 72
    backing_format = None
    for _ in range(64):
        head = os.pread(fd, 8, at)
        if len(head) < 8 or head[:4] == b"\0\0\0\0":
            break
        kind, length = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
        data = os.pread(fd, min(length, 4096), at + 8)
        at += 8 + (length + 7) // 8 * 8
        if kind == QCOW2_BACKING_FORMAT_EXT:
            backing_format = data.decode("ascii", "replace")
        elif kind == QCOW2_DATA_FILE_EXT:
            data_file = data.decode("utf-8", "replace")
    return Header("qcow2", backing, backing_format, data_file)


def has_protocol(name: str) -> bool:
    """QEMU's own rule (path_has_protocol): a ':' before any '/' names a protocol or json: options."""
    head = name.split("/", 1)[0]
    return ":" in head


def open_image(opener: Opener, path: str, flags: int) -> tuple[int | None, str | None]:
    """(fd, None) for an image file or block device opened as the opener's user, or (None, why not)."""
    try:
        fd = opener.open(path, flags)
    except FileNotFoundError:
        return None, "does not exist"
    except IsADirectoryError:
        return None, "it is a directory, not an image file or block device"
    except OSError as e:
        return None, f"{opener.who} may not open it: {e.strerror}"
    why = not_an_image(fd)
    if why is not None:
        os.close(fd)
        return None, why
    return fd, None


def image_facts(path: pathlib.Path, opener: Opener, writable: bool = False) -> ImageFacts:
    """The image at `path` and its backing chain, each layer opened as QEMU would get it.

    The chain comes from the headers, so every file in it is opened with the opener's rights
    (the VM user's, unless the disk is trusted): an image cannot name a file its user may not read.
    """
    if not path.exists() and not path.is_symlink():
        return ImageFacts(False)
    fd, why = open_image(opener, str(path), os.O_RDWR if writable else os.O_RDONLY)
    if fd is None:
        return ImageFacts(True, open_problem=why)
    chain: list[Layer] = []
    try:
        header = read_header(fd)
        st = os.fstat(fd)
        seen = {(st.st_dev, st.st_ino)}
    finally:
        os.close(fd)
    top_format = header.format
    here = path.parent
    while True:
        if header.data_file is not None:
            named = f" {header.data_file!r}" if header.data_file else ""
            return ImageFacts(
                True,
                top_format,
                tuple(chain),
                f"{chain[-1].path if chain else path} has an external data file{named}, which vmrun does not pass",
            )
        name = header.backing
        if name is None:
            return ImageFacts(True, top_format, tuple(chain))
        if len(chain) == MAX_BACKING_DEPTH:
            return ImageFacts(True, top_format, tuple(chain), f"the backing chain is deeper than {MAX_BACKING_DEPTH}")
        if has_protocol(name):
            return ImageFacts(
                True,
                top_format,
                tuple(chain),
                f"the backing file {name!r} is a protocol or json: name; vmrun passes only local files",
            )
        layer = pathlib.Path(name) if os.path.isabs(name) else here / name
        fd, why = open_image(opener, str(layer), os.O_RDONLY)
        if fd is None:
            return ImageFacts(True, top_format, tuple(chain), f"backing file {layer}: {why}")
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                return ImageFacts(True, top_format, tuple(chain), f"the backing chain loops at {layer}")
            seen.add((st.st_dev, st.st_ino))
            below = read_header(fd)
        finally:
            os.close(fd)
        # The header's backing format wins over probing, as it does for QEMU.
        fmt = header.backing_format if header.backing_format in ("qcow2", "raw") else below.format
        chain.append(Layer(str(layer), fmt))
        header, here = below, layer.parent


def readable_as(opener: Opener, path: pathlib.Path, flags: int = os.O_RDONLY) -> str | None:
    """None when the opener's user may open the regular file `path` so, else why not."""
    try:
        fd = opener.open(str(path), flags)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"{opener.who} may not {'read' if flags == os.O_RDONLY else 'open'} it: {e.strerror}"
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    return None if stat.S_ISREG(mode) else f"it is {describe_type(mode)}"


def lookup_user(name: str) -> User | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return User(name, pw.pw_uid, pw.pw_gid, tuple(sorted(groups)), pw.pw_dir or "/")


def user_by_uid(uid: int) -> User | None:
    try:
        return lookup_user(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return None


def current_launcher() -> Launcher:
    caps = 0
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return Launcher(
        uid=os.geteuid(),
        cap_sys_resource=bool(caps >> CAP_SYS_RESOURCE & 1),
        cap_ipc_lock=bool(caps >> CAP_IPC_LOCK & 1),
        memlock_soft=soft,
        memlock_hard=hard,
    )


def state_base(uid: int) -> str | None:
    """Where running VMs keep pid, lock and QMP socket: one directory per VM name.

    None for a user without a runtime directory: a predictable path in a shared /tmp could
    be made first by someone else. Clients connect to the sockets by path: it is absolute.
    """
    if os.environ.get("VMRUN_STATE_DIR"):
        return os.path.abspath(os.environ["VMRUN_STATE_DIR"])
    if uid == 0:
        return "/run/vmrun"
    # The XDG spec: a relative XDG_RUNTIME_DIR is to be ignored.
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    return f"{runtime.rstrip('/')}/vmrun" if os.path.isabs(runtime) else None


def data_base(uid: int) -> str:
    """Where VMs keep what must survive a reboot of the host (the UEFI variable store)."""
    if os.environ.get("VMRUN_DATA_DIR"):
        return os.path.abspath(os.environ["VMRUN_DATA_DIR"])
    if uid == 0:
        return "/var/lib/vmrun"
    data = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data):  # unset, or relative: the XDG spec's default
        data = os.path.join(os.path.expanduser("~"), ".local", "share")
    return f"{data.rstrip('/')}/vmrun"


LOCALE_VARS = ("LANG", "TZ")


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
    host = Host(root)
    launcher = launcher or current_launcher()
    run_as = lookup_user(config.vm.user) if config.vm.user else None
    if qemu_caps is None:
        # The probe runs the binary: never as root, with QEMU's own environment.
        prober = run_as or (lookup_user("nobody") if launcher.uid == 0 else None)
        qemu_caps = functools.partial(probe, as_user=prober)
    caps = qemu_caps(config.vm.qemu)
    try:
        interfaces = frozenset(os.listdir(host.under("/sys/class/net")))
    except OSError:
        interfaces = frozenset()
    with contextlib.ExitStack() as stack:
        as_user = opener if opener is not None else stack.enter_context(Opener(run_as))
        as_vmrun = stack.enter_context(Opener(None))
        unreadable = {
            key: why
            for key, path in (("vm.kernel", config.vm.kernel), ("vm.initrd", config.vm.initrd))
            if path is not None and (why := readable_as(as_user, path)) is not None
        }
        # A variable store the config names is the VM user's, made at launch when missing.
        store = config.vm.uefi_vars
        if store is not None and os.path.lexists(store):
            why = readable_as(as_user, store, os.O_RDWR)
            if why is not None:
                unreadable["vm.uefi_vars"] = why
        images = {
            d.id: image_facts(d.path, as_vmrun if d.trusted else as_user, writable=not d.readonly) for d in config.disk
        }
    return HostFacts(
        root=str(root),
        qemu=caps,
        qemu_name=config.vm.qemu,
        dev_iommu=host.node("/dev/iommu"),
        vfio_container=host.node("/dev/vfio/vfio"),
        devices={d.id: host.device(d) for d in config.vfio},
        run_as=run_as,
        launcher=launcher,
        unreadable=unreadable,
        state_base=state_base(launcher.uid),
        data_base=data_base(launcher.uid),
        uefi=find_uefi(host) if config.vm.firmware == "uefi" else None,
        images=images,
        dev_tun=host.node("/dev/net/tun") if any(n.type == "tap" for n in config.net) else None,
        net_interfaces=interfaces,
        caller=user_by_uid(launcher.uid),
        locale=tuple((k, os.environ[k]) for k in LOCALE_VARS if os.environ.get(k)),
        memory=memory_facts(host.root, frozenset(os.sched_getaffinity(0)) if allowed_cpus is None else allowed_cpus),
    )
