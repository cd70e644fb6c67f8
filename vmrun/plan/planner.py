"""The plan: everything the launch will do, derived purely from the config and host facts.

Nothing here opens, writes or spawns; the same inputs always give the same plan, which is
what `vmrun plan` prints and what the launch carries out step by step.
"""

from __future__ import annotations

from typing import Literal

import attrs

from vmrun.base import layout
from vmrun.base.problems import Problem, Sources
from vmrun.base.sizes import format_size
from vmrun.config.model import Config
from vmrun.config.rules import (
    CONSOLE,
    FW_CODE,
    FW_VARS,
    HOTPLUG_PORT,
    QMP_CHARDEV,
    SCSI_BUS,
    SCSI_CONTROLLER,
    VIDEO,
    VIOMMU,
    hotplug_slots,
)
from vmrun.host.facts import DeviceFacts, HostFacts
from vmrun.host.reader import MINIMAL_PATH
from vmrun.kernel.users import User
from vmrun.plan import address_space
from vmrun.plan.address_space import AddressSpace
from vmrun.plan.memlock import MemlockPlan, memlock_plan
from vmrun.plan.placement import memory_plan
from vmrun.plan.requirements import Finding, Requirements, Status
from vmrun.qemu import args as qemu_args
from vmrun.qemu import devices
from vmrun.qemu.parts import FDSET_PREFIX, Part, Piece

FIRST_FD = 3


@attrs.frozen
class FdSpec:
    fd: int
    path: str | None  # what vmrun opens or creates; None: the caller passed this fd in
    purpose: str
    flags: str = "O_RDWR"
    per_process_accounting: bool = False  # set IOMMU_OPTION_RLIMIT_MODE on this /dev/iommu fd
    # device: a host file under the host root; file: an image or firmware file (path as is);
    # tap: /dev/net/tun attached to `ifname`; lock: flock'ed for QEMU's life;
    # qmp, console: listening unix sockets; inherited: from the caller
    kind: FdKind = "device"
    template: str | None = None  # file, data: copied to `path` first when `path` is missing
    ifname: str | None = None  # tap: the interface to attach to
    # file: opened with the VM user's rights (False: with vmrun's, for a trusted disk)
    as_user: bool = False


# device: a host node under the host root, opened by vmrun (the config names it explicitly);
# file: an image or firmware file, opened as the VM user unless trusted;
# data: a file of vmrun's own under its data directory (the default UEFI variable store);
# tap: /dev/net/tun attached to `ifname`; lock: flock'ed for QEMU's life;
# qmp, console: listening unix sockets; vncdir: a directory the VM user may create its VNC
# socket in, reached only through this fd; inherited: from the caller
FdKind = Literal["device", "file", "data", "tap", "inherited", "lock", "qmp", "console", "vncdir"]
NO_STATE_BASE = "(no state directory)"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@attrs.frozen
class Passthrough:
    """A passed-through device as `vmrun ps` and `status` show it."""

    id: str
    driver: str
    source: str  # host=..., sysfsdev=... or fd=...
    backend: str  # the iommufd object's id, or "legacy"


