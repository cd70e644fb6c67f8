"""The host's NUMA nodes and huge-page pools, read from sysfs under a root directory.

Read-only, like the rest of the host facts: the plan decides where guest RAM goes from
these; tests point the root at a fake tree with two nodes.
"""

from __future__ import annotations

import os
import pathlib
import re

import attrs

NODE_DIR = "/sys/devices/system/node"
HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
_NODE_RE = re.compile(r"node([0-9]+)")
_POOL_RE = re.compile(r"hugepages-([0-9]+)kB")


@attrs.frozen
class HugePagePool:
    """One size of huge pages, on one node or on the whole host."""

    size_kib: int
    total: int  # nr_hugepages
    free: int  # free_hugepages

    @property
    def dir_name(self) -> str:
        return f"hugepages-{self.size_kib}kB"


@attrs.frozen
class NumaNode:
    id: int
    cpus: tuple[int, ...]  # from cpulist; empty for a memory-only node
    hugepages: dict[int, HugePagePool]  # by page size in KiB


@attrs.frozen
class MemoryFacts:
    # Empty: the host shows no NUMA information (a kernel without CONFIG_NUMA).
    nodes: dict[int, NumaNode] = attrs.field(factory=dict)
    hugepages: dict[int, HugePagePool] = attrs.field(factory=dict)  # whole host, by size in KiB
    # The CPUs vmrun may run on (sched_getaffinity): QEMU inherits no more than these.
    allowed_cpus: frozenset[int] = frozenset()


def parse_cpulist(text: str) -> tuple[int, ...]:
    """CPU numbers from the kernel's list format ("0-3,8,10-11"); raises ValueError."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus: tuple[int, ...] | frozenset[int] | set[int]) -> str:
    """The kernel's compact list format, runs joined: 0-3,8."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _read_int(path: pathlib.Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_pools(directory: pathlib.Path) -> dict[int, HugePagePool]:
    """The huge-page pools in a hugepages/ directory (per node or host-wide), by size."""
    pools: dict[int, HugePagePool] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return pools
    for name in names:
        m = _POOL_RE.fullmatch(name)
        if not m:
            continue
        total = _read_int(directory / name / "nr_hugepages")
        free = _read_int(directory / name / "free_hugepages")
        if total is not None and free is not None:
            size = int(m[1])
            pools[size] = HugePagePool(size, total, free)
    return pools


def read_nodes(root: pathlib.Path) -> dict[int, NumaNode]:
    base = root / NODE_DIR.lstrip("/")
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    nodes: dict[int, NumaNode] = {}
    for name in names:
        m = _NODE_RE.fullmatch(name)
        if not m:
            continue
        node = int(m[1])
        try:
            cpus = parse_cpulist((base / name / "cpulist").read_text())
        except (OSError, ValueError):
            cpus = ()
        nodes[node] = NumaNode(node, cpus, read_pools(base / name / "hugepages"))
    return dict(sorted(nodes.items()))


def memory_facts(root: pathlib.Path, allowed_cpus: frozenset[int]) -> MemoryFacts:
    return MemoryFacts(
        nodes=read_nodes(root),
        hugepages=read_pools(root / HUGEPAGES_DIR.lstrip("/")),
        allowed_cpus=allowed_cpus,
    )


def device_node(text: str | None) -> int | None:
    """A PCI device's `numa_node` file: -1 (or no file) means the kernel does not know."""
    try:
        node = int(text or "")
    except ValueError:
        return None
    return node if node >= 0 else None
