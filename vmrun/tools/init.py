"""`vmrun init`: a first config for some of the host's PCI devices.

A device is passed through with its whole IOMMU group (the kernel hands a VM nothing
less), so every other endpoint of each group is written too, all sharing one iommufd
object (or the legacy container on request). Bridges in a group stay with the host, and
devices still on a host driver are written and named, with the command that binds them.
The text is checked by the same parser as any config before it is written.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import attrs

from vmrun.base.sizes import format_size
from vmrun.config import dropins, loader
from vmrun.host import sysfs
from vmrun.host.facts import Host
from vmrun.plan import address_space
from vmrun.tools import show

MEMORY = "4G"
CPUS = 2
USER = "nobody"
# Ids by PCI class (the first two or four hex digits of the class code), so a config reads
# as what it passes: gpu0, nic0, ...; anything else is dev0, dev1, ...
ID_PREFIXES = {"0300": "gpu", "0302": "gpu", "0380": "gpu", "0108": "nvme", "02": "nic", "0403": "audio", "0c03": "usb"}


class InitError(Exception):
    """The request cannot give a config: an address this host does not have, a bridge."""


@attrs.frozen
class Member:
    address: str
    driver: str | None
    class_code: str  # "0x030000"
    group: str | None

    @property
    def is_bridge(self) -> bool:
        return sysfs.is_bridge(self.class_code)


@attrs.frozen
class Result:
    text: str  # the config, TOML
    warnings: tuple[str, ...]  # what must change on the host before the VM can start
    needs_prepare: bool  # a device is on a host driver: `vmrun prepare` binds it


def member(host: Host, address: str) -> Member:
    path = sysfs.pci_device(address)
    return Member(
        address,
        host.link_name(f"{path}/driver"),
        host.read(f"{path}/class") or "",
        host.link_name(f"{path}/iommu_group"),
    )


def device_id(m: Member, counts: dict[str, int]) -> str:
    code = m.class_code.removeprefix("0x")
    prefix = ID_PREFIXES.get(code[:4]) or ID_PREFIXES.get(code[:2]) or "dev"
    n = counts.get(prefix, 0)
    counts[prefix] = n + 1
    return f"{prefix}{n}"


def build(name: str, addresses: list[str], host: Host, legacy: bool = False) -> Result:
    """The config for `addresses` (normalised DDDD:BB:DD.F) and their groups on `host`."""
    missing = [a for a in addresses if not host.under(sysfs.pci_device(a)).exists()]
    if missing:
        raise InitError(f"no PCI device {', '.join(missing)} on this host (`vmrun devices` lists them)")
    named = [member(host, a) for a in addresses]
    bridges = [m.address for m in named if m.is_bridge]
    if bridges:
        raise InitError(f"{', '.join(bridges)}: a bridge is the host's own PCI plumbing, never passed to a VM")
    warnings: list[str] = []
    chosen: dict[str, Member] = {}
    for m in named:
        if m.group is None:
            warnings.append(f"{m.address} is in no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)")
            chosen.setdefault(m.address, m)
            continue
        for address in host.group_members(m.group) or [m.address]:
            other = member(host, address)
            if other.is_bridge:
                continue  # the host's own plumbing, on whatever driver: it never makes a group unviable
            chosen.setdefault(address, other)
    elsewhere = [m for m in chosen.values() if m.driver not in ("vfio-pci", None)]
    for m in elsewhere:
        extra = "" if m.address in addresses else f", in IOMMU group {m.group} with {group_of(m, named)}"
        warnings.append(f"{m.address} is bound to {m.driver}{extra}: it must be bound to vfio-pci")
    counts: dict[str, int] = {}
    vfio = []
    for m in chosen.values():
        entry: dict[str, object] = {"id": device_id(m, counts), "host": m.address}
        if not legacy:
            entry["iommufd"] = "iommufd0"
        vfio.append(entry)
    doc: dict[str, Any] = {"vm": {"name": name, "memory": MEMORY, "cpus": CPUS, "user": USER}}
    # The plan sizes the window for these devices by itself; a hot-plug slot holds only what
    # it reserved at start: room for one more device like the biggest of these.
    reserve = max((big_bars(host, m.address) for m in chosen.values()), default=0)
    if reserve > address_space.FIRMWARE_RESERVE:
        doc["vm"]["hotplug_reserve"] = format_size(address_space.pow2_at_least(reserve))
    if not legacy:
        doc["iommufd"] = [{"id": "iommufd0"}]
    doc["vfio"] = vfio
    text = HEADER + show.config_text(doc)
    loader.parse(text, pathlib.Path(f"{name}.toml"))  # the same checks as any config: a bad name exits 2
    return Result(text, tuple(warnings), bool(elsewhere))


HEADER = """\
# Written by `vmrun init` from this host's devices: each device with every endpoint of its
# IOMMU group. Check it with `vmrun check FILE`; put local changes in FILE.d/*.toml.

"""


def big_bars(host: Host, address: str) -> int:
    """Bytes of a device's 64-bit prefetchable BARs (what a hot-plug slot must reserve for it)."""
    return sum(int(size) for _, size, is64, pref in host.bars(sysfs.pci_device(address)) or () if is64 and pref)


def group_of(m: Member, named: list[Member]) -> str:
    return ", ".join(n.address for n in named if n.group == m.group) or "a named device"


def write(path: pathlib.Path, text: str, force: bool) -> None:
    """Writes `text` at `path`; an existing file (or anything else there) only with `force`.

    Never through a symlink: without force the name is created exclusively; with force a
    new file takes the name's place whole, whatever stood there.
    """
    data = text.encode()
    if not force:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    tmp = path.with_name(f".{path.name}.vmrun-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output(path: str | None, text: str, force: bool, say: Callable[[str], None], what: str) -> str | None:
    """Writes to `path`, or to stdout when it is None; returns where it wrote. Shared by
    `init` and `import`, which both write a config."""
    import sys

    if path is None:
        sys.stdout.write(text)
        return None
    target = pathlib.Path(path)
    try:
        write(target, text, force)
    except FileExistsError:
        raise InitError(f"{path} exists: vmrun {what} does not overwrite it without --force") from None
    except OSError as e:
        raise InitError(f"cannot write {path}: {e.strerror}") from None
    say(f"vmrun {what}: wrote {path} (drop-ins go in {dropins.directory(target)}/)")
    return path
