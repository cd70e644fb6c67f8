"""One table per section says which keys exist, how each is parsed and what it means, so
parsing, the did-you-mean for unknown keys, the schema and the documentation cannot
drift apart.
"""

from __future__ import annotations

import pathlib

import attrs

from vmrun.base.sizes import (
    HUGEPAGE_SIZES,
)
from vmrun.config.model import DRIVERS, Disk, Iommufd, Net, Vfio, Vm
from vmrun.config.parsers import (
    TRAITS,
    Parser,
    boolean,
    caller_fd,
    choice,
    cpu_model,
    environment,
    file_path,
    forwards,
    integer,
    mac_address,
    memlock,
    memory_size,
    numa,
    pci_address,
    props,
    qemu_binary,
    reserve_size,
    string,
    string_list,
    sysfs_path,
    vm_name,
)
from vmrun.config.rules import (
    ACCELS,
    DEFAULT_HOTPLUG_SLOTS,
    ID_HINT,
    ID_RE,
    IFNAME_RE,
    MACHINE_RE,
    NET_MODELS,
    SERIAL_RE,
    USER_RE,
)


@attrs.frozen
class Key:
    name: str
    parse: Parser
    what: str  # what the key means; `documented` adds its choices and default
    required: bool = False
    notes: tuple[tuple[str, str], ...] = ()  # a word on some of the choices: ("none", "O_DIRECT")
    default_text: str | None = None  # a default that depends on other keys, in words
    doc: str = ""  # `what` with the choices (from the parser) and the default (from the model)

    def dump(self, value: object) -> object:
        """A model value as TOML writes it; None for a key left unset."""
        if value is None:
            return None
        traits = TRAITS.get(self.parse)
        if traits is not None and traits.dump is not None:
            return traits.dump(value)
        if isinstance(value, pathlib.Path):
            return str(value)
        if isinstance(value, tuple):
            return list(value)
        return value

    def choices(self) -> list[str]:
        traits = TRAITS.get(self.parse)
        return list(traits.schema.get("enum", ())) if traits is not None else []

    def default(self, model: type) -> object:
        """The model's default as TOML writes it; None when the key has none to show."""
        default = attrs.fields_dict(model)[self.name].default
        if default is attrs.NOTHING or default in (None, ()):
            return None
        return self.dump(default)


