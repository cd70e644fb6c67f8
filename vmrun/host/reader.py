"""Every read of the host that a plan depends on, as plain data (dicts, lists, strings, ints).

host.gather turns this record into the typed HostFacts the planner consumes; the plan cache
reads it again before it reuses a plan, and reuses it only when the record is the same. One
reader for both is what makes the cache safe: a fact the plan can see is a fact the cache
compares. So nothing the plan depends on may be read anywhere else, and nothing here may
import attrs, typing or pathlib: this module is on the cached launch's path.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import resource
import stat

from vmrun.base.cpulist import parse_cpulist
from vmrun.host import sysfs
from vmrun.kernel.opener import describe_type, not_an_image

# typing.TYPE_CHECKING without importing typing, which costs a launch 15 ms; mypy takes any
# TYPE_CHECKING for it.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from vmrun.config.model import Config
    from vmrun.kernel.opener import Opener

    Record = dict[str, Any]

CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24
FIRMWARE_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_BACKING_FORMAT_EXT = 0xE2792ACA
QCOW2_DATA_FILE_EXT = 0x44415441
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
MAX_BACKING_DEPTH = 16
# Linux's IORESOURCE_* flags in a device's `resource` file; lines 0-5 are its BARs.
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000
BAR_COUNT = 6
NODE_DIR = "/sys/devices/system/node"
HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
LOCALE_VARS = ("LANG", "TZ")
# The PATH QEMU and its probes get, and where a bare vm.qemu name is looked up.
MINIMAL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Host:
    """A view of the host under `root` (normally /)."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = os.fspath(root)

    def at(self, path: str) -> str:
        """`path` on the host: under the root directory."""
        return os.path.join(self.root, path.lstrip("/"))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.at(path))

    def node(self, path: str) -> Record | None:
        """A device node as stat shows it: enough to tell whether a user may open it."""
        try:
            st = os.stat(self.at(path))
        except OSError:
            return None
        return {
            "path": path,
            "is_char": stat.S_ISCHR(st.st_mode),
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
        }

    def read(self, path: str) -> str | None:
        try:
            with open(self.at(path)) as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def listdir(self, path: str) -> list[str] | None:
        try:
            return sorted(os.listdir(self.at(path)))
        except OSError:
            return None

    def link_name(self, path: str) -> str | None:
        """The last component of a symlink's target: how sysfs names drivers and groups."""
        try:
            return os.path.basename(os.readlink(self.at(path)))
        except OSError:
            return None

    def cdev(self, sysfs: str) -> str | None:
        """The VFIO cdev of the device at `sysfs` (from its vfio-dev/vfioN), None if it has none."""
        names = [n for n in self.listdir(f"{sysfs}/vfio-dev") or () if n.startswith("vfio")]
        return f"/dev/vfio/devices/{names[0]}" if names else None

    def bars(self, sysfs_dir: str) -> list[list[int | bool]] | None:
        """The device's memory BARs from its `resource` file: [number, size, 64-bit,
        prefetchable] each; None when the kernel does not say (no file)."""
        text = self.read(f"{sysfs_dir}/resource")
        if text is None:
            return None
        bars: list[list[int | bool]] = []
        for index, line in enumerate(text.splitlines()[:BAR_COUNT]):
            try:
                start, end, flags = (int(field, 16) for field in line.split())
            except ValueError:
                continue
            if flags & IORESOURCE_MEM and end > start:
                bars.append(
                    [index, end - start + 1, bool(flags & IORESOURCE_MEM_64), bool(flags & IORESOURCE_PREFETCH)]
                )
        return bars

    def cpu_phys_bits(self) -> int | None:
        """How many physical address bits the host CPU has (/proc/cpuinfo's address sizes)."""
        try:
            with open(self.at("/proc/cpuinfo")) as f:
                for line in f:
                    if line.startswith("address sizes"):
                        m = re.search(r"(\d+) bits physical", line)
                        return int(m[1]) if m else None
        except (OSError, UnicodeDecodeError):
            return None
        return None

    def iommus(self) -> list[list[str | int | None]]:
        """The host's IOMMUs and the widest address each can translate: [name, bits or None].
        Intel's from the MGAW field of its capability register; others are not told here."""
        out: list[list[str | int | None]] = []
        for name in self.listdir("/sys/class/iommu") or ():
            cap = self.read(f"/sys/class/iommu/{name}/intel-iommu/cap")
            bits = None
            if cap is not None:
                try:
                    bits = ((int(cap, 16) >> 16) & 0x3F) + 1
                except ValueError:
                    bits = None
            out.append([name, bits])
        return out

    def group_members(self, group: str) -> list[str]:
        """The addresses of the devices in IOMMU group `group`."""
        return self.listdir(sysfs.group_devices(group)) or []

    def device(self, host: str | None, sysfsdev: str | None) -> Record:
        """A VFIO device named by PCI address or sysfs path: driver, group, cdev, NUMA node."""
        if host is not None:
            path = sysfs.pci_device(host)
        elif sysfsdev is not None:
            path = sysfsdev
        else:
            return {"sysfs": None}  # passed by the caller as an fd: nothing to look up
        if not self.exists(path):
            return {"sysfs": None}
        group = self.link_name(f"{path}/iommu_group")
        members = []
        if group is not None:
            members = [
                [
                    n,
                    self.link_name(f"{sysfs.group_devices(group)}/{n}/driver"),
                    self.read(f"{sysfs.pci_device(n)}/class"),
                ]
                for n in self.group_members(group)
            ]
        cdev = self.cdev(path)
        return {
            "sysfs": path,
            "driver": self.link_name(f"{path}/driver"),
            "iommu_group": group,
            "group_members": members,
            "cdev": cdev,
            "cdev_node": self.node(cdev) if cdev else None,
            "group_node": self.node(f"/dev/vfio/{group}") if group else None,
            "numa_node": device_node(self.read(f"{path}/numa_node")),
            "bars": self.bars(path),
            # "": the kernel knows no way to reset it; None: the kernel does not say.
            "reset_method": self.read(f"{path}/reset_method"),
            "boot_vga": None if (vga := self.read(f"{path}/boot_vga")) is None else vga == "1",
        }

    def uefi(self) -> Record | None:
        """The first plain (no Secure Boot, no SMM) x86_64 UEFI flash build, by descriptor priority."""
        names: dict[str, str] = {}
        for directory in reversed(FIRMWARE_DIRS):  # /etc overrides /usr/share by file name
            for name in self.listdir(directory) or ():
                if name.endswith(".json"):
                    names[name] = f"{directory}/{name}"
        for name in sorted(names):
            try:
                desc = json.loads(self.read(names[name]) or "")
                mapping = desc["mapping"]
                archs = {t["architecture"] for t in desc["targets"]}
                features = set(desc.get("features", []))
                if (
                    "uefi" in desc["interface-types"]
                    and mapping.get("device") == "flash"
                    and "x86_64" in archs
                    and not features & {"secure-boot", "requires-smm", "enrolled-keys"}
                ):
                    return {
                        "descriptor": names[name],
                        "code": mapping["executable"]["filename"],
                        "vars_template": mapping["nvram-template"]["filename"],
                    }
            except (ValueError, KeyError, TypeError):
                continue  # a descriptor we cannot read is one we cannot use
        return None

    def pools(self, directory: str) -> dict[int, Record]:
        """The huge-page pools in a hugepages/ directory (per node or host-wide), by size in KiB."""
        pools = {}
        for name in self.listdir(directory) or ():
            size = numbered(name, "hugepages-", "kB")
            if size is None:
                continue
            total = read_int(self.read(f"{directory}/{name}/nr_hugepages"))
            free = read_int(self.read(f"{directory}/{name}/free_hugepages"))
            if total is not None and free is not None:
                pools[size] = {"size_kib": size, "total": total, "free": free}
        return pools

    def memory(self, allowed_cpus: frozenset[int]) -> Record:
        """NUMA nodes (CPUs, huge pages), the host's huge-page pools, and the CPUs vmrun may use."""
        nodes = {}
        for name in self.listdir(NODE_DIR) or ():
            node = numbered(name, "node", "")
            if node is None:
                continue
            try:
                cpus = parse_cpulist(self.read(f"{NODE_DIR}/{name}/cpulist") or "")
            except ValueError:
                cpus = ()
            nodes[node] = {"id": node, "cpus": list(cpus), "hugepages": self.pools(f"{NODE_DIR}/{name}/hugepages")}
        return {
            "nodes": dict(sorted(nodes.items())),
            "hugepages": self.pools(HUGEPAGES_DIR),
            "allowed_cpus": sorted(allowed_cpus),
        }


