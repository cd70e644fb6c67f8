"""The host's NUMA nodes and huge-page pools, read from sysfs under a root directory.

Read-only, like the rest of the host facts: the plan decides where guest RAM goes from
these; tests point the root at a fake tree with two nodes.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from vmrun.host import reader


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


def pools(record: dict[int, Any]) -> dict[int, HugePagePool]:
    return {int(size): HugePagePool(**pool) for size, pool in record.items()}


def from_record(record: dict[str, Any]) -> MemoryFacts:
    """MemoryFacts from host/reader.py's record (keys may be strings: the record went through JSON)."""
    return MemoryFacts(
        nodes={
            int(n): NumaNode(node["id"], tuple(node["cpus"]), pools(node["hugepages"]))
            for n, node in record["nodes"].items()
        },
        hugepages=pools(record["hugepages"]),
        allowed_cpus=frozenset(record["allowed_cpus"]),
    )


def memory_facts(root: str | os.PathLike[str], allowed_cpus: frozenset[int]) -> MemoryFacts:
    return from_record(reader.Host(root).memory(allowed_cpus))
