"""`vmrun import` of a QEMU command line, as `virsh domxml-from-native` reads one.

What vmrun models is mapped to its keys: -name, -machine, -accel, -m, -smp, -cpu, iommufd
objects, VFIO devices, disks (-drive, or -blockdev chains over files or fd sets), user and
tap networks, direct kernel boot, OVMF firmware, console and display. Whatever else is on
the command line is kept, in order, in vm.args with a comment saying why, so the VM keeps
it. An fd on the command line is resolved through what it is open on (`FdInfo`, from
/proc/PID/fd for `--pid`): /dev/iommu and VFIO cdevs become devices vmrun opens itself,
files become paths, a tap fd its interface; an fd nothing is known of stays the caller's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from vmrun.base.sizes import SizeError, parse_size
from vmrun.config import keytable, parsers, rules
from vmrun.config.model import DRIVERS
from vmrun.host import facts as host
from vmrun.host import pci, reader
from vmrun.plan.planner import derived_mac, hotplug_port
from vmrun.qemu import devices
from vmrun.qemu.cmdline import FLAGS, FdInfo, Props, keyvals, option_props, options
from vmrun.tools import import_ram
from vmrun.tools.imported import shown

# The QEMU disk device -> the [[disk]] interface vmrun would write it for.
DISK_INTERFACES = {driver: interface for interface, driver in devices.DISK_DEVICES.items()}
HOSTFWD_RE = re.compile(r"(tcp|udp)?:([0-9.]*):([0-9]+)-:([0-9]+)")
UNMAPPED = "not modelled by vmrun: kept as is"
# Options vmrun does not model that libvirt writes for what a domain says: kept, so the
# guest sees what it saw.
KEPT = {
    "-uuid": "the guest's UUID (libvirt's <uuid>): kept as is",
    "-rtc": "the guest's clock (libvirt's <clock>): kept as is",
    "-boot": "the boot order (libvirt's <boot>): kept as is",
    "-numa": "guest NUMA nodes (libvirt's <cpu><numa>): kept with their RAM objects",
    "-global": "a device default (libvirt's <pm>, <clock> timers or <features>): kept as is",
}
QEMU_DEFAULT_MEMORY = "128M"  # what QEMU gives an x86 guest without -m
# -smp's topology keys: one socket of N cores is what the guest gets from `cpus = N` too.
TOPOLOGY = ("sockets", "dies", "clusters", "cores", "threads", "maxcpus", "books", "drawers", "modules")


def typed(value: str) -> str | int | bool:
    """A device property as the config writes it: on/off as booleans, exact integers as integers."""
    if value in ("on", "off"):
        return value == "on"
    if re.fullmatch(r"-?[1-9][0-9]*|0", value) and parsers.PROP_INT_MIN <= int(value) <= parsers.PROP_INT_MAX:
        return int(value)
    return value


def on(props: dict[str, str | None], key: str) -> bool:
    return props.get(key) in ("on", "true", "yes")


class Importer:
    def __init__(self, argv: list[str], fds: Mapping[int, FdInfo], host_view: host.Host, name: str | None) -> None:
        self.binary, self.opts = options(argv)
        self.fds = fds
        self.host = host_view
        self.used: set[int] = set()
        self.why: dict[int, str] = {}
        self.vm: dict[str, Any] = {}
        self.iommufd: list[dict[str, Any]] = []
        self.vfio: list[dict[str, Any]] = []
        self.disk: list[dict[str, Any]] = []
        self.net: list[dict[str, Any]] = []
        self.name = name
        self.blockdevs: dict[str, tuple[int, dict[str, str | None]]] = {}
        self.drives: dict[str, tuple[int, dict[str, str | None]]] = {}
        self.fdsets: dict[str, tuple[int, int]] = {}
        self.chardevs: dict[str, tuple[int, Props]] = {}
        self.netdevs: dict[str, tuple[int, Props]] = {}
        self.machine_extra: Props = []
        self.ram_imported = False  # vmrun's guest-ram backend became hugepages/prealloc/numa
        self.hotplug_ports = 0
        self.console_mapped = False
        self.args: list[tuple[str, list[str]]] = []
        self.origins: dict[str, str] = {}  # key path -> the option it came from
        # What libvirt leaves on every command line it writes: its monitor's chardev, its master
        # key, its thread names. Only there are -S, -no-shutdown and root ports libvirt's own.
        self.libvirt = any(
            ("charmonitor" in opt[1] or "masterKey0" in opt[1] or "debug-threads=on" in opt[1])
            for opt in self.opts
            if len(opt) == 2
        )
        # Options left out because vmrun supplies its own (libvirt's monitor, its RAM object):
        # (why, option) each, said in comments.
        self.dropped: list[tuple[str, list[str]]] = []
        # libvirt's root ports (one per device): gone, with every bus= naming them.
        self.foreign_ports: set[str] = set()
        self.monitor_chardevs: set[str] = set()
        # The RAM object -machine memory-backend= names, when it is not vmrun's own (libvirt's pc.ram).
        self.ram_object: str | None = None
        self.ram_object_mapped = False
        for i, opt in enumerate(self.opts):
            if len(opt) < 2:
                continue
            props = option_props(opt[0], opt[1])
            if opt[0] == "-blockdev" and (node := dict(props).get("node-name")):
                self.blockdevs[node] = (i, dict(props))
            elif opt[0] == "-drive" and (drive := dict(props).get("id")):
                self.drives[drive] = (i, dict(props))
            elif opt[0] == "-add-fd" and (s := dict(props).get("set")) and (fd := dict(props).get("fd", "")):
                if fd and fd.isdigit():
                    self.fdsets[s] = (i, int(fd))
            elif self.libvirt and opt[0] == "-device" and props[0] == ("pcie-root-port", None):
                port = dict(props).get("id") or ""
                if not rules.HOTPLUG_PORT_RE.fullmatch(port):
                    self.foreign_ports.add(port)
            elif opt[0] in ("-machine", "-M") and (ram := dict(props).get("memory-backend")) != rules.GUEST_RAM:
                self.ram_object = ram
            elif opt[0] == "-mon" and (chardev := dict(props).get("chardev")) and chardev != rules.QMP_CHARDEV:
                self.monitor_chardevs.add(chardev)
            elif opt[0] == "-chardev" and (cid := dict(props).get("id")):
                self.chardevs[cid] = (i, props)
            elif opt[0] == "-netdev" and (nid := dict(props).get("id")):
                self.netdevs[nid] = (i, props)

    def use(self, *indices: int) -> None:
        self.used.update(indices)

    def fd_note(self, what: str, fd: str, kind: str) -> None:
        """An fd the command line names that no /proc entry resolved: the config keeps it as the
        caller's, and a comment says so."""
        self.dropped.append(
            (
                f"note: {what} takes fd {fd}, {kind} of the process that ran this command line: run vmrun with"
                " that fd open, or import with --pid PID (which resolves it), or write the device by host=",
                [],
            )
        )

    def libvirt_drop(self, i: int, why: str) -> None:
        if self.libvirt:
            self.drop(i, why)

    def drop(self, i: int, why: str) -> None:
        """Option `i` is left out, with `why` in a comment: vmrun supplies its own."""
        self.dropped.append((why, list(self.opts[i])))
        self.use(i)

    def keep(self, i: int, why: str) -> None:
        """Option `i` goes to vm.args with `why` as its comment."""
        self.why[i] = why

    def fd_path(self, fd: str | None) -> str | None:
        if fd is None or not fd.isdigit():
            return None
        info = self.fds.get(int(fd))
        return info.path if info else None

    def file_of(self, filename: str | None) -> tuple[str | None, list[int]]:
        """The path behind a block node's filename (through an fd set), and the options used."""
        if filename is None:
            return None, []
        m = re.fullmatch(r"/dev/fdset/([0-9]+)", filename)
        if not m:
            return filename, []
        if m[1] not in self.fdsets:
            return None, []
        i, fd = self.fdsets[m[1]]
        return self.fd_path(str(fd)), [i]

    def run(self) -> dict[str, Any]:
        handlers = {
            "-name": self.name_opt,
            "-machine": self.machine,
            "-M": self.machine,
            "-accel": self.accel,
            "-enable-kvm": lambda i, v: self.set_accel(i, "kvm"),
            "-m": self.memory,
            "-smp": self.smp,
            "-cpu": self.cpu,
            "-global": self.global_opt,
            "-fw_cfg": self.fw_cfg,
            "-object": self.object_opt,
            "-device": self.device,
            "-drive": self.drive,
            "-kernel": lambda i, v: self.vm_path(i, "kernel", v),
            "-initrd": lambda i, v: self.vm_path(i, "initrd", v),
            "-append": lambda i, v: self.vm_path(i, "append", v),
            "-bios": self.bios,
            "-pflash": self.pflash,
            "-serial": self.serial,
            "-display": self.display,
            "-vnc": lambda i, v: self.set_display(i, "vnc"),
            "-nographic": self.nographic,
            "-sandbox": self.sandbox,
            "-nodefaults": lambda i, v: self.use(i),
            "-no-user-config": lambda i, v: self.use(i),
            "-mon": self.monitor,
            "-S": lambda i, v: self.libvirt_drop(i, "QEMU starts paused for libvirt; `vmrun run --paused` does that"),
            "-no-shutdown": lambda i, v: self.libvirt_drop(i, "keeps QEMU after the guest powers off, for libvirt"),
            "-msg": lambda i, v: self.libvirt_drop(i, "the format of QEMU's messages in libvirt's log"),
            "-overcommit": self.overcommit,
        }
        for i, opt in enumerate(self.opts):
            if i in self.used:
                continue
            handler = handlers.get(opt[0])
            if handler is not None and (len(opt) == 2 or opt[0] in FLAGS):
                before = dict(self.vm), [len(entries) for entries in self.sections().values()]
                handler(i, opt[1] if len(opt) == 2 else "")
                self.note_origins(shown(opt), *before)
        if "memory" not in self.vm:
            self.vm["memory"] = QEMU_DEFAULT_MEMORY
            self.dropped.append((f"note: no -m: QEMU's default for x86, {QEMU_DEFAULT_MEMORY}", []))
        self.finish_machine()
        # Empty root ports as vmrun makes them: a number other than its default is a key
        # (0 too, so the guest's PCI layout stays as the command line had it).
        if self.hotplug_ports != rules.hotplug_slots(self.vm.get("machine", "q35"), None):
            self.vm["hotplug_slots"] = self.hotplug_ports
        if not self.console_mapped:
            self.vm["console"] = "none"  # no serial port vmrun would make
        if self.binary is not None and os.path.basename(self.binary) != "qemu-system-x86_64":
            self.vm["qemu"] = self.binary
        self.vm["name"] = self.name or self.vm.get("name") or "imported"
        kept = [i for i in range(len(self.opts)) if i not in self.used]
        if any(self.opts[i][0] == "-numa" for i in kept) and not {"numa", "hugepages", "prealloc"} & set(self.vm):
            # Guest NUMA nodes bring their own RAM objects; vmrun's own backend would be a second.
            self.vm["numa"] = "off"
            self.vm["shared_ram"] = False
            note = 'note: guest NUMA nodes (-numa) keep their RAM objects: numa = "off", shared_ram = false'
            self.dropped.append((note, []))
        order = [k.name for k in keytable.VM_KEYS]
        vm = dict(sorted(self.vm.items(), key=lambda kv: order.index(kv[0])))
        self.args = [(self.kept_why(i), list(self.opts[i])) for i in kept]
        doc: dict[str, Any] = {"vm": vm}
        for key, entries in self.sections().items():
            if entries:
                doc[key] = entries
        vm["args"] = [token for _, tokens in self.args for token in tokens]
        return doc

    def kept_why(self, i: int) -> str:
        """Why option `i` stays in vm.args, and what an fd on it is: the caller's (without
        --pid), or what /proc showed it open on."""
        opt = self.opts[i]
        why = self.why.get(i) or KEPT.get(opt[0], UNMAPPED)
        fds = [v for k, v in option_props(opt[0], opt[1]) if k == "fd" and v] if len(opt) == 2 else []
        for fd in fds:
            info = self.fds.get(int(fd)) if fd.isdigit() else None
            if info is not None and info.path:
                why += f"; fd {fd} was open on {info.path} (vmrun passes only fds it opens: give that path)"
            else:
                why += f"; fd {fd} is the caller's: run vmrun with it open, or import with --pid PID"
        return why

    def sections(self) -> dict[str, list[dict[str, Any]]]:
        return {"iommufd": self.iommufd, "vfio": self.vfio, "disk": self.disk, "net": self.net}

    def note_origins(self, option: str, vm: dict[str, Any], counts: list[int]) -> None:
        """Every key an option's handler set, and every entry it added, came from `option`."""
        for key, value in self.vm.items():
            if key not in vm or vm[key] != value:
                self.origins[f"vm.{key}"] = option
        for (section, entries), count in zip(self.sections().items(), counts, strict=True):
            for n in range(count, len(entries)):
                self.origins[f"{section}[{n}]"] = option

    # -- the VM ------------------------------------------------------------------------

    def name_opt(self, i: int, value: str) -> None:
        # libvirt's debug-threads=on names QEMU's threads, for its own debugging.
        props = [kv for kv in keyvals(value) if kv != ("debug-threads", "on")]
        names = [v if k == "guest" else k for k, v in props if k == "guest" or v is None]
        if names and names[0] and len(props) == 1:
            self.vm["name"] = names[0]
            self.use(i)

    def machine(self, i: int, value: str) -> None:
        props = keyvals(value)
        for k, v in props:
            if v is None or k == "type":
                self.vm["machine"] = v if k == "type" else k
            elif k == "accel" and v in rules.ACCELS:
                self.vm["accel"] = v
            else:
                self.machine_extra.append((k, v))
        self.use(i)

    def finish_machine(self) -> None:
        extra = self.machine_extra
        if self.ram_imported:
            # vmrun adds both: the backend, and aux-ram-share with shared RAM.
            extra = [kv for kv in extra if kv not in (("memory-backend", rules.GUEST_RAM), ("aux-ram-share", "on"))]
        if self.ram_object_mapped:
            extra = [kv for kv in extra if kv != ("memory-backend", self.ram_object)]  # dropped with it
        if self.vm.get("viommu") == "intel" and self.vm.get("accel", "kvm") == "kvm":
            extra = [(k, v) for k, v in extra if (k, v) != ("kernel-irqchip", "split")]  # vmrun adds it
        if self.pflash_nodes(extra):
            extra = [(k, v) for k, v in extra if k not in ("pflash0", "pflash1")]
        if extra:
            text = ",".join(f"{k}={v.replace(',', ',,')}" if v is not None else k for k, v in extra)
            self.opts.append(("-machine", text))
            self.keep(len(self.opts) - 1, "machine properties vmrun does not model")

    def pflash_nodes(self, extra: Props) -> bool:
        """UEFI from -machine pflash0=NODE,pflash1=NODE: the code is vmrun's to choose, the
        variable store is the config's uefi_vars unless it is vmrun's own copy."""
        nodes = dict(extra)
        code = nodes.get("pflash0")
        if code is None or code not in self.blockdevs:
            return False
        self.vm["firmware"] = "uefi"
        self.use(*self.chain(code)[1])
        vars_node = nodes.get("pflash1")
        if vars_node is not None and vars_node in self.blockdevs:
            path, used = self.chain(vars_node)
            self.use(*used)
            self.uefi_vars(path)
        return True

    def uefi_vars(self, path: str | None) -> None:
        name = self.name or self.vm.get("name") or ""
        own = f"{reader.data_base(os.geteuid())}/{name}/OVMF_VARS.fd"
        if path is not None and path != own:
            self.vm["uefi_vars"] = path

    def chain(self, node: str) -> tuple[str | None, list[int]]:
        """The file under a format node (or a file node), and every option of its chain,
        backing layers included: vmrun finds those in the image header again."""
        i, props = self.blockdevs[node]
        used = [i]
        if props.get("driver") != "file":
            below = props.get("file")
            if below is None or below not in self.blockdevs:
                return None, used
            path, more = self.chain(below)
            used += more
            backing = props.get("backing")
            if backing and backing in self.blockdevs:
                used += self.chain(backing)[1]
            return path, used
        path, fdset = self.file_of(props.get("filename"))
        return path, used + fdset

    def set_accel(self, i: int, accel: str) -> None:
        self.vm["accel"] = accel
        self.use(i)

    def accel(self, i: int, value: str) -> None:
        props = keyvals(value)
        if len(props) == 1 and props[0][1] is None and props[0][0] in rules.ACCELS:
            self.set_accel(i, props[0][0])
        else:
            self.keep(i, "accelerator properties vmrun does not model")

    def memory(self, i: int, value: str) -> None:
        memory = import_ram.memory_of(keyvals(value))
        if memory is None:
            self.keep(i, "memory options beyond the size vmrun does not model")
            return
        self.vm["memory"], hotplug = memory
        if hotplug:
            self.dropped.append(
                (f"memory hot-plug ({', '.join(hotplug)}): vmrun has none; the guest gets its memory at start", [])
            )
        self.use(i)

    def smp(self, i: int, value: str) -> None:
        props = keyvals(value)
        cpus = next((v if k == "cpus" else k for k, v in props if k == "cpus" or v is None), None)
        topology = {k: v for k, v in props[1:] if k in TOPOLOGY and v and v.isdigit()}
        if cpus is None or not cpus.isdigit() or len(props) != 1 + len(topology):
            self.keep(i, "a CPU topology vmrun does not model")
            return
        self.vm["cpus"] = int(cpus)
        if (
            any(v != "1" for k, v in topology.items() if k not in ("cores", "maxcpus"))
            or topology.get("cores", cpus) != cpus
            or topology.get("maxcpus", cpus) != cpus
        ):
            # Several sockets, threads or room for more CPUs: vmrun's -smp N comes first, and
            # QEMU merges this one over it, so the guest sees the topology it had.
            self.keep(i, "the CPU topology (vmrun says one socket of `cpus` cores)")
        else:
            self.use(i)

    def cpu(self, i: int, value: str) -> None:
        # phys-bits is vmrun's to set, from the BARs the guest must hold (plan/address_space.py);
        # migratable=on is QEMU's default for -cpu host, which libvirt writes out.
        model = re.sub(r",phys-bits=[0-9]+$", "", value).removesuffix(",migratable=on")
        if rules.MACHINE_RE.fullmatch(model):
            if model != "qemu64" or model == value:  # qemu64 with phys-bits: vmrun's way of saying TCG's default
                self.vm["cpu"] = model
            self.use(i)
        else:
            self.keep(i, "CPU features vmrun does not model")

    def global_opt(self, i: int, value: str) -> None:
        if value.startswith("q35-pcihost.pci-hole64-size="):
            self.use(i)  # vmrun sizes the 64-bit window from the devices' BARs and hotplug_reserve
        else:
            self.keep(i, UNMAPPED)

    def fw_cfg(self, i: int, value: str) -> None:
        if value.startswith("name=opt/ovmf/X-PciMmio64Mb,"):
            self.use(i)  # as -global q35-pcihost.pci-hole64-size: vmrun sizes OVMF's aperture itself
        else:
            self.keep(i, UNMAPPED)

    def vm_path(self, i: int, key: str, value: str) -> None:
        self.vm[key] = value
        self.use(i)

    def bios(self, i: int, value: str) -> None:
        if re.search(r"ovmf|edk2", value, re.IGNORECASE):
            self.vm["firmware"] = "uefi"  # vmrun picks the OVMF build from QEMU's firmware descriptors
            self.use(i)

    def pflash(self, i: int, value: str) -> None:
        if self.vm.get("firmware") != "uefi":
            self.bios(i, value)
        else:
            self.uefi_vars(value)
            self.use(i)

    def serial(self, i: int, value: str) -> None:
        if value in ("mon:stdio", "stdio"):
            self.vm.pop("console", None)  # the default
            self.console_mapped = True
            self.use(i)
        elif value.startswith("chardev:") and value[8:] in self.chardevs:
            j, props = self.chardevs[value[8:]]
            if props[0] == ("socket", None):
                self.vm["console"] = "socket"
                self.console_mapped = True
                self.use(i, j)

    def display(self, i: int, value: str) -> None:
        kind = keyvals(value)[0][0]
        if kind == "none" and len(keyvals(value)) == 1:
            self.use(i)
        elif kind in ("gtk", "sdl") and len(keyvals(value)) == 1:
            self.set_display(i, kind)

    def set_display(self, i: int, kind: str) -> None:
        self.vm["display"] = kind
        self.use(i)

    def nographic(self, i: int, value: str) -> None:
        self.console_mapped = True  # the serial port on stdio, no display
        self.use(i)

    def sandbox(self, i: int, value: str) -> None:
        if keyvals(value)[0] == ("off", None):
            self.vm["sandbox"] = False
        self.use(i)  # on: vmrun's own, stricter than most

    def monitor(self, i: int, value: str) -> None:
        props = dict(keyvals(value))
        chardev = props.get("chardev") or ""
        if chardev == rules.QMP_CHARDEV and rules.QMP_CHARDEV in self.chardevs:
            self.use(i, self.chardevs[rules.QMP_CHARDEV][0])
        elif chardev in self.chardevs and props.get("mode") == "control":
            self.drop(i, "libvirt's monitor: vmrun has its own QMP socket")
            self.drop(self.chardevs[chardev][0], "the socket of libvirt's monitor")

    def overcommit(self, i: int, value: str) -> None:
        props = keyvals(value)
        if not self.libvirt:
            self.keep(i, UNMAPPED)
        elif props == [("mem-lock", "off")]:
            self.drop(i, "vmrun sets the memlock limit itself (vm.memlock)")
        elif props == [("mem-lock", "on")]:
            self.drop(
                i,
                "libvirt's <locked/>: QEMU would lock all its memory; vmrun sets the limit VFIO needs"
                ' (memlock = "auto"), or write memlock = "unlimited"',
            )
        else:
            self.keep(i, UNMAPPED)

    # -- objects and devices --------------------------------------------------------------

    def libvirt_ram(self, i: int, kind: str, rest: dict[str, str | None]) -> bool:
        """libvirt's guest RAM object (-machine memory-backend=pc.ram) becomes the keys; the
        object goes, as vmrun makes its own."""
        if rest.get("id") != self.ram_object or self.ram_object is None:
            return False
        keys = import_ram.libvirt_ram_keys(kind, rest)
        if keys is None:
            return False
        self.vm.update(keys)
        self.ram_object_mapped = True
        self.drop(i, "libvirt's guest RAM object: vmrun makes its own (from hugepages, prealloc, numa)")
        return True

    def ram_backend(self, i: int, driver: str, rest: dict[str, str | None]) -> bool:
        """vmrun's own guest RAM backend (rules.GUEST_RAM) back to hugepages, prealloc, numa."""
        keys = import_ram.vmrun_ram_keys(driver, rest)
        if keys is None:
            return False
        self.vm.update(keys)
        self.ram_imported = True
        self.use(i)
        return True

    def object_opt(self, i: int, value: str) -> None:
        props = option_props("-object", value)
        rest = dict(props[1:])
        if props[0][0] in (devices.RAM_HUGE, devices.RAM_PLAIN) and self.ram_backend(i, props[0][0], rest):
            return
        if props[0] == ("secret", None) and rest.get("id") == "masterKey0":
            self.drop(i, "libvirt's master key for the secrets it passes")
            return
        if self.libvirt_ram(i, props[0][0], rest):
            return
        if props[0] != ("iommufd", None) or "id" not in rest or set(rest) - {"id", "fd"}:
            return
        entry: dict[str, Any] = {"id": rest["id"]}
        fd = rest.get("fd")
        if fd is not None and self.fd_path(fd) != "/dev/iommu":
            if not fd.isdigit():
                return
            entry["fd"] = int(fd)  # the caller's: vmrun passes it on
            self.fd_note(f"iommufd {entry['id']}", fd, "/dev/iommu")
        self.iommufd.append(entry)
        self.use(i)

    def device(self, i: int, value: str) -> None:
        props = option_props("-device", value)
        driver = props[0][0]
        if driver == "pcie-root-port" and dict(props[1:]).get("id") in self.foreign_ports:
            self.drop(
                i, "libvirt's root port for a device: vmrun puts devices on the root bus (hotplug_slots: empty ones)"
            )
            return
        if dict(props[1:]).get("bus") in self.foreign_ports:
            # On one of libvirt's root ports, which are gone: on the root bus, where vmrun puts it.
            props = [(k, v) for k, v in props if k not in ("bus", "addr", "multifunction")]
        if driver == "vfio-pci-nohotplug":  # libvirt's for a device that must not be unplugged
            driver, props = "vfio-pci", [("vfio-pci", None), *props[1:]]
        rest = dict(props[1:])
        if driver in DRIVERS:
            self.vfio_device(i, driver, props[1:])
        elif driver == devices.VIOMMU_DEVICES["intel"] and set(rest) <= {"id", "intremap", "caching-mode", "aw-bits"}:
            self.vm["viommu"] = "intel"
            self.use(i)
        elif driver == devices.VIOMMU_DEVICES["virtio"] and set(rest) <= {"id"}:
            self.vm["viommu"] = "virtio"
            self.use(i)
        elif self.same_device(props, hotplug_port(self.hotplug_ports, self.hotplug_reserve(rest))):
            self.hotplug_ports += 1
            if rest.get("pref64-reserve"):
                self.vm["hotplug_reserve"] = rest["pref64-reserve"]
            self.use(i)
        elif driver == devices.VIDEO and rest == {"id": rules.VIDEO}:
            self.use(i)  # vmrun adds it for a display
        elif driver == devices.SCSI_CONTROLLER and rest == {"id": rules.SCSI_CONTROLLER}:
            self.use(i)  # vmrun adds it for scsi disks
        elif driver in DISK_INTERFACES and "drive" in rest:
            self.disk_device(i, DISK_INTERFACES[driver], rest)
        elif driver in devices.NICS and "netdev" in rest:
            self.net_device(i, driver, rest)

    @staticmethod
    def same_device(props: Props, planned: str) -> bool:
        """Whether a -device (either syntax, properties in any order) is the one vmrun plans as `planned`."""
        theirs = keyvals(planned)
        return props[0] == theirs[0] and sorted(props[1:], key=str) == sorted(theirs[1:], key=str)

    def vfio_device(self, i: int, driver: str, props: Props) -> None:
        entry: dict[str, Any] = {"id": f"hostdev{len(self.vfio)}"}
        if driver != "vfio-pci":
            entry["driver"] = driver
        extra: dict[str, Any] = {}
        for k, v in props:
            if v is None:
                return
            if k in ("id", "host", "sysfsdev", "iommufd"):
                entry[k] = v
            elif k == "fd":
                path = self.fd_path(v)
                address = pci.cdev_owner(self.host, path) if path else None
                if address is not None:
                    entry["host"] = address
                elif v.isdigit():
                    entry["fd"] = int(v)
                    self.fd_note(f"vfio {entry['id']}", v, "a VFIO cdev")
                else:
                    return
            else:
                extra[k] = typed(v)
        if extra:
            entry["props"] = extra
        self.vfio.append(entry)
        self.use(i)

    def hotplug_reserve(self, props: Mapping[str, str | None]) -> int | None:
        """The window a root port reserves, when it is one vmrun would make: the first port's, which
        every other must repeat."""
        text = props.get("pref64-reserve")
        if text is None or self.vm.get("hotplug_reserve", text) != text:
            return None
        try:
            return parse_size(text)
        except SizeError:
            return None

    def disk_device(self, i: int, interface: str, props: dict[str, str | None]) -> None:
        node = props["drive"] or ""
        entry: dict[str, Any] = {"id": props.get("id") or f"disk{len(self.disk)}"}
        if node in self.blockdevs:
            top = self.blockdevs[node][1]
            path, used = self.chain(node)
            fmt = top.get("driver") if top.get("driver") != "file" else "raw"
            readonly, direct, no_flush = on(top, "read-only"), on(top, "cache.direct"), on(top, "cache.no-flush")
        elif node in self.drives:
            j, drive = self.drives[node]
            path, used, fmt = drive.get("file"), [j], drive.get("format") or "raw"
            readonly, direct, no_flush = (
                on(drive, "readonly"),
                drive.get("cache") == "none",
                drive.get("cache") == "unsafe",
            )
        else:
            return
        # write-cache=on: what libvirt writes with every cache mode, QEMU's default for the host's cache.
        extra = (
            set(props)
            - {"id", "drive", "serial", "bus", "bootindex"}
            - ({"write-cache"} if props.get("write-cache") == "on" else set())
        )
        if path is None or fmt not in ("raw", "qcow2") or extra:
            return
        entry["path"] = path
        if fmt != "raw":
            entry["format"] = fmt
        if interface != "virtio-blk":
            entry["interface"] = interface
        if readonly:
            entry["readonly"] = True
        if direct or no_flush:
            entry["cache"] = "none" if direct else "unsafe"
        serial = props.get("serial")
        if serial and not (interface == "nvme" and serial == entry["id"]):
            entry["serial"] = serial
        self.disk.append(entry)
        self.use(i, *used)

    def drive(self, i: int, value: str) -> None:
        """-drive file=PATH,if=virtio (if=none is mapped with the device that names it)."""
        props = dict(keyvals(value))
        kind = props.get("if", "ide")
        if kind == "pflash" and props.get("file"):
            self.pflash(i, props["file"] or "")
        elif (
            kind == "virtio" and props.get("file") and set(props) <= {"file", "format", "if", "id", "readonly", "cache"}
        ):
            self.drives[f"drive-{i}"] = (i, props)
            self.disk_device(i, "virtio-blk", {"drive": f"drive-{i}", "id": props.get("id")})

    def net_device(self, i: int, model: str, props: dict[str, str | None]) -> None:
        netdev = props["netdev"] or ""
        if netdev not in self.netdevs or set(props) - {"id", "netdev", "mac", "bootindex"}:
            return
        j, nprops = self.netdevs[netdev]
        kind, rest = nprops[0][0], nprops[1:]
        entry: dict[str, Any] = {"id": netdev}
        if kind == "user":
            forwards = []
            for k, v in rest:
                m = HOSTFWD_RE.fullmatch(v or "") if k == "hostfwd" else None
                if k == "id":
                    continue
                if m is None:
                    return
                forwards.append(f"{m[1] or 'tcp'}:{m[2] or '0.0.0.0'}:{m[3]}:{m[4]}")
            if forwards:
                entry["forwards"] = forwards
        elif kind == "tap":
            entry["type"] = "tap"
            for k, v in rest:
                if k == "ifname":
                    entry["ifname"] = v
                elif k == "fd" and v and v.isdigit() and (info := self.fds.get(int(v))) and info.ifname:
                    entry["ifname"] = info.ifname
                elif (k, v) not in (("id", netdev), ("script", "no"), ("downscript", "no")):
                    return
            if "ifname" not in entry:
                return
        else:
            return
        name = self.name or self.vm.get("name") or ""
        mac = props.get("mac")
        if mac and mac.lower() != derived_mac(name, netdev):
            entry["mac"] = mac
        if model != "virtio-net-pci":
            entry["model"] = model
        self.net.append(entry)
        self.use(i, j)
