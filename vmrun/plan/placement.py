"""Where guest RAM comes from: huge pages, preallocation, and the host NUMA node.

VFIO pins all guest RAM at start, so a VM with passed-through devices pays for its
memory up front: on huge pages it pins 512 times fewer pages, and on the devices' own
NUMA node their DMA stays local. vmrun knows the devices, so with numa = "auto" it puts
RAM (host-nodes=N,policy=bind) and QEMU's CPUs (an affinity the launch sets before exec)
on the node they sit on. Pure: reads host facts, records findings, returns options.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from vmrun.base.cpulist import format_cpulist
from vmrun.base.sizes import HUGEPAGE_SIZES, format_size
from vmrun.config.model import Config
from vmrun.config.rules import GUEST_RAM
from vmrun.host.facts import DeviceFacts, HostFacts
from vmrun.host.reader import HUGEPAGES_DIR, NODE_DIR
from vmrun.plan.requirements import Requirements
from vmrun.qemu import args as qemu_args
from vmrun.qemu import devices

AUX_RAM_SHARE = "aux-ram-share=on"


def shares_ram(argv: Sequence[str]) -> bool:
    """Whether a planned command line puts guest RAM where a new QEMU can take it over
    (vm.shared_ram): -machine ...,aux-ram-share=on beside the shared memfd."""
    return any(AUX_RAM_SHARE in argv[i + 1].split(",") for i, arg in enumerate(argv[:-1]) if arg in ("-machine", "-M"))


@attrs.frozen
class MemoryPlan:
    options: tuple[tuple[str, ...], ...] = ()  # the -object of the RAM backend, if any
    machine: tuple[str, ...] = ()  # -machine properties (memory-backend=)
    node: int | None = None  # host node guest RAM is bound to
    cpu_affinity: tuple[int, ...] | None = None  # host CPUs QEMU runs on (the node's)


class Placement:
    def __init__(self, config: Config, facts: HostFacts, checks: Requirements) -> None:
        self.config = config
        self.facts = facts
        self.checks = checks

    def plan(self) -> MemoryPlan:
        vm = self.config.vm
        node = self.node()
        affinity = self.affinity(node)
        page = HUGEPAGE_SIZES.get(vm.hugepages)
        if page is not None:
            self.check_pages(page, node)
        prealloc = vm.prealloc or page is not None
        shared = self.shared()
        if page is None and not prealloc and node is None and not shared:
            return MemoryPlan()  # QEMU's own RAM: nothing to say about it
        props: list[tuple[str, str | int | bool | None]] = [("id", GUEST_RAM), ("size", format_size(vm.memory))]
        if page is not None:
            # memfd, not a hugetlbfs file: the kernel's own hugetlb mount, so QEMU opens no
            # path and needs no directory it may write (it runs de-privileged, fds only).
            backend = devices.RAM_HUGE
            props += [("hugetlb", True), ("hugetlbsize", format_size(page))]
        else:
            backend = devices.RAM_SHARED if shared else devices.RAM_PLAIN
        if shared:
            props += [("share", True)]
        if prealloc:
            props += [("prealloc", True), ("prealloc-threads", self.prealloc_threads(affinity))]
        if node is not None:
            props += [("host-nodes", node), ("policy", "bind")]
        # aux-ram-share: the RAM QEMU allocates beside the guest's (ROMs, video memory) is
        # shared too, or CPR transfer refuses the VM.
        machine = (f"memory-backend={GUEST_RAM}", *((AUX_RAM_SHARE,) if shared else ()))
        return MemoryPlan(
            options=(("-object", qemu_args.option(backend, props)),),
            machine=machine,
            node=node,
            cpu_affinity=affinity,
        )

    def shared(self) -> bool:
        """Guest RAM on a shared memfd, which a new QEMU can take over (CPR transfer)."""
        setting = self.config.vm.shared_ram
        qemu = self.facts.qemu
        if setting is False:
            return False
        if qemu is None:
            return bool(setting)  # the missing binary is a problem of its own
        if not qemu.has_cpr_transfer:
            if setting:
                self.checks.problem(
                    "vm.shared_ram",
                    f"QEMU {qemu.version_text} has no CPR transfer (machine property aux-ram-share): shared RAM"
                    " would buy nothing",
                    "use QEMU 10.0 or later (10.1 for VFIO devices), or drop shared_ram",
                )
            return False
        upgrade = "`vmrun upgrade` can replace QEMU under the running guest"
        if self.config.vfio and not qemu.has_vfio_cpr:
            upgrade = f"but QEMU {qemu.version_text} cannot hand VFIO devices over (10.1+): no `vmrun upgrade`"
        self.checks.ok("vm.shared_ram", f"guest RAM on a shared memfd: {upgrade}")
        return True

    def device_nodes(self) -> list[tuple[str, int | None]]:
        """(id, host node) of each passed-through PCI device."""
        return [
            (d.id, self.facts.devices.get(d.id, DeviceFacts(sysfs=None)).numa_node)
            for d in self.config.vfio
            if d.driver == "vfio-pci"
        ]

    def node(self) -> int | None:
        """The host node guest RAM is bound to, recording why (or why not)."""
        setting = self.config.vm.numa
        if setting == "off":
            return None
        nodes = self.facts.memory.nodes
        devices = self.device_nodes()
        if isinstance(setting, int):
            if setting not in nodes:
                have = ", ".join(map(str, nodes)) if nodes else f"none ({NODE_DIR} is missing)"
                self.checks.problem(
                    "vm.numa", f"the host has no NUMA node {setting}", f'its nodes: {have}; or use numa = "auto"'
                )
                return None
            elsewhere = [f"{i} (node {n})" for i, n in devices if n is not None and n != setting]
            if elsewhere:
                self.checks.note(
                    "vm.numa",
                    f"guest RAM is bound to node {setting}, but {', '.join(elsewhere)}"
                    f" {'sits' if len(elsewhere) == 1 else 'sit'} elsewhere: DMA crosses nodes",
                    'numa = "auto" binds to the devices\' node when they share one',
                )
            else:
                self.checks.ok("vm.numa", f"guest RAM and QEMU's CPUs on NUMA node {setting}, as set")
            return setting
        if not devices or len(nodes) <= 1:
            return None  # nothing to place the VM next to, or nowhere else to put it
        unknown = [i for i, n in devices if n is None]
        if unknown:
            self.checks.note(
                "vm.numa",
                f"the host's NUMA node of {', '.join(unknown)} is unknown (numa_node is -1, or passed as an fd):"
                " guest RAM and CPUs are not bound",
                "set numa = N to bind them to node N",
            )
            return None
        on = sorted({n for _, n in devices if n is not None})
        if len(on) > 1:
            where = ", ".join(f"{i} on node {n}" for i, n in devices)
            self.checks.note(
                "vm.numa",
                f"the devices sit on several NUMA nodes ({where}): guest RAM and CPUs are not bound",
                'set numa = N to choose one, or numa = "off"',
            )
            return None
        node = on[0]
        if node not in nodes:
            self.checks.note(
                "vm.numa", f"the devices report node {node}, which the host does not list: no binding", None
            )
            return None
        self.checks.ok(
            "vm.numa", f"guest RAM and QEMU's CPUs on NUMA node {node}, next to {', '.join(i for i, _ in devices)}"
        )
        return node

    def affinity(self, node: int | None) -> tuple[int, ...] | None:
        if node is None:
            return None
        cpus = self.facts.memory.nodes[node].cpus
        if not cpus:
            self.checks.note(
                "vm.numa", f"NUMA node {node} has no CPUs: guest RAM is bound there, QEMU's CPUs are left as they are"
            )
            return None
        return cpus

    def prealloc_threads(self, affinity: tuple[int, ...] | None) -> int:
        """One per vCPU, but no more than the host CPUs QEMU will run on."""
        allowed = self.facts.memory.allowed_cpus
        target = set(affinity) if affinity else set(allowed)
        # An empty intersection leaves the inherited affinity in place (see launch).
        usable = target & allowed or target
        return max(1, min(self.config.vm.cpus, len(usable) or self.config.vm.cpus))

    def check_pages(self, page: int, node: int | None) -> None:
        vm = self.config.vm
        size_kib = page // 1024
        need = vm.memory // page
        if node is not None:
            pool = self.facts.memory.nodes[node].hugepages.get(size_kib)
            where = f"NUMA node {node}"
            base = f"{NODE_DIR}/node{node}/hugepages"
        else:
            pool = self.facts.memory.hugepages.get(size_kib)
            where = "the host"
            base = HUGEPAGES_DIR
        boot = f"or on the kernel command line: hugepagesz={vm.hugepages} hugepages=N"
        if pool is None:
            self.checks.problem(
                "vm.hugepages",
                f"{where} has no {vm.hugepages} huge pages ({base}/hugepages-{size_kib}kB is missing)",
                f"reserve them on the kernel command line: hugepagesz={vm.hugepages} hugepages=N"
                " (the kernel needs CONFIG_HUGETLBFS), or use smaller pages",
            )
            return
        if pool.free < need:
            short = need - pool.free
            self.checks.problem(
                "vm.hugepages",
                f"the VM needs {need} free {vm.hugepages} pages ({format_size(vm.memory)}) on {where};"
                f" {pool.free} of {pool.total} are free",
                f"reserve {short} more: echo {pool.total + short} > {base}/{pool.dir_name}/nr_hugepages, {boot}",
            )
            return
        self.checks.ok("vm.hugepages", f"{need} {vm.hugepages} pages for guest RAM; {where} has {pool.free} free")


def memory_plan(config: Config, facts: HostFacts, checks: Requirements) -> MemoryPlan:
    return Placement(config, facts, checks).plan()


def describe_affinity(cpus: tuple[int, ...], node: int | None) -> str:
    where = f", NUMA node {node}'s CPUs" if node is not None else ""
    return format_cpulist(cpus) + where
