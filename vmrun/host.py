"""Read-only facts about the host that the plan needs, read under a root directory.

Tests point `root` at a fake tree (plain files, symlinks, mknod'ed nodes); nothing here
opens a device, writes, or changes the process. The plan consumes a HostFacts value.
"""

from __future__ import annotations

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


@attrs.frozen
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


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
    backing_problem: str | None = None  # a chain that cannot be followed: missing, a loop, too deep


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
    missing_files: tuple[str, ...] = ()
    state_base: str = "/run/vmrun"
    data_base: str = "/var/lib/vmrun"
    uefi: Firmware | None = None
    images: dict[str, ImageFacts] = attrs.field(factory=dict)  # by disk id
    dev_tun: Node | None = None
    net_interfaces: frozenset[str] = frozenset()


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
MAX_BACKING_DEPTH = 16


def read_header(path: pathlib.Path) -> tuple[str, str | None, str | None]:
    """(format, backing file name, backing format from the header extension) of an image."""
    with open(path, "rb") as f:
        header = f.read(104)
        if header[:4] != QCOW2_MAGIC or len(header) < 72:
            return "raw", None, None
        version = int.from_bytes(header[4:8], "big")
        offset = int.from_bytes(header[8:16], "big")
        size = int.from_bytes(header[16:20], "big")
        backing = None
        if offset and 0 < size < 4096:
            f.seek(offset)
            backing = f.read(size).decode("utf-8", "replace")
        # Header extensions follow the header: type, length, data padded to 8 bytes.
        ext_at = int.from_bytes(header[100:104], "big") if version >= 3 and len(header) >= 104 else 72
        backing_format = None
        f.seek(ext_at)
        for _ in range(64):
            head = f.read(8)
            if len(head) < 8 or head[:4] == b"\0\0\0\0":
                break
            kind, length = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
            data = f.read((length + 7) // 8 * 8)[:length]
            if kind == QCOW2_BACKING_FORMAT_EXT:
                backing_format = data.decode("ascii", "replace")
        return "qcow2", backing, backing_format


def image_facts(path: pathlib.Path) -> ImageFacts:
    try:
        fmt, name, name_format = read_header(path)
    except FileNotFoundError:
        return ImageFacts(False)
    except OSError:
        return ImageFacts(True)  # exists but unreadable for vmrun: the launch will say so
    chain: list[Layer] = []
    seen = {os.path.realpath(path)}
    here = path.parent
    while name is not None:
        layer = pathlib.Path(name) if os.path.isabs(name) else here / name
        if len(chain) == MAX_BACKING_DEPTH:
            return ImageFacts(True, fmt, tuple(chain), f"the backing chain is deeper than {MAX_BACKING_DEPTH}")
        if os.path.realpath(layer) in seen:
            return ImageFacts(True, fmt, tuple(chain), f"the backing chain loops at {layer}")
        seen.add(os.path.realpath(layer))
        try:
            layer_fmt, next_name, next_format = read_header(layer)
        except OSError as e:
            return ImageFacts(True, fmt, tuple(chain), f"backing file {layer}: {e.strerror}")
        # The header's backing format wins over probing, as it does for QEMU.
        chain.append(Layer(str(layer), name_format if name_format in ("qcow2", "raw") else layer_fmt))
        name, name_format, here = next_name, next_format, layer.parent
    return ImageFacts(True, fmt, tuple(chain))


def lookup_user(name: str) -> User | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return User(name, pw.pw_uid, pw.pw_gid, tuple(sorted(groups)))


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


def state_base(uid: int) -> str:
    """Where running VMs keep pid, lock and QMP socket: one directory per VM name."""
    if os.environ.get("VMRUN_STATE_DIR"):
        return os.environ["VMRUN_STATE_DIR"]
    if uid == 0:
        return "/run/vmrun"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return f"{runtime}/vmrun" if runtime else f"/tmp/vmrun-{uid}"


def data_base(uid: int) -> str:
    """Where VMs keep what must survive a reboot of the host (the UEFI variable store)."""
    if os.environ.get("VMRUN_DATA_DIR"):
        return os.environ["VMRUN_DATA_DIR"]
    if uid == 0:
        return "/var/lib/vmrun"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return f"{data}/vmrun"


def gather(
    config: Config,
    root: str | os.PathLike[str] = "/",
    qemu_caps: Callable[[str], QemuCaps | None] = probe,
    launcher: Launcher | None = None,
) -> HostFacts:
    """Everything the plan needs to know about this host for `config`."""
    host = Host(root)
    caps = qemu_caps(config.vm.qemu)
    launcher = launcher or current_launcher()
    missing = tuple(str(p) for p in (config.vm.kernel, config.vm.initrd) if p is not None and not p.is_file())
    try:
        interfaces = frozenset(os.listdir(host.under("/sys/class/net")))
    except OSError:
        interfaces = frozenset()
    return HostFacts(
        root=str(root),
        qemu=caps,
        qemu_name=config.vm.qemu,
        dev_iommu=host.node("/dev/iommu"),
        vfio_container=host.node("/dev/vfio/vfio"),
        devices={d.id: host.device(d) for d in config.vfio},
        run_as=lookup_user(config.vm.user) if config.vm.user else None,
        launcher=launcher,
        missing_files=missing,
        state_base=state_base(launcher.uid),
        data_base=data_base(launcher.uid),
        uefi=find_uefi(host) if config.vm.firmware == "uefi" else None,
        images={d.id: image_facts(d.path) for d in config.disk},
        dev_tun=host.node("/dev/net/tun") if any(n.type == "tap" for n in config.net) else None,
        net_interfaces=interfaces,
    )
