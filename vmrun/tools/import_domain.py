"""`vmrun import --from-libvirt`: a config from a libvirt domain's XML (`virsh dumpxml`).

The elements vmrun models become its keys; every other element is named in a comment that
says why it was left out, and `<qemu:commandline>` arguments go to vm.args as they are.
The XML is read with defusedxml: no DTD, no entities, nothing fetched.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any
from xml.etree.ElementTree import Element

from vmrun.base.errors import UsageError
from vmrun.base.sizes import HUGEPAGE_SIZES, format_size
from vmrun.config import keytable, rules
from vmrun.qemu.cmdline import options
from vmrun.tools.imported import Imported

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
MAX_XML = 16 * 1024 * 1024  # far above any domain's XML; a bound on what import reads
# libvirt's memory units (its default is KiB).
UNITS = {
    "b": 1,
    "bytes": 1,
    "KB": 10**3,
    "k": 2**10,
    "KiB": 2**10,
    "MB": 10**6,
    "M": 2**20,
    "MiB": 2**20,
    "GB": 10**9,
    "G": 2**30,
    "GiB": 2**30,
    "TB": 10**12,
    "T": 2**40,
    "TiB": 2**40,
}
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000e": "e1000e", "e1000": "e1000"}
DISK_BUSES = {"virtio": "virtio-blk", "scsi": "scsi"}
UNMODELLED = "not modelled by vmrun"
NO_HOTPLUG = "memory hot-plug: vmrun has none; the guest gets its memory at start"
# Top-level elements with nothing for a launcher to carry over: identity, metadata, policy.
DESCRIPTIVE = {"uuid", "title", "description", "metadata", "genid"}


class DomainError(UsageError):
    pass


def from_file(path: str, name: str | None) -> tuple[Imported, str]:
    """The import of the domain XML in file `path` (`-`: standard input), and how the
    config's header names its source."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_XML + 1)
        source = "libvirt domain XML on standard input"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_XML + 1)
        except OSError as e:
            raise DomainError(f"{path}: cannot read: {e.strerror}") from None
        source = f"libvirt domain XML {os.path.basename(path)}"
    label = "standard input" if path == "-" else path
    if len(data) > MAX_XML:
        raise DomainError(f"{label}: larger than {MAX_XML // 2**20} MiB; that is no domain XML")
    return import_domain(data, label, name), source