@attrs.frozen
class Plan:
    name: str
    config: str
    host_root: str
    options: tuple[tuple[str, ...], ...]  # argv, one option with its value per entry
    state_dir: str  # pid, lock and QMP socket of the running VM
    fds: tuple[FdSpec, ...]
    memlock: MemlockPlan
    run_as: User | None  # None: QEMU runs as the caller
    passthrough: tuple[Passthrough, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # QEMU's whole environment
    # Everything checked, in order: "ok" found right, "warn" worth knowing,
    # "fail" stops `run` before anything is opened.
    findings: tuple[Finding, ...] = ()
    # What QEMU creates for each config entry, typed: `vmrun attach` sends these over QMP.
    parts: tuple[Part, ...] = ()
    sources: Sources | None = None  # which file set each key: the config or a drop-in

    def file_of(self, path: str) -> str:
        """The file to name in a problem at `path`: the drop-in that set the key, or the config."""
        return self.sources.file_of(path) if self.sources is not None else self.config

    # Host CPUs QEMU is to run on (those of numa_node), set by the launch before exec;
    # None: QEMU keeps vmrun's affinity.
    cpu_affinity: tuple[int, ...] | None = None
    numa_node: int | None = None  # the host node guest RAM is bound to
    address_space: AddressSpace | None = None  # BARs, the 64-bit window, phys-bits

    def with_status(self, status: Status) -> tuple[Problem, ...]:
        return tuple(f.problem for f in self.findings if f.status == status)

    @property
    def problems(self) -> tuple[Problem, ...]:
        return self.with_status("fail")

    @property
    def notes(self) -> tuple[Problem, ...]:
        return self.with_status("warn")

    @property
    def argv(self) -> list[str]:
        return [arg for opt in self.options for arg in opt]

    def launch_record(self) -> dict[str, object]:
        """What the launch reads of this plan, as JSON values (plan_cache keeps it): every
        field but the findings (a kept plan has no problems), the QMP parts and the sources."""
        kept = attrs.asdict(self, filter=lambda a, _: a.name not in ("findings", "parts", "sources"))
        return {**kept, "argv": self.argv, "problems": []}


class FdNumbers:
    """Hands out fd numbers from 3 upward, skipping those the caller passes in."""

    def __init__(self, taken: set[int]) -> None:
        self.taken = taken
        self.next = FIRST_FD

    def allocate(self) -> int:
        while self.next in self.taken:
            self.next += 1
        self.taken.add(self.next)
        return self.next


class Planner:
    def __init__(self, config: Config, facts: HostFacts, scsi_controller: bool = False) -> None:
        """`scsi_controller`: the VM already has its SCSI controller (attach into a running VM
        with scsi disks); scsi disks go on its bus and no controller is made."""
        self.config = config
        self.facts = facts
        self.checks = Requirements(config, facts)
        self.fds: list[FdSpec] = []
        self.numbers = FdNumbers(set(config.caller_fds()))
        self.fdsets = 0
        self.scsi_controller = scsi_controller
        self.parts: list[Part] = []

    def problem(self, path: str, message: str, hint: str | None = None) -> None:
        self.checks.problem(path, message, hint)

    def note(self, path: str, message: str, hint: str | None = None) -> None:
        self.checks.note(path, message, hint)

    def ok(self, path: str, message: str) -> None:
        self.checks.ok(path, message)

    def build(self) -> Plan:
        vm = self.config.vm
        space = address_space.plan(self.config, self.facts)
        memlock = memlock_plan(self.config, space.bar_bytes if vm.memlock_bars else 0)
        self.checks.qemu()
        self.checks.identity()
        self.checks.memlock(memlock)
        ram = memory_plan(self.config, self.facts, self.checks)
        address_space.check(space, self.config, self.facts, self.checks)
        for key, path in (("vm.kernel", vm.kernel), ("vm.initrd", vm.initrd)):
            if path is None:
                continue
            why = self.facts.unreadable.get(key)
            if why == "does not exist":
                self.problem(key, f"{path} does not exist", "fix the path; relative paths start at the config file")
            elif why is not None:
                # QEMU opens these by path itself, as its own user.
                self.problem(
                    key, f"{path}: {why}", f"QEMU opens it as {self.qemu_user}: make it readable for that user"
                )
            else:
                self.ok(key, f"{path} is readable for {self.qemu_user}")
        # Parts are planned in fd order (devices first, sockets last), then laid out in argv
        # in the order a reader expects: machine, firmware, devices, backends.
        iommufd_opts = [
            o for i in range(len(self.config.iommufd)) for o in self.part("iommufd", i, [self.iommufd_object(i)])
        ]
        vfio_opts = [o for i in range(len(self.config.vfio)) for o in self.part("vfio", i, [self.device(i)])]
        firmware_opts, pflash = self.firmware()
        disk_opts = [o for i in range(len(self.config.disk)) for o in self.part("disk", i, self.disk(i))]
        net_opts = [o for i in range(len(self.config.net)) for o in self.part("net", i, self.net(i))]
        console_opts = self.console()
        state_opts = self.state_fds()
        machine = [vm.machine, *pflash, *ram.machine]
        if vm.viommu == "intel" and vm.accel == "kvm":
            machine.append("kernel-irqchip=split")  # interrupt remapping needs it under KVM
        options: list[tuple[str, ...]] = [
            (self.facts.qemu.path if self.facts.qemu else vm.qemu,),
            ("-name", f"guest={vm.name}"),
            ("-machine", ",".join(machine)),
            ("-accel", vm.accel),
        ]
        # Under KVM the guest should see the host's CPU (QEMU's default is a 2007-era model);
        # TCG cannot emulate "host", so there QEMU's default stays. Wide BARs widen it.
        cpu = address_space.cpu_option(self.config, space)
        if cpu is not None:
            options.append(("-cpu", cpu))
        options += [
            ("-m", format_size(vm.memory)),
            ("-smp", str(vm.cpus)),
            *ram.options,
            ("-nodefaults",),
            ("-no-user-config",),
            *self.sandbox(),
            *self.display(),
            *console_opts,
        ]
        if vm.kernel is not None:
            options.append(("-kernel", str(vm.kernel)))
        if vm.initrd is not None:
            options.append(("-initrd", str(vm.initrd)))
        if vm.append is not None:
            options.append(("-append", vm.append))
        options += firmware_opts
        options += address_space.options(self.config, space)
        # The vIOMMU must exist before the devices behind it are created.
        if vm.viommu == "intel":
            width = address_space.viommu_width(self.config, self.facts)
            aw = f",aw-bits={width}" if width is not None else ""
            options.append(
                ("-device", f"{devices.VIOMMU_DEVICES['intel']},id={VIOMMU},intremap=on,caching-mode=on{aw}")
            )
        elif vm.viommu == "virtio":
            options.append(("-device", f"{devices.VIOMMU_DEVICES['virtio']},id={VIOMMU}"))
        options += [*iommufd_opts, *vfio_opts, *disk_opts, *net_opts, *self.hotplug_ports(), *state_opts]
        options += qemu_args.group(vm.args)
        return Plan(
            name=vm.name,
            config=str(self.config.file),
            host_root=self.facts.root,
            options=tuple(options),
            state_dir=self.state_dir,
            fds=tuple(sorted(self.fds, key=lambda f: f.fd)),
            memlock=memlock,
            run_as=self.facts.run_as if vm.user else None,
            passthrough=tuple(Passthrough(d.id, d.driver, d.source, d.iommufd or "legacy") for d in self.config.vfio),
            env=self.environment(),
            findings=tuple(self.checks.findings),
            parts=tuple(self.parts),
            sources=self.config.sources,
            cpu_affinity=ram.cpu_affinity,
            numa_node=ram.node,
            address_space=space,
        )

    def part(self, section: str, index: int, pieces: list[Piece]) -> list[tuple[str, ...]]:
        """Record what QEMU creates for config entry section[index]; its command-line options."""
        entry = getattr(self.config, section)[index]
        self.parts.append(Part(section, index, entry.id, tuple(pieces)))
        return [piece.option() for piece in pieces]

    def hotplug_ports(self) -> list[tuple[str, ...]]:
        """Empty PCIe root ports for `vmrun attach`: q35's root bus takes no hot-plugged device.

        Last among the devices, so adding them moves no device of the config to another
        PCI address.
        """
        return [
            ("-device", hotplug_port(k, self.config.vm.hotplug_reserve))
            for k in range(hotplug_slots(self.config.vm.machine, self.config.vm.hotplug_slots))
        ]

    @property
    def qemu_identity(self) -> User | None:
        """The user QEMU runs as: vm.user, else whoever runs vmrun (None: not in the user database)."""
        return self.facts.run_as if self.config.vm.user else self.facts.caller

    @property
    def qemu_user(self) -> str:
        """Who QEMU runs as, for messages."""
        user = self.qemu_identity
        return user.name if user else f"uid {self.facts.launcher.uid}"

    def environment(self) -> tuple[tuple[str, str], ...]:
        """QEMU's whole environment: nothing of the caller's but its locale and time zone.

        Root's environment holds tokens and keys, and any process of the VM user could read
        QEMU's through /proc.
        """
        user = self.qemu_identity
        env = {
            "PATH": MINIMAL_PATH,
            "HOME": user.home if user else "/",
            "USER": user.name if user else "",
            "LOGNAME": user.name if user else "",
            **dict(self.facts.locale),
        }
        env.update(self.config.vm.env)
        return tuple((k, v) for k, v in env.items() if v)

    def sandbox(self) -> list[tuple[str, ...]]:
        if not self.config.vm.sandbox:
            self.note("vm.sandbox", "QEMU runs without its seccomp sandbox", "drop sandbox = false to turn it on")
            return []
        caps = self.facts.qemu
        if caps is not None and not caps.has_sandbox:
            self.problem(
                "vm.sandbox",
                f"QEMU {caps.version_text} at {caps.path} cannot use its seccomp sandbox here",
                "it needs a QEMU built with seccomp (Debian's is) and a kernel with SECCOMP_FILTER;"
                " or set sandbox = false",
            )
            return []
        return [("-sandbox", SANDBOX)]

    def display(self) -> list[tuple[str, ...]]:
        kind = self.config.vm.display
        if kind == "none":
            return [("-display", "none")]
        # -nodefaults leaves the guest without a video card: add one to show.
        video = ("-device", f"{devices.VIDEO},id={VIDEO}")
        if kind == "vnc":
            # A unix socket in the VM's state directory, never TCP: VNC has no password here.
            # QEMU creates it through a directory fd, so QEMU needs no path into the state dir.
            fd = self.numbers.allocate()
            path = f"{self.state_dir}/{layout.VNC_DIR}"
            self.fds.append(
                FdSpec(fd, path, f"directory of the VNC socket {layout.VNC_SOCKET}", "O_DIRECTORY", kind="vncdir")
            )
            return [video, ("-display", "none"), ("-vnc", f"unix:/proc/self/fd/{fd}/{layout.VNC_SOCKET}")]
        return [video, ("-display", kind)]

    def console(self) -> list[tuple[str, ...]]:
        kind = self.config.vm.console
        if kind == "stdio":
            return [("-serial", "mon:stdio")]
        if kind == "none":
            return []
        fd = self.numbers.allocate()
        path = f"{self.state_dir}/{layout.CONSOLE_SOCKET}"
        self.fds.append(FdSpec(fd, path, "serial console socket", "unix, listening", kind="console"))
        chardev = qemu_args.option("socket", [("id", CONSOLE), ("fd", fd), ("server", True), ("wait", False)])
        return [("-chardev", chardev), ("-serial", "chardev:console")]

    def fdset(self, fd: int, opaque: str) -> tuple[Piece, str]:
        """An fd QEMU opens as /dev/fdset/N, so it needs no access to `path` itself."""
        self.fdsets += 1
        add = Piece("add-fd", "", (("fd", fd), ("set", self.fdsets), ("opaque", opaque)), fd=fd)
        return add, f"{FDSET_PREFIX}{self.fdsets}"

    def firmware(self) -> tuple[list[tuple[str, ...]], list[str]]:
        vm = self.config.vm
        if vm.firmware != "uefi":
            return [], []
        fw = self.facts.uefi
        if fw is None:
            self.problem("vm.firmware", "no UEFI firmware descriptor found", "install ovmf (Debian: apt install ovmf)")
            return [], []
        self.ok("vm.firmware", f"UEFI {fw.code} ({fw.descriptor})")
        # The default variable store is vmrun's own file in its data directory; one the
        # config names is the user's, opened (and created from the template) as the VM user.
        own_vars = vm.uefi_vars is None
        vars_path = str(vm.uefi_vars or f"{self.facts.data_base}/{vm.name}/OVMF_VARS.fd")
        why = self.facts.unreadable.get("vm.uefi_vars")
        if why is not None:
            self.problem(
                "vm.uefi_vars",
                f"{vars_path}: {why}",
                f"QEMU writes it as {self.qemu_user}: give that user read and write access, or drop uefi_vars "
                "to use vmrun's own copy",
            )
        opts: list[tuple[str, ...]] = []
        for node, path, mode, template in (
            (FW_CODE, fw.code, "O_RDONLY", None),
            (FW_VARS, vars_path, "O_RDWR", fw.vars_template),
        ):
            fd = self.numbers.allocate()
            purpose = "UEFI code" if template is None else "UEFI variables of this VM"
            kind: FdKind = "data" if template is not None and own_vars else "file"
            self.fds.append(FdSpec(fd, path, purpose, mode, kind=kind, template=template, as_user=kind == "file"))
            add, fdset = self.fdset(fd, node)
            readonly = template is None
            file_node = (
                ("driver", "file"),
                ("node-name", f"{node}-file"),
                ("filename", fdset),
                ("read-only", readonly),
            )
            raw_node = (("driver", "raw"), ("node-name", node), ("file", f"{node}-file"), ("read-only", readonly))
            opts += [add.option(), Piece("blockdev", "", file_node).option(), Piece("blockdev", "", raw_node).option()]
        return opts, [f"pflash0={FW_CODE}", f"pflash1={FW_VARS}"]

    def disk(self, i: int) -> list[Piece]:
        disk = self.config.disk[i]
        path = f"disk[{i}]"
        facts = self.facts.images.get(disk.id)
        who = "vmrun (trusted)" if disk.trusted else self.qemu_user
        if disk.trusted:
            self.note(
                f"{path}.trusted",
                f"{disk.path} and its backing files are opened with vmrun's rights, not {self.qemu_user}'s",
                "only for images you control; drop trusted to open them as the VM user",
            )
        if facts is not None and not facts.exists:
            self.problem(f"{path}.path", f"{disk.path} does not exist", "create it (qemu-img create) or fix the path")
        elif facts is not None and facts.open_problem is not None:
            self.problem(
                f"{path}.path",
                f"{disk.path}: {facts.open_problem}",
                f"vmrun opens disks with the rights of the user QEMU runs as ({self.qemu_user}): give that user "
                "access, or set trusted = true on this disk if root should open it",
            )
        elif facts is not None and facts.detected_format is not None:
            if facts.detected_format != disk.format:
                self.problem(
                    f"{path}.format",
                    f"{disk.path} is {facts.detected_format}, not {disk.format}",
                    f'set format = "{facts.detected_format}"',
                )
            elif facts.backing_problem:
                self.problem(
                    f"{path}.path",
                    f"{disk.path}: {facts.backing_problem}",
                    f"files an image header names are opened as {who}; fix or flatten the chain "
                    "(qemu-img convert -O qcow2 IMAGE FLAT.qcow2)",
                )
            elif facts.backing:
                self.ok(
                    f"{path}.path",
                    f"{disk.path} is a {disk.format} image on {len(facts.backing)} backing layers, opened as {who}",
                )
            else:
                self.ok(f"{path}.path", f"{disk.path} is a {disk.format} image, opened as {who}")
        cache = [("cache.direct", disk.cache == "none"), ("cache.no-flush", disk.cache == "unsafe")]
        layers = [(disk.id, str(disk.path), disk.format, disk.readonly)]
        # Backing files go as fds too: QEMU would open them by the path in the header,
        # which a de-privileged QEMU may not read. Read-only, as QEMU opens them.
        layers += [(f"{disk.id}-b{k}", b.path, b.format, True) for k, b in enumerate(facts.backing if facts else (), 1)]
        nodes: list[Piece] = []
        for k, (name, file, fmt, readonly) in enumerate(layers):
            fd = self.numbers.allocate()
            purpose = f"disk {disk.id}" if k == 0 else f"disk {disk.id} backing layer {k}"
            # cache.direct=on: QEMU takes from the fd set only an fd opened with O_DIRECT.
            flags = ("O_RDONLY" if readonly else "O_RDWR") + ("|O_DIRECT" if disk.cache == "none" else "")
            self.fds.append(FdSpec(fd, file, purpose, flags, kind="file", as_user=not disk.trusted))
            add, fdset = self.fdset(fd, name)
            common = [("read-only", readonly), *cache]
            below = f"{layers[k + 1][0]}-fmt" if k + 1 < len(layers) else None
            file_node = Piece(
                "blockdev", "", (("driver", "file"), ("node-name", f"{name}-file"), ("filename", fdset), *common)
            )
            fmt_node = Piece(
                "blockdev",
                "",
                (("driver", fmt), ("node-name", f"{name}-fmt"), ("file", f"{name}-file"), ("backing", below), *common),
            )
            # A node must exist before the one that names it as backing: lowest layer first.
            nodes[:0] = [add, file_node, fmt_node]
        pieces = nodes
        drive = f"{disk.id}-fmt"
        driver = devices.DISK_DEVICES[disk.interface]
        if disk.interface == "virtio-blk":
            device = Piece("device", driver, (("id", disk.id), ("drive", drive), ("serial", disk.serial)))
        elif disk.interface == "nvme":
            # An NVMe controller must have a serial number.
            device = Piece("device", driver, (("id", disk.id), ("drive", drive), ("serial", disk.serial or disk.id)))
        else:
            if not self.scsi_controller:
                self.scsi_controller = True
                pieces.append(Piece("device", devices.SCSI_CONTROLLER, (("id", SCSI_CONTROLLER),)))
            device = Piece(
                "device", driver, (("id", disk.id), ("bus", SCSI_BUS), ("drive", drive), ("serial", disk.serial))
            )
        pieces.append(device)
        return pieces

    def net(self, i: int) -> list[Piece]:
        net = self.config.net[i]
        mac = net.mac or derived_mac(self.config.vm.name, net.id)
        if net.type == "user":
            netdev = Piece("netdev", "user", (("id", net.id), *[("hostfwd", f.hostfwd()) for f in net.forwards]))
        else:
            assert net.ifname is not None
            if self.facts.dev_tun is None:
                self.problem(f"net[{i}]", "/dev/net/tun does not exist", "load the tun module (modprobe tun)")
            if net.ifname not in self.facts.net_interfaces:
                self.problem(
                    f"net[{i}].ifname",
                    f"no network interface {net.ifname} on this host",
                    f"create it, e.g. ip tuntap add {net.ifname} mode tap user {self.config.vm.user or 'USER'}",
                )
            fd = self.numbers.allocate()
            self.fds.append(FdSpec(fd, "/dev/net/tun", f"tap {net.ifname} for {net.id}", kind="tap", ifname=net.ifname))
            netdev = Piece("netdev", "tap", (("id", net.id), ("fd", fd)), fd=fd)
        device = Piece("device", net.model, (("id", net.id), ("netdev", net.id), ("mac", mac)))
        return [netdev, device]

    @property
    def state_dir(self) -> str:
        return f"{self.facts.state_base or NO_STATE_BASE}/{self.config.vm.name}"

    def state_fds(self) -> list[tuple[str, ...]]:
        """The lock on the VM's name and its QMP socket, both handed to QEMU as fds.

        QEMU holds the lock for its whole life without knowing it, so a second `run` of
        the same name fails and a crashed VM leaves no stale lock; the QMP socket is made
        by vmrun so a de-privileged QEMU needs no writable directory.
        """
        if self.facts.state_base is None:
            self.problem(
                "vm.name",
                "no directory for the running VM's lock and sockets: XDG_RUNTIME_DIR is not set",
                "set XDG_RUNTIME_DIR (a login session has it) or VMRUN_STATE_DIR to a directory of yours, "
                "or run vmrun as root",
            )
        qmp_path = f"{self.state_dir}/{layout.QMP_SOCKET}"
        longest = max(len(qmp_path), len(f"{self.state_dir}/{layout.CONSOLE_SOCKET}"))
        if longest >= layout.SUN_PATH_MAX:
            self.problem(
                "vm.name",
                f"the VM's socket paths under {self.state_dir} are {longest} bytes, over the {layout.SUN_PATH_MAX - 1} "
                "a unix socket path may have",
                "use a shorter vm.name or a shorter state directory (VMRUN_STATE_DIR)",
            )
        lock = self.numbers.allocate()
        self.fds.append(
            FdSpec(lock, f"{self.state_dir}/{layout.LOCK}", "lock on the VM name", "O_RDWR|O_CREAT, flock", kind="lock")
        )
        qmp = self.numbers.allocate()
        self.fds.append(FdSpec(qmp, qmp_path, "QMP socket for vmrun", "unix, listening", kind="qmp"))
        chardev = qemu_args.option("socket", [("id", QMP_CHARDEV), ("fd", qmp), ("server", True), ("wait", False)])
        return [("-chardev", chardev), ("-mon", f"chardev={QMP_CHARDEV},mode=control")]

    def iommufd_object(self, i: int) -> Piece:
        obj = self.config.iommufd[i]
        if obj.fd is not None:
            fd = obj.fd
            self.fds.append(FdSpec(fd, None, f"iommufd {obj.id} (from the caller)", kind="inherited"))
        else:
            fd = self.numbers.allocate()
            per_process = self.per_process_accounting(i)
            self.fds.append(FdSpec(fd, "/dev/iommu", f"iommufd {obj.id}", per_process_accounting=per_process))
            node = self.facts.dev_iommu
            if node is not None:
                self.ok(f"iommufd[{i}]", "/dev/iommu exists")
            else:
                self.problem(
                    f"iommufd[{i}]",
                    "/dev/iommu does not exist: the kernel has no IOMMUFD",
                    "load it (modprobe iommufd) or boot a kernel with CONFIG_IOMMUFD;"
                    " or drop iommufd to use the legacy backend",
                )
        if not any(d.iommufd == obj.id for d in self.config.vfio):
            self.note(f"iommufd[{i}]", f"{obj.id} has no device", "drop it, or name it in a device's iommufd")
        return Piece("object", "iommufd", (("id", obj.id), ("fd", fd)), fd=fd)

    def per_process_accounting(self, i: int) -> bool:
        # Kernel default: pinned pages are charged to the user, so two VMs of one uid share one
        # RLIMIT_MEMLOCK. Switching the context to per-process needs CAP_SYS_RESOURCE.
        node = self.facts.dev_iommu
        if node is None or not node.is_char:
            return False
        if self.facts.launcher.cap_sys_resource:
            self.ok(f"iommufd[{i}]", "vmrun will set per-process memlock accounting")
            return True
        self.note(
            f"iommufd[{i}]",
            "pinned memory is charged to the user, shared by all its VMs",
            "vmrun needs CAP_SYS_RESOURCE to set per-process accounting; run it as root",
        )
        return False

    def device(self, i: int) -> Piece:
        dev = self.config.vfio[i]
        path = f"vfio[{i}]"
        facts = self.facts.devices.get(dev.id, DeviceFacts(sysfs=None))
        props: list[tuple[str, str | int | bool | None]] = [("id", dev.id)]
        if dev.fd is not None:
            self.fds.append(FdSpec(dev.fd, None, f"{dev.driver} {dev.id} (from the caller)", kind="inherited"))
            props.append(("fd", dev.fd))
        else:
            self.checks.device(path, dev, facts)
            if dev.iommufd is not None:
                fd = self.numbers.allocate()
                self.fds.append(
                    FdSpec(
                        fd,
                        facts.cdev or f"(VFIO cdev of {dev.source})",
                        f"{dev.driver} {dev.id} ({dev.source})",
                    )
                )
                props.append(("fd", fd))
            else:
                props += [("host", dev.host), ("sysfsdev", dev.sysfsdev)]
        props.append(("iommufd", dev.iommufd))
        props += list(dev.props)
        fd_prop = dict(props).get("fd")
        return Piece("device", dev.driver, tuple(props), fd=fd_prop if isinstance(fd_prop, int) else None)


def hotplug_port(k: int, reserve: int | None = None) -> str:
    """Root port k; `reserve`: bytes of 64-bit prefetchable window it asks the firmware for."""
    # Each root port needs its own (chassis, slot) pair. vmrun's take chassis numbers from
    # the top of the 8-bit range down (255, 254, ...; hotplug_slots is at most 32), so root
    # ports a config adds in `args`, which people number from 1, do not collide with them.
    props: list[tuple[str, str | int | bool | None]] = [("id", f"{HOTPLUG_PORT}{k}"), ("chassis", 255 - k)]
    if reserve:
        props.append(("pref64-reserve", format_size(address_space.pow2_at_least(reserve))))
        props.append(("mem-reserve", format_size(address_space.HOTPLUG_MEM_RESERVE)))
    return qemu_args.option(devices.HOTPLUG_PORT, props)


def plan(config: Config, facts: HostFacts) -> Plan:
    """The plan for launching `config` on the host that `facts` describe."""
    return Planner(config, facts).build()


def plan_file(file: str, host_root: str) -> Plan:
    """The plan for the config in `file` (drop-ins merged) on the host under `host_root`."""
    from vmrun.config import loader
    from vmrun.host import facts

    config = loader.load(file)
    return plan(config, facts.gather(config, host_root))


def derived_mac(vm_name: str, dev_id: str) -> str:
    """A stable, locally administered address: the same VM keeps its MAC across runs."""
    digest = sha256(f"{vm_name}/{dev_id}".encode())
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def sha256(data: bytes) -> bytes:
    """SHA-256 by CPython's own module where it has one (_sha256; _sha2 from 3.12 on): hashlib
    loads OpenSSL first, which would cost `vmrun run` more than the rest of the plan."""
    import importlib

    for name in ("_sha2", "_sha256"):
        try:
            return bytes(importlib.import_module(name).sha256(data).digest())
        except ImportError:
            pass
    import hashlib

    return hashlib.sha256(data).digest()
