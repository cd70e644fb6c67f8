"""Read a VM config (TOML) into the validated model, reporting every problem at once."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vmrun.base.errors import ConfigError
from vmrun.base.problems import Problem, Sources
from vmrun.base.sizes import (
    HUGEPAGE_SIZES,
    format_size,
)
from vmrun.config import dropins, files  # at import time: a de-privileged caller may not read the package later
from vmrun.config.document import read_toml
from vmrun.config.keytable import DISK_KEYS, ENTRY_SECTIONS, IOMMUFD_KEYS, NET_KEYS, SECTIONS, VFIO_KEYS, VM_KEYS, Key
from vmrun.config.model import Config, Disk, Iommufd, Net, Vfio, Vm
from vmrun.config.parsers import Context, Invalid, InvalidMany
from vmrun.config.quoting import did_you_mean, key_part, shown
from vmrun.config.rules import (
    BACKING_NODE_RE,
    DISK_ID_MAX,
    HOTPLUG_PORT_RE,
    ID_MAX,
    RESERVED_IDS,
    hotplug_slots,
    is_q35,
)


class Reader:
    """Walks the raw TOML, collecting problems instead of stopping at the first."""

    def __init__(self, sources: Sources, base: pathlib.Path | None = None) -> None:
        self.sources = sources
        # Relative paths of the config itself start here (default: its directory).
        self.base = base or pathlib.Path(sources.main).absolute().parent
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(path, message, hint, self.sources.dropin_of(path)))

    def context(self, path: str) -> Context:
        # A relative path is relative to the file it is written in, drop-ins included.
        dropin = self.sources.dropin_of(path)
        return Context(base=pathlib.Path(dropin).absolute().parent if dropin else self.base)

    def table(self, raw: dict[str, Any], keys: tuple[Key, ...], path: str) -> dict[str, Any]:
        known = {k.name: k for k in keys}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            key = known.get(name)
            if key is None:
                hint = did_you_mean(name, known) or f"known keys: {', '.join(known)}"
                if name.lower() in known:
                    hint = f"did you mean {name.lower()!r}? keys are lower case"
                self.problem(f"{path}{key_part(name)}", "unknown key", hint)
                continue
            try:
                values[name] = key.parse(value, self.context(f"{path}.{name}"))
            except Invalid as e:
                self.problem(f"{path}.{name}{e.sub}", e.message, e.hint)
            except InvalidMany as many:
                for sub in many.errors:
                    self.problem(f"{path}.{name}{sub.sub}", sub.message, sub.hint)
        for key in keys:
            if key.required and key.name not in raw:
                self.problem(f"{path}.{key.name}", "is required", key.doc)
        return values

    def array(self, raw: dict[str, Any], name: str, keys: tuple[Key, ...]) -> list[Entry]:
        items = raw.get(name, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            self.problem(name, "must be an array of tables", f"write each entry as [[{name}]]")
            return []
        return [Entry(item, self.table(item, keys, f"{name}[{i}]")) for i, item in enumerate(items)]


@attrs.frozen
class Entry:
    """One [[...]] entry: the keys as written, and the values that parsed."""

    raw: dict[str, Any]
    values: dict[str, Any]


def read_file(path: pathlib.Path, owner: int | None, kind: str = "config") -> files.File:
    """A file of a config (the config itself when `owner` is None), read under the trust rule
    (see trust.py): a ConfigError naming it when it may not or cannot be read."""
    try:
        return files.read(str(path), owner, kind)
    except files.Unreadable as e:
        raise ConfigError(str(path), [Problem("", e.message, e.hint)]) from None


def load(path: pathlib.Path | str) -> Config:
    """The validated config in `path` with its drop-ins (`PATH.d/*.toml`) merged in;
    raises ConfigError listing every problem, each naming the file that set the key."""
    path = pathlib.Path(path)
    main = read_file(path, None)
    raw, sources = dropins.merged(path, read_toml(main.text, path), main)
    return attrs.evolve(validate(raw, path, sources), owner=main.st.st_uid)


def parse(text: str, path: pathlib.Path) -> Config:
    """The validated config in the TOML `text`, read from `path` (no drop-ins)."""
    return validate(read_toml(text, path), path, Sources(str(path)))


def validate(raw: dict[str, Any], path: pathlib.Path, sources: Sources) -> Config:
    """The config model of the (merged) document `raw`; `sources` says who wrote each key."""
    reader = Reader(sources)
    for name in raw:
        if name not in SECTIONS:
            hint = did_you_mean(name, SECTIONS) or "sections are [vm], [[iommufd]], [[vfio]], [[disk]] and [[net]]"
            reader.problem(key_part(name)[1:], "unknown section", hint)
    vm_raw = raw.get("vm")
    if not isinstance(vm_raw, dict):
        if vm_raw is None:
            reader.problem("vm", "is required", "add a [vm] table with at least name and memory")
        else:
            reader.problem("vm", "must be a table", "write it as [vm]")
        vm_raw = {}
    vm = reader.table(vm_raw, VM_KEYS, "vm")
    objects = reader.array(raw, "iommufd", IOMMUFD_KEYS)
    devices = reader.array(raw, "vfio", VFIO_KEYS)
    disks = reader.array(raw, "disk", DISK_KEYS)
    nets = reader.array(raw, "net", NET_KEYS)
    cross_check(reader, vm, objects, devices)
    check_ids(reader, {"iommufd": objects, "vfio": devices, "disk": disks, "net": nets})
    check_vm(reader, vm)
    check_nets(reader, nets)
    if reader.problems:
        raise ConfigError(str(path), reader.problems)
    return Config(
        file=path,
        vm=Vm(**vm),
        iommufd=tuple(Iommufd(**o.values) for o in objects),
        vfio=tuple(Vfio(**d.values) for d in devices),
        disk=tuple(Disk(**d.values) for d in disks),
        net=tuple(Net(**n.values) for n in nets),
        sources=sources,
    )


def parse_fragment(raw: dict[str, Any], path: pathlib.Path, running: Config, taken: Mapping[str, str]) -> Config:
    """The entries of a `vmrun attach` fragment (its TOML as read), validated as a config's
    are, and checked against the VM they go into: `taken` maps every id the VM has to what
    has it, and an iommufd may name one of the VM's objects. The result has the VM's [vm]
    and only the fragment's entries."""
    reader = Reader(Sources(str(path)))
    for name in raw:
        if name == "vm":
            reader.problem("vm", "a fragment adds devices to a running VM; [vm] is the VM's own", "drop [vm]")
        elif name not in ENTRY_SECTIONS:
            hint = did_you_mean(name, ENTRY_SECTIONS) or "a fragment holds [[iommufd]], [[vfio]], [[disk]] and [[net]]"
            reader.problem(key_part(name)[1:], "unknown section", hint)
    entries = {name: reader.array(raw, name, keys) for name, (keys, _) in ENTRY_SECTIONS.items()}
    cross_check(reader, {}, entries["iommufd"], entries["vfio"], [o.id for o in running.iommufd])
    check_ids(reader, entries, taken)
    check_nets(reader, entries["net"])
    if not reader.problems and not any(entries.values()):
        reader.problems.append(
            Problem("", "adds nothing", "list what to attach as [[vfio]], [[iommufd]], [[disk]] or [[net]] entries")
        )
    if reader.problems:
        raise ConfigError(str(path), reader.problems)
    return Config(
        file=path,
        vm=running.vm,
        iommufd=tuple(Iommufd(**o.values) for o in entries["iommufd"]),
        vfio=tuple(Vfio(**d.values) for d in entries["vfio"]),
        disk=tuple(Disk(**d.values) for d in entries["disk"]),
        net=tuple(Net(**n.values) for n in entries["net"]),
    )