def parse(data: bytes, label: str) -> Element:
    import defusedxml
    from defusedxml import ElementTree

    try:
        root = ElementTree.fromstring(data, forbid_dtd=True)
    except defusedxml.DefusedXmlException as e:
        raise DomainError(f"{label}: refused: {e} (libvirt's XML has no DTD or entities)") from None
    except ElementTree.ParseError as e:
        raise DomainError(f"{label}: not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise DomainError(f"{label}: <{local(root.tag)}>: not a libvirt domain (write `virsh dumpxml NAME`)")
    return root


def local(tag: str) -> str:
    return f"qemu:{tag[len(QEMU_NS) :]}" if tag.startswith(QEMU_NS) else tag


def tag(el: Element, *attrs: str) -> str:
    """An element as comments and errors name it: `<hostdev mode='subsystem' type='pci'>`."""
    keys = attrs or ("type", "model", "device", "mode", "name", "bus")
    shown = "".join(f" {k}='{el.get(k)}'" for k in keys if el.get(k) is not None)
    return f"<{local(el.tag)}{shown}>"


def text_of(el: Element | None) -> str | None:
    return el.text.strip() if el is not None and el.text and el.text.strip() else None


class DomainImporter:
    def __init__(self, root: Element, label: str, name: str | None) -> None:
        self.root = root
        self.label = label
        self.name = name
        self.vm: dict[str, Any] = {}
        self.iommufd: list[dict[str, Any]] = []
        self.vfio: list[dict[str, Any]] = []
        self.disk: list[dict[str, Any]] = []
        self.net: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.args: list[tuple[str, tuple[str, ...]]] = []
        self.origins: dict[str, str] = {}
        enabled = root.find("iommufd")
        self.iommufd_all = enabled is not None and enabled.get("enabled") == "yes"

    def fail(self, el: str, message: str) -> DomainError:
        return DomainError(f"{self.label}: {el}: {message}")

    def note(self, el: Element | str, why: str) -> None:
        self.notes.append(f"note: {el if isinstance(el, str) else tag(el)}: {why}")

    def set(self, key: str, value: Any, el: Element | str) -> None:
        self.vm[key] = value
        self.origins[f"vm.{key}"] = el if isinstance(el, str) else tag(el)

    def add(self, section: str, entry: dict[str, Any], el: Element, what: str) -> None:
        entries = getattr(self, section)
        self.origins[f"{section}[{len(entries)}]"] = f"{tag(el)} {what}".rstrip()
        entries.append(entry)

    def size(self, el: Element, attr: str | None = None) -> int:
        """A size as libvirt writes it: the element's text (or attribute `attr`) in its unit."""
        text = el.get(attr) if attr else text_of(el)
        unit = el.get("unit", "KiB")
        if text is None or not text.isdigit() or unit not in UNITS:
            raise self.fail(tag(el, attr or "unit"), f"{text!r} {unit} is not a size libvirt writes")
        return int(text) * UNITS[unit]

    def run(self) -> Imported:
        handlers: dict[str, Callable[[Element], None]] = {
            "name": self.name_el,
            "memory": self.memory,
            "currentMemory": self.current_memory,
            "maxMemory": lambda el: self.note(el, NO_HOTPLUG),
            "vcpu": self.vcpu,
            "os": self.os,
            "cpu": self.cpu,
            "numatune": self.numatune,
            "memoryBacking": self.memory_backing,
            "devices": self.devices,
            "iommufd": lambda el: None,  # read with the hostdevs
            "on_poweroff": self.lifecycle,
            "on_reboot": self.lifecycle,
            "on_crash": self.lifecycle,
            f"{QEMU_NS}commandline": self.commandline,
        }
        kind = self.root.get("type")
        if kind in ("kvm", "qemu"):
            self.set("accel", "kvm" if kind == "kvm" else "tcg", f"<domain type='{kind}'>")
        for el in self.root:
            handler = handlers.get(el.tag)
            if handler is not None:
                handler(el)
            elif el.tag not in DESCRIPTIVE:
                self.note(el, UNMODELLED)
        if self.name:
            self.vm["name"] = self.name
        if "name" not in self.vm:
            raise self.fail("<name>", "missing; give the VM's name with --name")
        if "memory" not in self.vm:
            raise self.fail("<memory>", "missing; a domain's XML always has it (write `virsh dumpxml NAME`)")
        if self.iommufd and not any(d.get("iommufd") for d in self.vfio):
            self.iommufd.clear()
        self.vm.setdefault("console", "none")  # no <serial>: no serial port
        order = [k.name for k in keytable.VM_KEYS]
        vm = dict(sorted(self.vm.items(), key=lambda kv: order.index(kv[0])))
        vm["args"] = [token for _, tokens in self.args for token in tokens]
        doc: dict[str, Any] = {"vm": vm}
        for key in ("iommufd", "vfio", "disk", "net"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        return Imported(doc, tuple(self.args), tuple((n, ()) for n in self.notes), tuple(self.origins.items()))

    # -- the VM --------------------------------------------------------------------------

    def name_el(self, el: Element) -> None:
        if (name := text_of(el)) is not None:
            self.set("name", name, f"<name>{name}</name>")

    def memory(self, el: Element) -> None:
        self.set("memory", format_size(self.size(el)), el)

    def current_memory(self, el: Element) -> None:
        memory = self.root.find("memory")
        if memory is not None and self.size(el) != self.size(memory):
            self.note(el, "a balloon target below <memory>: vmrun gives the guest all of <memory>")

    def vcpu(self, el: Element) -> None:
        count = text_of(el)
        if count is None or not count.isdigit():
            raise self.fail("<vcpu>", f"{count!r} is not a number of vCPUs")
        self.set("cpus", int(count), f"<vcpu>{count}</vcpu>")
        if el.get("current") not in (None, count):
            self.note(el, f"{el.get('current')} of them online at start: vmrun starts them all")
        if el.get("cpuset") is not None:
            self.note(el, "a cpuset: vmrun places QEMU's CPUs by numa (the devices' node)")

    def lifecycle(self, el: Element) -> None:
        action = text_of(el)
        if (el.tag, action) not in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
            self.note(f"<{el.tag}>{action}</{el.tag}>", "vmrun's QEMU exits at power-off and crash, resets at reboot")

    def os(self, el: Element) -> None:
        if el.get("firmware") == "efi":
            self.set("firmware", "uefi", tag(el, "firmware"))
        for child in el:
            value = text_of(child)
            if child.tag == "type":
                if child.get("arch") not in (None, "x86_64"):
                    self.note(child, f"arch {child.get('arch')}: vmrun runs x86_64 guests")
                if (machine := child.get("machine")) is not None:
                    self.set("machine", machine, tag(child, "arch", "machine"))
            elif child.tag == "loader":
                if child.get("type") == "pflash" or re.search(r"ovmf|edk2", value or "", re.IGNORECASE):
                    self.set("firmware", "uefi", child.tag)
                    self.note(child, f"{value}: vmrun picks the OVMF build from QEMU's firmware descriptors")
                else:
                    self.note(child, UNMODELLED)
            elif child.tag == "nvram" and value:
                self.set("uefi_vars", value, "<nvram>")
            elif child.tag in ("kernel", "initrd", "cmdline") and value:
                self.set("append" if child.tag == "cmdline" else child.tag, value, f"<{child.tag}>")
            elif child.tag == "boot":
                self.note(child, "vmrun boots from the first disk (or the kernel)")
            elif child.tag not in ("kernel", "initrd", "cmdline", "nvram"):
                self.note(child, UNMODELLED)

    def cpu(self, el: Element) -> None:
        mode = el.get("mode", "custom")
        model = text_of(el.find("model"))
        if mode in ("host-passthrough", "maximum" if self.vm.get("accel") == "tcg" else ""):
            self.set("cpu", "host" if mode == "host-passthrough" else "max", tag(el, "mode"))
        elif mode == "host-model":
            self.set("cpu", "host", tag(el, "mode"))
            self.note(el, "imported as the host's CPU (-cpu host), as libvirt's host-model is under KVM")
        elif model is not None and rules.MACHINE_RE.fullmatch(model):
            self.set("cpu", model, f"<model>{model}</model>")
        topology = el.find("topology")
        levels = ("sockets", "dies", "clusters", "cores", "threads")
        if topology is not None and any(topology.get(k, "1") != "1" for k in levels if k != "cores"):
            # vmrun says one socket of `cpus` cores; QEMU merges a later -smp over its own.
            text = ",".join(f"{k}={topology.get(k)}" for k in levels if topology.get(k) is not None)
            smp = ("-smp", f"{self.vm.get('cpus', 1)},{text}")
            self.args.append(("<cpu><topology>: vmrun says one socket of `cpus` cores", smp))
        for child in el:
            if child.tag not in ("model", "topology"):
                self.note(child, f"in <cpu>: {UNMODELLED}")

    def numatune(self, el: Element) -> None:
        for child in el:
            nodeset = child.get("nodeset", "")
            if child.tag == "memory" and child.get("mode", "strict") in ("strict", "restrictive") and nodeset.isdigit():
                self.set("numa", int(nodeset), tag(child, "mode", "nodeset"))
            else:
                self.note(child, "vmrun binds guest RAM to one host node (numa = N)")

    def memory_backing(self, el: Element) -> None:
        for child in el:
            if child.tag == "hugepages":
                pages = child.findall("page")
                sizes = {self.size(page, "size") if page.get("size") else 2 * 2**20 for page in pages} or {2 * 2**20}
                named = [k for k, v in HUGEPAGE_SIZES.items() if v in sizes]
                if len(sizes) == 1 and named:
                    self.set("hugepages", named[0], "<hugepages>")
                else:
                    self.note(child, f"vmrun backs guest RAM with one page size of {', '.join(HUGEPAGE_SIZES)}")
            elif child.tag == "locked":
                self.note(child, 'vmrun sets the memlock limit VFIO needs (memlock = "auto"); "unlimited" locks all')
            elif child.tag == "allocation" and child.get("mode") == "immediate":
                self.set("prealloc", True, tag(child, "mode"))
            elif child.tag != "source" or child.get("type") not in ("memfd", "anonymous", "file"):
                self.note(child, f"in <memoryBacking>: {UNMODELLED}")
        if "hugepages" in self.vm:
            self.vm.pop("prealloc", None)  # huge pages are always preallocated

    def commandline(self, el: Element) -> None:
        args = [arg.get("value", "") for arg in el.findall(f"{QEMU_NS}arg")]
        for option in options(["qemu", *args])[1]:
            self.args.append(("from <qemu:commandline>", option))
        env = {e.get("name", ""): e.get("value", "") for e in el.findall(f"{QEMU_NS}env")}
        if env:
            self.set("env", env, "<qemu:env>")

    # -- devices -------------------------------------------------------------------------

    def devices(self, el: Element) -> None:
        handlers: dict[str, Callable[[Element], None]] = {
            "emulator": self.emulator,
            "disk": self.disk_el,
            "hostdev": self.hostdev,
            "interface": self.interface,
            "iommu": self.iommu,
            "serial": self.serial,
            "console": self.console,
            "graphics": self.graphics,
            "video": lambda d: self.note(d, "vmrun adds its own video device for a display (vm.display)"),
        }
        controllers = sorted({f"{c.get('type')} {c.get('model') or ''}".strip() for c in el.findall("controller")})
        if controllers:
            self.note("<controller>", f"{', '.join(controllers)}: vmrun makes its own (hotplug_slots root ports)")
        for device in el:
            handler = handlers.get(device.tag)
            if handler is not None:
                handler(device)
            elif device.tag != "controller":
                self.note(device, UNMODELLED)
        if el.find("*/address[@type='pci']") is not None:
            self.note("<address type='pci'>", "vmrun places the devices on the guest's PCI bus itself")

    def emulator(self, el: Element) -> None:
        path = text_of(el)
        if path and os.path.basename(path) != "qemu-system-x86_64":
            self.set("qemu", path, "<emulator>")

    def alias(self, el: Element, prefix: str, count: int) -> str:
        alias = el.find("alias")
        # libvirt's own aliases (hostdev0, net0) or a user's (ua-NAME): a valid id either way.
        name = (alias.get("name") or "").removeprefix("ua-") if alias is not None else ""
        return name if rules.ID_RE.fullmatch(name) else f"{prefix}{count}"

    def hostdev(self, el: Element) -> None:
        address = el.find("source/address")
        if el.get("type") != "pci" or el.get("mode", "subsystem") != "subsystem" or address is None:
            self.note(el, "vmrun passes PCI devices (type='pci')")
            return
        try:
            domain, bus, slot, function = (int(address.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))
        except ValueError:
            raise self.fail(tag(el), "<source><address> is not a PCI address") from None
        host = f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"
        entry: dict[str, Any] = {"id": self.alias(el, "hostdev", len(self.vfio)), "host": host}
        driver = el.find("driver")
        if self.iommufd_all or (driver is not None and driver.get("iommufd") == "yes"):
            if not self.iommufd:
                self.iommufd.append({"id": "iommufd0"})
                self.origins["iommufd[0]"] = "<iommufd enabled='yes'>" if self.iommufd_all else "<driver iommufd='yes'>"
            entry["iommufd"] = self.iommufd[0]["id"]
        props: dict[str, Any] = {}
        rom = el.find("rom")
        if rom is not None:
            if rom.get("bar") == "off":
                props["rombar"] = 0
            if rom.get("file"):
                props["romfile"] = rom.get("file")
            if rom.get("enabled") == "no":
                props["romfile"] = ""
        if props:
            entry["props"] = props
        if el.get("managed") == "yes":
            self.note(el, f"{host}: libvirt binds it to vfio-pci; with vmrun, `vmrun prepare CONFIG` does")
        self.add("vfio", entry, el, host)

    def disk_el(self, el: Element) -> None:
        source, driver, target = el.find("source"), el.find("driver"), el.find("target")
        path = None if source is None else source.get("file") if el.get("type") == "file" else source.get("dev")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        if el.get("device", "disk") != "disk" or el.get("type") not in ("file", "block") or not path:
            self.note(
                f"{tag(el)} {path or ''}".rstrip(), "vmrun attaches disk images and block devices (device='disk')"
            )
            return
        if fmt not in ("raw", "qcow2"):
            self.note(el, f"{path}: format {fmt}: vmrun reads raw and qcow2")
            return
        entry: dict[str, Any] = {"id": self.alias(el, "disk", len(self.disk)), "path": path}
        if fmt != "raw":
            entry["format"] = fmt
        bus = target.get("bus", "virtio") if target is not None else "virtio"
        if bus not in DISK_BUSES:
            self.note(el, f"{path}: bus {bus}: imported as virtio-blk (the guest needs its virtio driver)")
        elif bus != "virtio":
            entry["interface"] = DISK_BUSES[bus]
        if el.find("readonly") is not None:
            entry["readonly"] = True
        cache = driver.get("cache") if driver is not None else None
        if cache in ("none", "unsafe"):
            entry["cache"] = cache
        elif cache not in (None, "default", "writeback"):
            self.note(el, f"{path}: cache {cache}: vmrun has writeback, none and unsafe")
        if (serial := text_of(el.find("serial"))) is not None:
            entry["serial"] = serial
        self.add("disk", entry, el, path)

    def interface(self, el: Element) -> None:
        kind = el.get("type")
        target = el.find("target")
        model = el.find("model")
        mac = el.find("mac")
        ifname = target.get("dev") if target is not None else None
        entry: dict[str, Any] = {"id": self.alias(el, "net", len(self.net))}
        if kind == "user":
            entry["type"] = "user"
        elif kind in ("network", "bridge", "ethernet"):
            source = el.find("source")
            where = source.get("bridge") or source.get("network") if source is not None else None
            entry["type"] = "tap"
            entry["ifname"] = ifname or f"tap{len(self.net)}"
            if kind != "ethernet" or target is None or target.get("managed") != "no":
                on = f" and add it to {where}" if where else ""
                self.note(
                    el,
                    f"libvirt makes the tap; vmrun uses an existing one: create {entry['ifname']}"
                    f" (ip tuntap add dev {entry['ifname']} mode tap user USER){on}",
                )
        else:
            self.note(el, "vmrun has user and tap networks")
            return
        if mac is not None and mac.get("address"):
            entry["mac"] = mac.get("address")
        nic = model.get("type", "virtio") if model is not None else "virtio"
        if nic in NIC_MODELS:
            if NIC_MODELS[nic] != "virtio-net-pci":
                entry["model"] = NIC_MODELS[nic]
        else:
            self.note(el, f"model {nic}: imported as virtio-net-pci ({', '.join(NIC_MODELS)} are vmrun's)")
        self.add("net", entry, el, entry.get("ifname", ""))

    def iommu(self, el: Element) -> None:
        if el.get("model") in ("intel", "virtio"):
            self.set("viommu", el.get("model"), el)
        else:
            self.note(el, "vmrun's virtual IOMMUs are intel and virtio")

    def serial(self, el: Element) -> None:
        if "console" in self.vm:
            self.note(el, "vmrun makes one serial port")
        elif el.get("type") in ("pty", "unix"):
            self.set("console", "socket", el)  # STATE/console.sock, as virsh console's pty
        elif el.get("type") == "stdio":
            self.set("console", "stdio", el)
        else:
            self.note(el, "vmrun's console is stdio or a socket")

    def console(self, el: Element) -> None:
        if self.root.find("devices/serial") is None:
            self.serial(el)

    def graphics(self, el: Element) -> None:
        if el.get("type") in ("vnc", "sdl"):
            self.set("display", el.get("type"), el)
        else:
            self.note(el, "vmrun's displays are vnc, gtk and sdl")


def import_domain(data: bytes, label: str, name: str | None = None) -> Imported:
    """The config of the domain XML `data`, read from `label`."""
    return DomainImporter(parse(data, label), label, name).run()
