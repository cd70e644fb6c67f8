"""Guest RAM objects on a QEMU command line, as `vmrun import` maps them back to the keys
hugepages, prealloc and numa: vmrun's own backend (rules.GUEST_RAM), and libvirt's
(`-machine memory-backend=pc.ram`, on hugetlbfs or a memfd). Pure: props in, keys out,
None when the object says more than the keys can (it is then kept as it is)."""

from __future__ import annotations

import re
from typing import Any

from vmrun.base.sizes import SizeError, format_size, parse_size
from vmrun.config import rules
from vmrun.qemu import devices

RAM_KINDS = ("memory-backend-file", "memory-backend-ram", "memory-backend-memfd")
# What libvirt writes on its RAM object besides what the keys say, and what vmrun's carries.
LIBVIRT_PROPS = {"id", "size", "prealloc", "host-nodes", "policy", "share", "discard-data", "dump", "merge"}
LIBVIRT_PROPS |= {"x-use-canonical-path-for-ramblock-id", "mem-path", "hugetlb", "hugetlbsize"}
# share=on: vm.shared_ram, which is on by default where QEMU can take it over (CPR).
VMRUN_PROPS = {"id", "size", "hugetlb", "hugetlbsize", "prealloc", "prealloc-threads", "host-nodes", "policy", "share"}


def numa_keys(props: dict[str, str | None]) -> dict[str, Any] | None:
    """host-nodes=N,policy=bind as numa = N; {} without a binding; None for several nodes
    or another policy, which the key cannot say."""
    node = props.get("host-nodes")
    if node is None:
        return {}
    if not node.isdigit() or props.get("policy") != "bind":
        return None
    return {"numa": int(node)}


def libvirt_ram_keys(kind: str, props: dict[str, str | None]) -> dict[str, Any] | None:
    """libvirt's guest RAM object as keys: huge pages from hugetlbfs (the size from the
    mount's path) or a hugetlb memfd, prealloc, a NUMA binding."""
    if set(props) - LIBVIRT_PROPS or kind not in (*RAM_KINDS, devices.RAM_HUGE, devices.RAM_PLAIN):
        return None
    keys = numa_keys(props)
    if keys is None:
        return None
    if kind == "memory-backend-file":
        keys["hugepages"] = "1G" if re.search(r"1G|1048576", props.get("mem-path") or "") else "2M"
    elif props.get("hugetlb") == "on":
        keys["hugepages"] = props.get("hugetlbsize") or "2M"
    if props.get("prealloc") == "on" and "hugepages" not in keys:
        keys["prealloc"] = True
    return keys


def vmrun_ram_keys(driver: str, props: dict[str, str | None]) -> dict[str, Any] | None:
    """vmrun's own guest RAM backend as the keys it was planned from."""
    if props.get("id") != rules.GUEST_RAM or set(props) - VMRUN_PROPS:
        return None
    huge = props.get("hugetlbsize") if driver == devices.RAM_HUGE and props.get("hugetlb") == "on" else None
    if huge is not None and huge not in ("2M", "1G"):
        return None
    keys = numa_keys(props)
    if keys is None:
        return None
    if huge is not None:
        keys["hugepages"] = huge
    elif props.get("prealloc") == "on":
        keys["prealloc"] = True
    return keys


def memory_of(props: list[tuple[str, str | None]]) -> tuple[str, list[str]] | None:
    """-m as vm.memory, and the hot-plug settings (slots, maxmem) it drops; None when -m says
    more. QEMU's unit is MiB; libvirt writes size=8388608k."""
    size = next((v if k == "size" else k for k, v in props if k == "size" or v is None), None)
    hotplug = [f"{k}={v}" for k, v in props if k in ("slots", "maxmem")]
    if size is None or len(props) != 1 + len(hotplug):
        return None
    text = size.upper() if size[-1:] in "kmgt" else size
    text = text + "M" if text.isdigit() else text
    try:
        return format_size(parse_size(text)), hotplug
    except SizeError:
        return text, hotplug  # the config check says what is wrong with it