def entry(section: str, raw: dict[str, Any], base: pathlib.Path) -> Iommufd | Vfio | Disk | Net:
    """An entry as a config or fragment in directory `base` wrote it (how `vmrun attach`
    records what it added), read by the same keys; ValueError when it no longer reads."""
    keys, model = ENTRY_SECTIONS[section]
    reader = Reader(Sources(str(base)), base=base)
    values = reader.table(raw, keys, section)
    if reader.problems:
        raise ValueError("; ".join(p.render() for p in reader.problems))
    return model(**values)


def cross_check(
    r: Reader,
    vm: dict[str, Any],
    object_entries: list[Entry],
    device_entries: list[Entry],
    known_objects: Sequence[str] = (),
) -> None:
    """The rules that involve more than one key. `known_objects`: iommufd objects of the
    running VM a fragment may name."""
    for key in ("initrd", "append"):
        if key in vm and "kernel" not in vm:
            r.problem(
                f"vm.{key}",
                "needs vm.kernel",
                "set kernel for direct kernel boot, or drop this key",
            )

    objects = [o.values for o in object_entries]
    devices = [d.values for d in device_entries]
    object_ids = [*known_objects, *(o["id"] for o in objects if "id" in o)]
    for i, (entry, dev) in enumerate(zip(device_entries, devices, strict=True)):
        path = f"vfio[{i}]"
        # Presence as written: a host with a bad value was reported already, not "missing".
        given = [k for k in ("host", "sysfsdev", "fd") if k in entry.raw]
        if not given:
            r.problem(path, "names no device", "set exactly one of host, sysfsdev or fd")
        elif len(given) > 1:
            r.problem(
                f"{path}.{given[1]}",
                f"conflicts with {path}.{given[0]}",
                "set exactly one of host, sysfsdev or fd",
            )
        driver = dev.get("driver", "vfio-pci")
        if "host" in dev and driver != "vfio-pci":
            r.problem(
                f"{path}.host",
                f"a PCI address needs driver vfio-pci, not {driver}",
                "name the device by sysfsdev instead",
            )
        ref = dev.get("iommufd")
        if ref is not None and ref not in object_ids:
            hint = did_you_mean(ref, object_ids) or f'declare it: [[iommufd]] id = "{ref}"'
            r.problem(f"{path}.iommufd", f"no [[iommufd]] has id {shown(ref)}", hint)
        if "fd" in dev and "iommufd" not in entry.raw:
            r.problem(
                f"{path}.fd",
                "fd passing needs the iommufd backend: QEMU refuses fd= on a legacy VFIO device",
                'add iommufd = "<id of an [[iommufd]]>", or name the device by host or sysfsdev',
            )


