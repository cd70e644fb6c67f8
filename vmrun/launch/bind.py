"""Binding PCI devices to vfio-pci and giving them back: the host preparation commands.

Like the launch module, this one changes the host (it writes sysfs), and only the
`bind`, `unbind` and `prepare` commands use it. The kernel's safe sequence is followed:
driver_override names vfio-pci, the current driver lets go, drivers_probe binds. The
original driver is remembered under /run/vmrun-bind (apart from the VMs' state, whose
names are the configs' to choose), so `unbind` restores it. A record is data: its driver
is a name checked against the kernel's drivers, never a path to follow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time

import attrs

from vmrun.base.errors import LaunchError
from vmrun.host import sysfs
from vmrun.host.facts import Host
from vmrun.kernel import statedir

STATE_DIR = "/run/vmrun-bind"
DRIVER_RE = re.compile(r"[A-Za-z0-9_.-]+")
# PCI class codes of bridges (host 0x0600, PCI-to-PCI 0x0604): the host's own plumbing.
CDEV_WAIT = 5.0  # seconds for the vfio cdev and its /dev node to appear after binding


class BindError(LaunchError):
    pass


@attrs.frozen
class Change:
    address: str
    action: str  # "bound", "already bound", "restored", "not bound"
    detail: str = ""

    def render(self) -> str:
        return f"{self.address}: {self.action}" + (f" ({self.detail})" if self.detail else "")


class Binder:
    def __init__(self, host: Host) -> None:
        self.host = host

    def write(self, path: str, value: str) -> None:
        try:
            with open(self.host.under(path), "w") as f:
                f.write(value)
        except OSError as e:
            raise BindError(f"writing {value.strip() or 'an empty line'!r} to {path} failed: {e.strerror}") from None

    def driver(self, address: str) -> str | None:
        return self.host.link_name(f"{sysfs.pci_device(address)}/driver")

    def group_members(self, address: str) -> list[str]:
        group = self.host.link_name(f"{sysfs.pci_device(address)}/iommu_group")
        if group is None:
            raise BindError(
                f"{address} has no IOMMU group",
                "enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)",
            )
        return self.host.group_members(group) or [address]

    def records(self, create: bool = True) -> tuple[int | None, str]:
        """The directory of bind records, opened safely (see statedir), and its path; None
        when it does not exist and is not to be made."""
        path = str(self.host.under(STATE_DIR))
        try:
            return statedir.open_dir(path, create=create, mode=0o700, private=True), path
        except FileNotFoundError:
            return None, path
        except statedir.UnsafeDirectory as e:
            raise BindError(e.what, e.hint) from None
        except OSError as e:
            raise BindError(f"cannot open {path}: {e.strerror}", "vmrun bind runs as root") from None

    def remember(self, address: str, driver: str | None) -> None:
        directory, path = self.records()
        assert directory is not None
        name = f"{address}.json"
        try:
            try:
                os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                # Written whole or not at all (a temp file renamed in place): a Ctrl-C
                # leaves no empty record that a later unbind would refuse as damaged.
                statedir.write_file(directory, name, json.dumps({"driver": driver}).encode(), mode=0o600)
            # else: bound before by us; the first original driver is the one to restore.
        except OSError as e:
            raise BindError(f"cannot write the bind record {path}/{name}: {e.strerror}") from None
        finally:
            os.close(directory)

    def recall(self, address: str) -> tuple[bool, str | None]:
        """(known, original driver) from the record of `address`; a damaged record is refused."""
        directory, path = self.records(create=False)
        if directory is None:
            return False, None
        try:
            data = statedir.read_file(directory, path, f"{address}.json", limit=4096)
        except statedir.UnsafeDirectory as e:
            raise BindError(e.what, e.hint) from None
        except OSError as e:
            raise BindError(f"cannot read the bind record {path}/{address}.json: {e.strerror}") from None
        finally:
            os.close(directory)
        if data is None:
            return False, None
        record = f"{path}/{address}.json"
        try:
            driver = json.loads(data)["driver"]
        except (ValueError, KeyError, TypeError):
            raise BindError(f"the bind record {record} is damaged", f"remove it (rm {record})") from None
        if driver is None:
            return True, None
        if not isinstance(driver, str) or not DRIVER_RE.fullmatch(driver):
            raise BindError(f"the bind record {record} names no driver: {driver!r}", f"remove it (rm {record})")
        if not self.host.under(sysfs.pci_driver(driver)).is_dir():
            raise BindError(
                f"the bind record {record} names the driver {driver}, which this kernel does not have",
                f"load it (modprobe {driver}) or remove the record (rm {record})",
            )
        return True, driver

    def forget(self, address: str) -> None:
        directory, _ = self.records(create=False)
        if directory is None:
            return
        try:
            statedir.remove(directory, f"{address}.json")
        finally:
            os.close(directory)

    def check_not_bridges(self, addresses: list[str]) -> None:
        bridges = [a for a in addresses if sysfs.is_bridge(self.host.read(f"{sysfs.pci_device(a)}/class"))]
        if bridges:
            raise BindError(
                f"{', '.join(bridges)} {'is a bridge' if len(bridges) == 1 else 'are bridges'}: the host's own PCI "
                "plumbing, never passed to a VM",
                "name the devices behind it instead; bridges may stay on pcieport",
            )

    def check_present(self, addresses: list[str]) -> None:
        missing = [a for a in addresses if not self.host.under(sysfs.pci_device(a)).exists()]
        if missing:
            raise BindError(f"no PCI device {', '.join(missing)} on this host", "`vmrun devices` lists them")
        if not self.host.under(sysfs.pci_driver("vfio-pci")).exists():
            raise BindError("the vfio-pci driver is not loaded", "modprobe vfio-pci")

    def check_groups(self, addresses: list[str]) -> None:
        """Refuse when binding would leave a group with a member on a host driver."""
        wanted = set(addresses)
        for address in addresses:
            offenders = [
                f"{m} ({self.driver(m)})"
                for m in self.group_members(address)
                if m not in wanted
                and not sysfs.keeps_group_viable(self.driver(m), self.host.read(f"{sysfs.pci_device(m)}/class"))
            ]
            if offenders:
                raise BindError(
                    f"{address}: its IOMMU group would not be viable: {', '.join(offenders)} stays on a host driver",
                    "name every member of the group on the command line, or unbind them first",
                )

    def wait_for_cdev(self, address: str) -> str:
        deadline = time.monotonic() + CDEV_WAIT
        while True:
            cdev = self.host.cdev(sysfs.pci_device(address))
            if cdev is not None and self.host.under(cdev).exists():
                return cdev
            if time.monotonic() > deadline:
                raise BindError(
                    f"{address} is bound to vfio-pci but no VFIO cdev appeared",
                    "the kernel needs CONFIG_VFIO_DEVICE_CDEV for the iommufd backend",
                )
            time.sleep(0.05)

    def bind_one(self, address: str) -> Change:
        current = self.driver(address)
        if current == "vfio-pci":
            self.write(f"{sysfs.pci_device(address)}/driver_override", "vfio-pci")
            return Change(address, "already bound", self.cdev_of(address))
        self.remember(address, current)
        self.write(f"{sysfs.pci_device(address)}/driver_override", "vfio-pci")
        if current is not None:
            self.write(f"{sysfs.pci_device(address)}/driver/unbind", address)
        self.write(sysfs.DRIVERS_PROBE, address)
        now = self.driver(address)
        if now != "vfio-pci":
            raise BindError(f"{address} did not bind to vfio-pci (driver now: {now or 'none'})", "see dmesg")
        cdev = self.wait_for_cdev(address)
        return Change(address, "bound", f"was {current or 'unbound'}; {cdev}")

    def cdev_of(self, address: str) -> str:
        return self.host.cdev(sysfs.pci_device(address)) or "no cdev"

    def unbind_one(self, address: str) -> Change:
        known, original = self.recall(address)
        current = self.driver(address)
        if current != "vfio-pci" and not known:
            return Change(address, "not bound", f"driver {current or 'none'}")
        if current == "vfio-pci":
            self.write(f"{sysfs.pci_device(address)}/driver/unbind", address)
        # An empty override lets the kernel match drivers by id again.
        self.write(f"{sysfs.pci_device(address)}/driver_override", "\n")
        if original and current == original:
            pass  # a bind that never took: the device is still where it was
        elif original:
            self.write(f"{sysfs.pci_driver(original)}/bind", address)
        elif not known:
            self.write(sysfs.DRIVERS_PROBE, address)
        self.forget(address)
        return Change(address, "restored", f"driver {self.driver(address) or 'none'}")

    def prepare(self, config: str) -> list[Change]:
        """`vmrun prepare`: bind every PCI device the config names (by host or sysfsdev)."""
        from vmrun.config import loader, rules

        named = (rules.pci_address_of(dev.host, dev.sysfsdev) for dev in loader.load(config).vfio)
        return self.bind([a for a in named if a is not None])

    def bind(self, addresses: list[str]) -> list[Change]:
        """Bind all or none: on a failure, every device this call touched is given back."""
        self.check_present(addresses)
        self.check_not_bridges(addresses)
        self.check_groups(addresses)
        for address in addresses:
            if self.driver(address) != "vfio-pci":
                # A record left from an earlier bind is kept and used by unbind: a damaged one
                # is refused now, before anything is written, not halfway through a rollback.
                self.recall(address)
        done: list[Change] = []
        touched: list[str] = []
        try:
            for address in addresses:
                if self.driver(address) != "vfio-pci":
                    touched.append(address)
                done.append(self.bind_one(address))
        except BaseException:
            # Any failure, Ctrl-C included: give back what this call took, then report it.
            for address in reversed(touched):
                with contextlib.suppress(BindError):  # the original error is the one to report
                    self.unbind_one(address)
            raise
        return done

    def unbind(self, addresses: list[str]) -> list[Change]:
        missing = [a for a in addresses if not self.host.under(sysfs.pci_device(a)).exists()]
        if missing:
            raise BindError(f"no PCI device {', '.join(missing)} on this host", "`vmrun devices` lists them")
        return [self.unbind_one(a) for a in addresses]