def words(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def documented(model: type, keys: tuple[Key, ...]) -> tuple[Key, ...]:
    """`keys` with their docs written out: one home for each choice (the parser) and each
    default (the model), whatever shows them (`vmrun schema`, `vmrun show`, messages)."""
    out = []
    for key in keys:
        default = key.default(model)
        notes = dict(key.notes)
        choices = key.choices()
        doc = key.what
        if choices:
            listed = []
            for c in choices:
                said = [w for w in ("default" if c == default and key.default_text is None else "", notes.get(c)) if w]
                listed.append(c + (f" ({', '.join(said)})" if said else ""))
            doc += ": " + (", ".join(listed[:-1]) + " or " + listed[-1] if len(listed) > 1 else listed[0])
        if key.default_text is not None:
            doc += f" (default: {key.default_text})"
        elif default is not None and not choices:
            doc += f" (default {words(default)})"
        out.append(attrs.evolve(key, doc=doc))
    return tuple(out)


VM_KEYS = documented(
    Vm,
    (
        Key("name", vm_name, "unique name of the VM", required=True),
        Key("memory", memory_size, 'guest RAM in whole MiB, e.g. "8G"', required=True),
        Key("cpus", integer(1, 1024), "number of vCPUs"),
        Key("machine", string(MACHINE_RE, "a QEMU machine type such as q35"), "QEMU machine type"),
        Key("accel", choice(*ACCELS), "accelerator"),
        Key("qemu", qemu_binary, "QEMU binary, a name on PATH or a path"),
        Key("user", string(USER_RE, "a user name such as nobody"), "run QEMU as this user (vmrun as root)"),
        Key("cpu", cpu_model, "CPU model", default_text="host under kvm, QEMU's own under tcg"),
        Key("console", choice("stdio", "socket", "none"), "serial console"),
        Key("display", choice("none", "vnc", "gtk", "sdl"), "display"),
        Key("firmware", choice("bios", "uefi"), "firmware", notes=(("uefi", "OVMF"),)),
        Key("uefi_vars", file_path, "the VM's own UEFI variable store (made from the template when missing)"),
        Key("viommu", choice("intel", "virtio"), "a virtual IOMMU for the guest"),
        Key("memlock", memlock, "RLIMIT_MEMLOCK: auto, unlimited, off or a size"),
        Key("kernel", file_path, "kernel image for direct boot (relative to the config file)"),
        Key("initrd", file_path, "initial ramdisk for direct boot"),
        Key("append", string(), "kernel command line for direct boot"),
        Key("args", string_list, "raw QEMU arguments appended last (escape hatch)"),
        Key("env", environment, "environment variables added to QEMU's minimal environment"),
        Key("sandbox", boolean, "QEMU's seccomp sandbox"),
        Key(
            "hotplug_slots",
            integer(0, 32),
            "empty PCIe root ports for `vmrun attach`, q35 only",
            default_text=f"{DEFAULT_HOTPLUG_SLOTS} on q35, 0 on other machines",
        ),
        Key(
            "hotplug_reserve",
            reserve_size,
            "64-bit prefetchable window each hot-plug slot reserves, for devices with big BARs",
            default_text="the firmware's, 2 MiB in SeaBIOS",
        ),
        Key("hugepages", choice("off", *HUGEPAGE_SIZES), "guest RAM on huge pages"),
        Key("prealloc", boolean, "fault in all guest RAM at start, one thread per vCPU (always with huge pages)"),
        Key("numa", numa, "host NUMA node of guest RAM and QEMU's CPUs: auto (the devices' node), off or N"),
        Key("memlock_bars", boolean, "count the passed devices' BARs in memlock auto, for kernels that charge them"),
        Key(
            "shared_ram",
            boolean,
            "guest RAM on a shared memfd, which `vmrun upgrade` hands to a new QEMU",
            default_text="true where QEMU has cpr-transfer (10.0 and later)",
        ),
    ),
)
IOMMUFD_KEYS = documented(
    Iommufd,
    (
        Key("id", string(ID_RE, ID_HINT), "id of the iommufd object", required=True),
        Key("fd", caller_fd, "an fd on /dev/iommu that the caller opened and vmrun passes on"),
    ),
)
VFIO_KEYS = documented(
    Vfio,
    (
        Key("id", string(ID_RE, ID_HINT), "id of the device", required=True),
        Key("driver", choice(*DRIVERS), "QEMU device"),
        Key("host", pci_address, "PCI address, DDDD:BB:DD.F"),
        Key("sysfsdev", sysfs_path, "the device's sysfs directory"),
        Key("fd", caller_fd, "an fd on the device's VFIO cdev that the caller opened"),
        Key("iommufd", string(ID_RE, ID_HINT), "id of an [[iommufd]]; absent: legacy VFIO container"),
        Key("props", props, "extra device properties, e.g. { x-vga = true }"),
    ),
)
DISK_KEYS = documented(
    Disk,
    (
        Key("id", string(ID_RE, ID_HINT), "id of the disk", required=True),
        Key("path", file_path, "image file (relative to the config file)", required=True),
        Key("format", choice("raw", "qcow2"), "image format"),
        Key("interface", choice("virtio-blk", "nvme", "scsi"), "how the guest sees it"),
        Key("readonly", boolean, "attach read-only"),
        Key("cache", choice("writeback", "none", "unsafe"), "host cache", notes=(("none", "O_DIRECT"),)),
        Key("serial", string(SERIAL_RE, "letters, digits, '-', '_', '.', at most 20"), "serial number the guest sees"),
        Key("trusted", boolean, "vmrun opens the image and its backing files as root, not as vm.user"),
    ),
)
NET_KEYS = documented(
    Net,
    (
        Key("id", string(ID_RE, ID_HINT), "id of the network device", required=True),
        Key("type", choice("user", "tap"), "network", notes=(("user", "NAT, no privileges"),)),
        Key("forwards", forwards, 'user: host ports forwarded to the guest, e.g. ["tcp:2222:22"]'),
        Key("ifname", string(IFNAME_RE, "an interface name such as tap0"), "tap: an existing tap interface"),
        Key("mac", mac_address, "MAC address", default_text="derived from the VM and device names"),
        Key("model", choice(*NET_MODELS), "NIC model"),
    ),
)
SECTIONS = {"vm": "table", "iommufd": "array", "vfio": "array", "disk": "array", "net": "array"}
SECTION_KEYS = {"vm": VM_KEYS, "iommufd": IOMMUFD_KEYS, "vfio": VFIO_KEYS, "disk": DISK_KEYS, "net": NET_KEYS}
SECTION_MODELS: dict[str, type] = {"vm": Vm, "iommufd": Iommufd, "vfio": Vfio, "disk": Disk, "net": Net}


# The sections `vmrun attach` takes from a fragment, with their keys and models.
ENTRY_SECTIONS: dict[str, tuple[tuple[Key, ...], type[Iommufd | Vfio | Disk | Net]]] = {
    "iommufd": (IOMMUFD_KEYS, Iommufd),
    "vfio": (VFIO_KEYS, Vfio),
    "disk": (DISK_KEYS, Disk),
    "net": (NET_KEYS, Net),
}