def numbered(name: str, prefix: str, suffix: str) -> int | None:
    """N in PREFIX<N>SUFFIX, ASCII digits only, as sysfs names nodes and pools."""
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    digits = name[len(prefix) : len(name) - len(suffix)]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def read_int(text: str | None) -> int | None:
    try:
        return int(text or "")
    except ValueError:
        return None


def device_node(text: str | None) -> int | None:
    """A PCI device's `numa_node` file: -1 (or no file) means the kernel does not know."""
    node = read_int(text)
    return node if node is not None and node >= 0 else None


def read_header(fd: int) -> Record:
    """What an image's first bytes say about it, read from an open fd: its format (qcow2, or
    raw for anything else), its backing file's name and format, a qcow2 external data file
    ("" when the header names none)."""
    header = os.pread(fd, 112, 0)
    if header[:4] != QCOW2_MAGIC or len(header) < 72:
        return {"format": "raw", "backing": None, "backing_format": None, "data_file": None}
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
    return {"format": "qcow2", "backing": backing, "backing_format": backing_format, "data_file": data_file}


def has_protocol(name: str) -> bool:
    """QEMU's own rule (path_has_protocol): a ':' before any '/' names a protocol or json: options."""
    head = name.split("/", 1)[0]
    return ":" in head


def clean(path: str) -> str:
    """`path` without empty and "." components, as pathlib spells it (".." stays: it may cross a symlink)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return ("/" if path.startswith("/") else "") + "/".join(parts) or "."


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


def image(path: str, opener: Opener, writable: bool = False) -> Record:
    """The image at `path` and its backing chain, each layer opened as QEMU would get it.

    The chain comes from the headers, so every file in it is opened with the opener's rights
    (the VM user's, unless the disk is trusted): an image cannot name a file its user may not read.
    """

    def facts(chain: list[list[str]], backing_problem: str | None = None) -> Record:
        return {"exists": True, "detected_format": top_format, "backing": chain, "backing_problem": backing_problem}

    if not os.path.lexists(path):
        return {"exists": False}
    fd, why = open_image(opener, path, os.O_RDWR if writable else os.O_RDONLY)
    if fd is None:
        return {"exists": True, "open_problem": why}
    chain: list[list[str]] = []
    try:
        header = read_header(fd)
        st = os.fstat(fd)
        seen = {(st.st_dev, st.st_ino)}
    finally:
        os.close(fd)
    top_format = header["format"]
    here = os.path.dirname(path)
    while True:
        if header["data_file"] is not None:
            named = f" {header['data_file']!r}" if header["data_file"] else ""
            above = chain[-1][0] if chain else path
            return facts(chain, f"{above} has an external data file{named}, which vmrun does not pass")
        name = header["backing"]
        if name is None:
            return facts(chain)
        if len(chain) == MAX_BACKING_DEPTH:
            return facts(chain, f"the backing chain is deeper than {MAX_BACKING_DEPTH}")
        if has_protocol(name):
            return facts(chain, f"the backing file {name!r} is a protocol or json: name; vmrun passes only local files")
        layer = clean(name if os.path.isabs(name) else os.path.join(here, name))
        fd, why = open_image(opener, layer, os.O_RDONLY)
        if fd is None:
            return facts(chain, f"backing file {layer}: {why}")
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                return facts(chain, f"the backing chain loops at {layer}")
            seen.add((st.st_dev, st.st_ino))
            below = read_header(fd)
        finally:
            os.close(fd)
        # The header's backing format wins over probing, as it does for QEMU.
        fmt = header["backing_format"] if header["backing_format"] in ("qcow2", "raw") else below["format"]
        chain.append([layer, fmt])
        header, here = below, os.path.dirname(layer)


def readable_as(opener: Opener, path: str, flags: int = os.O_RDONLY) -> str | None:
    """None when the opener's user may open the regular file `path` so, else why not."""
    try:
        fd = opener.open(path, flags)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"{opener.who} may not {'read' if flags == os.O_RDONLY else 'open'} it: {e.strerror}"
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    return None if stat.S_ISREG(mode) else f"it is {describe_type(mode)}"


def user(name: str) -> Record | None:
    """A user as the launch switches to it: ids, every group it is in, its home."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return {"name": name, "uid": pw.pw_uid, "gid": pw.pw_gid, "groups": sorted(groups), "home": pw.pw_dir or "/"}


def user_by_uid(uid: int) -> Record | None:
    try:
        return user(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return None


def launcher() -> Record:
    """The process that runs vmrun: who it is and which limits it may change."""
    caps = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "uid": os.geteuid(),
        "cap_sys_resource": bool(caps >> CAP_SYS_RESOURCE & 1),
        "cap_ipc_lock": bool(caps >> CAP_IPC_LOCK & 1),
        "memlock_soft": soft,
        "memlock_hard": hard,
    }


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
    return xdg_base("VMRUN_DATA_DIR", "/var/lib/vmrun", "XDG_DATA_HOME", (".local", "share"), uid)


def cache_base(uid: int) -> str:
    """Where vmrun caches what it probed (QEMU's capabilities)."""
    return xdg_base("VMRUN_CACHE_DIR", "/var/cache/vmrun", "XDG_CACHE_HOME", (".cache",), uid)


def xdg_base(override: str, roots: str, xdg: str, default: tuple[str, ...], uid: int) -> str:
    """vmrun's directory: `override` when set; root's own directory `roots` for root, never
    one the caller's environment names (after `su` or `sudo -E`, an XDG variable is another
    user's, who could point it wherever they like); the user's XDG directory otherwise."""
    if os.environ.get(override):
        return os.path.abspath(os.environ[override])
    if uid == 0:
        return roots
    base = os.environ.get(xdg, "")
    if not os.path.isabs(base):  # unset, or relative: the XDG spec's default
        base = os.path.join(os.path.expanduser("~"), *default)
    return f"{base.rstrip('/')}/vmrun"


def resolve(binary: str) -> str | None:
    """QEMU's binary: a path as given, or a name looked up on the minimal PATH."""
    if "/" in binary:
        return os.path.abspath(binary) if os.access(binary, os.X_OK) else None
    for directory in MINIMAL_PATH.split(os.pathsep):
        path = os.path.join(directory, binary)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def binary(name: str) -> Record | None:
    """Which file QEMU's binary is: the capabilities probed from it are valid while this holds."""
    path = resolve(name)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {
        "path": path,
        "real": os.path.realpath(path),
        "id": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns],
    }


def query(config: Config) -> Record:
    """What of the host a config makes the plan look at, as plain data (kept with a cached plan)."""
    vm = config.vm
    return {
        "user": vm.user,
        "qemu": vm.qemu,
        "kernel": None if vm.kernel is None else str(vm.kernel),
        "initrd": None if vm.initrd is None else str(vm.initrd),
        "uefi_vars": None if vm.uefi_vars is None else str(vm.uefi_vars),
        "uefi": vm.firmware == "uefi",
        "vfio": [[d.id, d.host, d.sysfsdev] for d in config.vfio],
        "disks": [[d.id, str(d.path), d.trusted, not d.readonly] for d in config.disk],
        "tap": any(n.type == "tap" for n in config.net),
    }


def read(
    q: Record,
    root: str | os.PathLike[str],
    as_user: Opener,
    as_vmrun: Opener,
    launcher_record: Record | None = None,
    allowed_cpus: frozenset[int] | None = None,
) -> Record:
    """Everything the plan needs to know about this host for the query `q`.

    Files QEMU will get are opened through `as_user` (the VM user's rights), trusted disks
    through `as_vmrun`. `allowed_cpus` defaults to the CPUs this process may run on.
    """
    host = Host(root)
    me = launcher_record or launcher()
    unreadable = {
        key: why
        for key in ("kernel", "initrd")
        if q[key] is not None and (why := readable_as(as_user, q[key])) is not None
    }
    # A variable store the config names is the VM user's, made at launch when missing.
    if q["uefi_vars"] is not None and os.path.lexists(q["uefi_vars"]):
        why = readable_as(as_user, q["uefi_vars"], os.O_RDWR)
        if why is not None:
            unreadable["uefi_vars"] = why
    return {
        "root": os.fspath(root),
        "qemu_binary": binary(q["qemu"]),
        "dev_iommu": host.node("/dev/iommu"),
        "vfio_container": host.node("/dev/vfio/vfio"),
        "devices": {id_: host.device(addr, sysfsdev) for id_, addr, sysfsdev in q["vfio"]},
        "run_as": user(q["user"]) if q["user"] else None,
        "launcher": me,
        "unreadable": {f"vm.{key}": why for key, why in unreadable.items()},
        "state_base": state_base(me["uid"]),
        "data_base": data_base(me["uid"]),
        "uefi": host.uefi() if q["uefi"] else None,
        "images": {
            id_: image(path, as_vmrun if trusted else as_user, writable) for id_, path, trusted, writable in q["disks"]
        },
        "dev_tun": host.node("/dev/net/tun") if q["tap"] else None,
        "net_interfaces": host.listdir("/sys/class/net") or [],
        "caller": user_by_uid(me["uid"]),
        "locale": [[k, os.environ[k]] for k in LOCALE_VARS if os.environ.get(k)],
        # A config's `~/disk.img` is the caller's home: the same config means another file under another HOME.
        "home": os.environ.get("HOME"),
        "memory": host.memory(frozenset(os.sched_getaffinity(0)) if allowed_cpus is None else allowed_cpus),
        "cpu_phys_bits": host.cpu_phys_bits(),
        "iommus": host.iommus(),
        "kernel": host.read("/proc/sys/kernel/osrelease"),
    }
