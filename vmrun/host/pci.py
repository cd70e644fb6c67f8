"""The host's PCI devices as sysfs shows them, with names from pci.ids where installed."""

from __future__ import annotations

import os
import pathlib

import attrs

from vmrun.base import tables
from vmrun.base.sizes import format_size
from vmrun.host import sysfs
from vmrun.host.facts import Host

PCI_IDS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids")


@attrs.frozen
class PciDevice:
    address: str
    vendor: str  # "1234"
    device: str
    class_code: str  # "030000"
    driver: str | None
    iommu_group: str | None
    cdev: str | None
    vendor_name: str | None = None
    device_name: str | None = None
    class_name: str | None = None
    bars: tuple[tuple[int, int, bool, bool], ...] | None = None  # (number, size, 64-bit, prefetchable); None: unknown
    reset_method: str | None = None  # "flr bus", "" for none; None: the kernel does not say


class PciIds:
    """Names from a pci.ids file, read once; empty when none is installed."""

    def __init__(self, host: Host) -> None:
        self.vendors: dict[str, str] = {}
        self.devices: dict[tuple[str, str], str] = {}
        self.classes: dict[str, str] = {}
        for candidate in PCI_IDS:
            text = host.read(candidate)
            if text is not None:
                self.parse(text)
                break

    def parse(self, text: str) -> None:
        vendor = klass = None
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            if line.startswith("C "):
                code, _, name = line[2:].partition("  ")
                klass = code.strip()
                vendor = None
                self.classes[klass] = name.strip()
            elif not line.startswith("\t"):
                code, _, name = line.partition("  ")
                vendor, klass = code.strip().lower(), None
                self.vendors[vendor] = name.strip()
            elif not line.startswith("\t\t"):
                code, _, name = line[1:].partition("  ")
                if vendor is not None:
                    self.devices[(vendor, code.strip().lower())] = name.strip()
                elif klass is not None:
                    self.classes[klass + code.strip()] = name.strip()

    def class_name(self, code: str) -> str | None:
        return self.classes.get(code[:4]) or self.classes.get(code[:2])


def hexid(text: str | None, width: int) -> str:
    return (text or "").removeprefix("0x").lower().rjust(width, "0")


def list_devices(
    host: Host, only: set[str] | frozenset[str] = frozenset(), group: str | None = None
) -> list[PciDevice]:
    """The host's PCI devices by address; `only` these addresses and of IOMMU `group` when given."""
    return [d for d in all_devices(host) if (not only or d.address in only) and group in (None, d.iommu_group)]


def all_devices(host: Host) -> list[PciDevice]:
    base = host.under(sysfs.PCI_DEVICES)
    try:
        addresses = sorted(os.listdir(base))
    except OSError:
        return []
    ids = PciIds(host)
    out = []
    for address in addresses:
        path = sysfs.pci_device(address)
        vendor = hexid(host.read(f"{path}/vendor"), 4)
        device = hexid(host.read(f"{path}/device"), 4)
        class_code = hexid(host.read(f"{path}/class"), 6)
        out.append(
            PciDevice(
                address=address,
                vendor=vendor,
                device=device,
                class_code=class_code,
                driver=host.link_name(f"{path}/driver"),
                iommu_group=host.link_name(f"{path}/iommu_group"),
                cdev=host.cdev(path),
                vendor_name=ids.vendors.get(vendor),
                device_name=ids.devices.get((vendor, device)),
                class_name=ids.class_name(class_code),
                bars=None
                if (bars := host.bars(path)) is None
                else tuple((int(i), int(s), bool(w), bool(p)) for i, s, w, p in bars),
                reset_method=host.read(f"{path}/reset_method"),
            )
        )
    return out


def cdev_owner(host: Host, cdev: str) -> str | None:
    """The PCI device whose VFIO cdev is `cdev` (/dev/vfio/devices/vfioN), by its sysfs vfio-dev."""
    name = os.path.basename(cdev)
    base = host.under(sysfs.PCI_DEVICES)
    try:
        addresses = sorted(os.listdir(base))
    except OSError:
        return None
    return next((a for a in addresses if (base / a / "vfio-dev" / name).exists()), None)


def bars_text(d: PciDevice) -> str:
    """A device's memory BARs, largest first: "128G+32M+16M"."""
    if not d.bars:
        return "-"
    return "+".join(format_size(size) for size in sorted((b[1] for b in d.bars), reverse=True))


def reset_text(d: PciDevice) -> str:
    if d.reset_method is None:
        return "-"
    return d.reset_method.replace(" ", ",") or "none"


def table(devices: list[PciDevice]) -> str:
    header = ("ADDRESS", "ID", "CLASS", "DRIVER", "GROUP", "VFIO CDEV", "BARS", "RESET", "NAME")
    rows = [header]
    for d in devices:
        name = " ".join(x for x in (d.vendor_name, d.device_name) if x) or "-"
        rows.append(
            (
                d.address,
                f"{d.vendor}:{d.device}",
                d.class_name or d.class_code,
                d.driver or "-",
                d.iommu_group or "-",
                pathlib.PurePath(d.cdev).name if d.cdev else "-",
                bars_text(d),
                reset_text(d),
                name,
            )
        )
    return tables.table(rows)
