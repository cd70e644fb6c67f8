"""What the host must offer for a config: each requirement checked and recorded as a finding.

The planner asks these questions while it lays out the command line; the answers are the
plan's findings ("ok", "warn", "fail") that `vmrun plan`, `check` and `run` report. Pure:
it reads only the host facts it is given.
"""

from __future__ import annotations

import os
from typing import Literal

import attrs

from vmrun.base.problems import Problem
from vmrun.base.sizes import UNLIMITED, format_limit, format_size
from vmrun.config.model import Config, Vfio
from vmrun.host import sysfs
from vmrun.host.facts import DeviceFacts, HostFacts, Node
from vmrun.host.qemu_caps import IOMMUFD_SINCE
from vmrun.plan.memlock import MemlockPlan

INSTALL_HINT = "on Debian 12 install qemu-system-x86 from bookworm-backports (scripts/install does)"
Status = Literal["ok", "warn", "fail"]


@attrs.frozen
class Finding:
    status: Status
    problem: Problem


class Requirements:
    def __init__(self, config: Config, facts: HostFacts) -> None:
        self.config = config
        self.facts = facts
        self.findings: list[Finding] = []

    def problem(self, path: str, message: str, hint: str | None = None) -> None:
        self.findings.append(Finding("fail", Problem(path, message, hint)))

    def note(self, path: str, message: str, hint: str | None = None) -> None:
        self.findings.append(Finding("warn", Problem(path, message, hint)))

    def ok(self, path: str, message: str) -> None:
        self.findings.append(Finding("ok", Problem(path, message)))

    def qemu(self) -> None:
        caps = self.facts.qemu
        if caps is None:
            self.problem(
                "vm.qemu",
                f"QEMU binary {self.facts.qemu_name!r} not found",
                f"{INSTALL_HINT}, or set vm.qemu to its path",
            )
            return
        backend = "with" if caps.has_iommufd else "without"
        self.ok("vm.qemu", f"QEMU {caps.version_text} at {caps.path}, {backend} the iommufd backend; {caps.cpr_text()}")
        no_backend = bool(self.config.iommufd) and not caps.has_iommufd
        if no_backend:
            need = ".".join(map(str, IOMMUFD_SINCE))
            self.problem(
                "iommufd",
                f"QEMU {caps.version_text} at {caps.path} has no iommufd backend (QEMU >= {need} needed)",
                f"{INSTALL_HINT}, or drop iommufd to use the legacy backend",
            )
        for i, dev in enumerate(self.config.vfio):
            props = caps.device_props.get(dev.driver)
            if props is None:
                self.problem(
                    f"vfio[{i}].driver",
                    f"QEMU {caps.version_text} at {caps.path} has no device {dev.driver}",
                )
                continue
            wanted = [k for k in ("host", "sysfsdev", "fd", "iommufd") if getattr(dev, k) is not None]
            if dev.iommufd is not None and dev.fd is None:
                wanted.append("fd")  # vmrun passes the cdev it opened
            if no_backend:
                # Said once above: a QEMU without the backend lacks its device properties too.
                wanted = [k for k in wanted if k not in ("fd", "iommufd")]
            for key in dict.fromkeys(wanted):
                if key not in props:
                    self.problem(
                        f"vfio[{i}]",
                        f"QEMU {caps.version_text}'s {dev.driver} has no {key!r} property",
                        INSTALL_HINT,
                    )
            for key, _ in dev.props:
                if key not in props:
                    self.problem(
                        f"vfio[{i}].props.{key}",
                        f"{dev.driver} of QEMU {caps.version_text} has no property {key!r}",
                    )

    def identity(self) -> None:
        vm, launcher = self.config.vm, self.facts.launcher
        if vm.user is None:
            if launcher.uid == 0:
                self.note("vm.user", "QEMU runs as root with every capability", "set vm.user to de-privilege it")
            return
        user = self.facts.run_as
        if user is None:
            self.problem(
                "vm.user",
                f"no user {vm.user!r} on this host",
                "create it, or name an existing user such as nobody",
            )
        elif launcher.uid != 0 and launcher.uid != user.uid:
            self.problem(
                "vm.user",
                f"vmrun runs as uid {launcher.uid} and cannot switch to {user.name} (uid {user.uid})",
                "run vmrun as root, or drop vm.user",
            )
        else:
            self.ok("vm.user", f"QEMU will run as {user.name} (uid {user.uid}, gid {user.gid})")

    def memlock(self, memlock: MemlockPlan) -> None:
        launcher = self.facts.launcher
        if memlock.limit is None:
            if self.config.vm.memlock.mode == "off" and self.config.vfio:
                self.note(
                    "vm.memlock",
                    "QEMU keeps the inherited RLIMIT_MEMLOCK; VFIO may fail to pin guest RAM",
                    'use memlock = "auto"',
                )
            return
        if launcher.cap_sys_resource:
            self.ok("vm.memlock", f"vmrun may set RLIMIT_MEMLOCK to {memlock.describe()} (CAP_SYS_RESOURCE)")
            return
        if memlock.limit <= launcher.memlock_hard or launcher.memlock_hard == UNLIMITED:
            self.ok("vm.memlock", f"RLIMIT_MEMLOCK {memlock.describe()} is within the hard limit")
            return
        have = format_limit(launcher.memlock_hard)
        need = format_limit(memlock.limit)
        systemd = "infinity" if memlock.limit == UNLIMITED else format_size(memlock.limit)
        self.problem(
            "vm.memlock",
            f"RLIMIT_MEMLOCK must be {need} but the hard limit is {have} and vmrun lacks CAP_SYS_RESOURCE to raise it",
            (
                "grant vmrun CAP_SYS_RESOURCE (it is root without it: a container?)"
                if launcher.uid == 0
                else "run vmrun as root"
            )
            + f", or raise the caller's limit (systemd: LimitMEMLOCK={systemd}; shell: ulimit -l)",
        )

    def device(self, path: str, dev: Vfio, facts: DeviceFacts) -> None:
        key = f"{path}.host" if dev.host else f"{path}.sysfsdev"
        if facts.sysfs is None:
            what = f"no PCI device {dev.host}" if dev.host else f"{dev.sysfsdev} does not exist"
            self.problem(key, f"{what} on this host", "`vmrun devices` lists the host's PCI devices")
            return
        # vfio-ap and vfio-ccw devices are mediated devices with drivers of their own.
        wanted = {"vfio-pci": "vfio-pci", "vfio-platform": "vfio-platform"}.get(dev.driver)
        if wanted is not None and facts.driver != wanted:
            bound = f"bound to {facts.driver}" if facts.driver else "bound to no driver"
            fix = (
                f"vmrun bind {dev.host or os.path.basename(dev.sysfsdev or '')}"
                if wanted == "vfio-pci"
                else "write vfio-platform to its driver_override and reprobe it"
            )
            self.problem(path, f"{dev.source} is {bound}, not {wanted}", fix)
            return
        offenders = [f"{a} ({d})" for a, d, c in facts.group_members if not sysfs.keeps_group_viable(d, c)]
        if offenders:
            self.problem(
                path,
                f"IOMMU group {facts.iommu_group} is not viable: {', '.join(offenders)} bound to a host driver",
                "bind every device of the group to vfio-pci (vmrun bind ADDR...), or unbind it",
            )
        else:
            members = len(facts.group_members)
            self.ok(
                path,
                f"{dev.source} is bound to vfio-pci; IOMMU group {facts.iommu_group} ({members} devices) is viable",
            )
        self.predictable(path, dev, facts)
        if dev.iommufd is not None:
            self.cdev(path, dev, facts)
        else:
            self.legacy(path, dev, facts)

    def predictable(self, path: str, dev: Vfio, facts: DeviceFacts) -> None:
        """The failures users meet with real devices, said before they are met."""
        if facts.reset_method == "":
            self.note(
                path,
                f"{dev.source} has no reset method (its reset_method is empty): what one VM leaves in the"
                " device, the next one finds",
                "give the device to one VM for good; a device with FLR resets between VMs",
            )
        qemu = self.facts.qemu
        upgradable = qemu is not None and qemu.has_vfio_cpr and self.config.vm.shared_ram is not False
        if upgradable and facts.reset_method is not None and "flr" not in facts.reset_method.split():
            self.note(
                path,
                f"{dev.source} has no FLR: at `vmrun upgrade`, QEMU 10.1 and 10.2 hot-reset such a device while the"
                " new QEMU takes the VM over, which turns off its BARs under the running guest",
                "upgrade only with a QEMU that carries vmrun's scripts/qemu-patches/"
                "vfio-cpr-no-system-reset-of-devices.patch",
            )
        if facts.boot_vga:
            self.note(
                path,
                f"{dev.source} is the host's boot VGA device: the host's firmware framebuffer and console use it",
                "give the host another GPU, or boot it with video=efifb:off and no console on this GPU",
            )
        passed = {d.host for d in self.config.vfio} | {os.path.basename(d.sysfsdev or "") for d in self.config.vfio}
        for address, driver, class_code in facts.group_members:
            if address in passed or sysfs.is_bridge(class_code) or driver not in sysfs.VIABLE_DRIVERS:
                continue
            self.note(
                path,
                f"{address} shares IOMMU group {facts.iommu_group} with {dev.source} and is bound to {driver} but not"
                " passed: no other VM can have it while this one runs",
                f'pass it too (a GPU\'s audio function goes with the GPU: host = "{address}"), or unbind it',
            )

    def cdev(self, path: str, dev: Vfio, facts: DeviceFacts) -> None:
        if facts.cdev is None:
            self.problem(
                path,
                f"{dev.source} has no VFIO device cdev (no vfio-dev/ in sysfs)",
                "the kernel needs CONFIG_VFIO_DEVICE_CDEV for the iommufd backend;"
                " or drop iommufd for the legacy backend",
            )
        elif facts.cdev_node is None:
            self.problem(path, f"{facts.cdev} is missing", "udev or devtmpfs should create it; check /dev")
        else:
            self.ok(path, f"VFIO cdev {facts.cdev} exists")

    def legacy(self, path: str, dev: Vfio, facts: DeviceFacts) -> None:
        container = self.facts.vfio_container
        if container is None:
            self.problem(
                path,
                "the legacy backend needs /dev/vfio/vfio, which does not exist",
                "use the iommufd backend (set iommufd), or load vfio with CONFIG_VFIO_CONTAINER",
            )
        group_file = f"/dev/vfio/{facts.iommu_group}"
        if facts.group_node is None:
            self.problem(path, f"{group_file} is missing", "is the device bound to vfio-pci?")
        elif container is not None:
            self.ok(path, f"legacy backend: /dev/vfio/vfio and {group_file} exist")
        user = self.facts.run_as if self.config.vm.user else None
        if user is None:
            return
        # On the legacy backend QEMU opens the container and group files itself, as the run-as user.
        for node in (container, facts.group_node):
            if node is not None and not node.accessible(user.uid, user.groups):
                self.problem(
                    path,
                    f"QEMU runs as {user.name} and opens {node.path} itself on the legacy backend, "
                    f"but {user.name} may not ({describe_node(node)})",
                    "use the iommufd backend so vmrun passes the device as an fd, or give the user access to the file",
                )


def describe_node(node: Node) -> str:
    return f"owner {node.uid}:{node.gid}, mode {node.mode:04o}"