def id_problem(section: str, ident: str) -> tuple[str, str] | None:
    """(message, hint) when `ident` cannot be an id of a `section` entry."""
    limit = DISK_ID_MAX if section == "disk" else ID_MAX
    if len(ident) > limit:
        why = ": vmrun makes QEMU block node names (at most 31 characters) from it" if section == "disk" else ""
        return f"is {len(ident)} characters long, at most {limit}{why}", "pick a shorter id"
    if ident in RESERVED_IDS:
        return f"{shown(ident)} is the id of {RESERVED_IDS[ident]}, which vmrun adds", "pick another id"
    if HOTPLUG_PORT_RE.fullmatch(ident):
        return f"{shown(ident)} is the id of a hot-plug root port, which vmrun adds", "pick another id"
    if section == "disk" and BACKING_NODE_RE.fullmatch(ident):
        return f"{shown(ident)} ends like the names vmrun gives backing layers (ID-b1, ID-b2, ...)", "pick another id"
    return None


def check_ids(r: Reader, sections: dict[str, list[Entry]], taken: Mapping[str, str] | None = None) -> None:
    """One id namespace across objects and devices, as QEMU has; caller fds used once.
    `taken`: ids a running VM already has, and what has each."""
    seen_ids: dict[str, str] = dict(taken or {})
    fds: dict[int, str] = {}
    for section, entries in sections.items():
        for i, entry in enumerate(entries):
            path, parsed = f"{section}[{i}]", entry.values
            if "id" in parsed and (bad := id_problem(section, parsed["id"])) is not None:
                r.problem(f"{path}.id", *bad)
            elif "id" in parsed:
                if parsed["id"] in seen_ids:
                    r.problem(
                        f"{path}.id",
                        f"{shown(parsed['id'])} is already the id of {seen_ids[parsed['id']]}",
                        "objects and devices share one id namespace; pick another id",
                    )
                else:
                    seen_ids[parsed["id"]] = path
            if "fd" in parsed:
                if parsed["fd"] in fds:
                    r.problem(f"{path}.fd", f"fd {parsed['fd']} is already passed as {fds[parsed['fd']]}.fd")
                else:
                    fds[parsed["fd"]] = path


def check_vm(r: Reader, vm: dict[str, Any]) -> None:
    if "uefi_vars" in vm and vm.get("firmware") != "uefi":
        r.problem("vm.uefi_vars", 'needs firmware = "uefi"', 'set vm.firmware = "uefi", or drop this key')
    if vm.get("viommu") == "intel" and not is_q35(vm.get("machine", "q35")):
        r.problem("vm.viommu", f"intel-iommu needs a q35 machine, not {vm['machine']}", 'set machine = "q35"')
    if vm.get("hotplug_slots") and not is_q35(vm.get("machine", "q35")):
        r.problem(
            "vm.hotplug_slots",
            f"hot-plug slots are PCIe root ports, which need a q35 machine, not {vm['machine']}",
            f"drop it: on {vm['machine']} `vmrun attach` plugs devices into the root bus",
        )
    if "hotplug_reserve" in vm and not hotplug_slots(vm.get("machine", "q35"), vm.get("hotplug_slots")):
        r.problem(
            "vm.hotplug_reserve",
            "the VM has no hot-plug slots to reserve a window in",
            "drop it, or give the VM hotplug_slots (q35)",
        )
    page = HUGEPAGE_SIZES.get(vm.get("hugepages", "off"))
    memory = vm.get("memory")
    if page is not None and memory is not None and memory % page:
        # QEMU refuses a huge-page backend whose size is not a whole number of pages.
        whole = [k * page for k in (memory // page, memory // page + 1) if k]
        r.problem(
            "vm.memory",
            f"{format_size(memory)} is not a whole number of {vm['hugepages']} huge pages",
            "round it: " + " or ".join(f'"{format_size(k)}"' for k in whole) + ", or use smaller pages",
        )


def check_nets(r: Reader, nets: list[Entry]) -> None:
    for i, entry in enumerate(nets):
        kind = entry.values.get("type", "user")
        if kind == "tap" and "ifname" not in entry.raw:
            r.problem(f"net[{i}]", "a tap device needs ifname", 'name an existing tap, e.g. ifname = "tap0"')
        if kind != "tap" and "ifname" in entry.raw:
            r.problem(f"net[{i}].ifname", 'only for type = "tap"', 'drop it, or set type = "tap"')
        if kind != "user" and "forwards" in entry.raw:
            r.problem(f"net[{i}].forwards", 'only for type = "user"', "forward ports on the host's bridge instead")
