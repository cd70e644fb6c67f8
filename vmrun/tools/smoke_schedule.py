"""Which smoke runs may overlap: two configs that claim one host resource never run at once.

A VFIO device (and its IOMMU group), a caller's fd, a disk image, a tap, a forwarded host
port or a UEFI variable store can serve one VM at a time; side by side, the second launch
would fail for a reason that is not the config's. Jobs start in input order, each as soon
as a worker is free and nothing it claims is held by a running job.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from vmrun.base.errors import ConfigError
from vmrun.config import loader, rules
from vmrun.config.model import Config
from vmrun.host import sysfs
from vmrun.host.facts import Host

R = TypeVar("R")


def claims(file: str, host_view: Host) -> frozenset[str]:
    """What the config in `file` needs for itself; nothing for a config that does not load."""
    try:
        cfg = loader.load(file)
    except ConfigError:
        return frozenset()
    return frozenset(config_claims(cfg, host_view))


def config_claims(cfg: Config, host_view: Host) -> Iterator[str]:
    for dev in cfg.vfio:
        address = rules.pci_address_of(dev.host, dev.sysfsdev)
        if dev.sysfsdev is not None:
            yield f"sysfs:{dev.sysfsdev}"
        if address is not None:
            yield f"pci:{address}"
            group = host_view.link_name(f"{sysfs.pci_device(address)}/iommu_group")
            if group is not None:
                yield f"iommu-group:{group}"
    yield from (f"fd:{fd}" for fd in cfg.caller_fds())
    yield from (f"file:{disk.path}" for disk in cfg.disk)
    for net in cfg.net:
        if net.ifname is not None:
            yield f"tap:{net.ifname}"
        yield from (f"port:{f.protocol}:{f.host_port}" for f in net.forwards)
    if cfg.vm.firmware == "uefi":
        yield f"file:{cfg.vm.uefi_vars}" if cfg.vm.uefi_vars else f"uefi-vars:{cfg.vm.name}"


def run_exclusive(
    count: int, claimed: list[frozenset[str]], jobs: int, work: Callable[[int], R]
) -> Iterator[tuple[int, R]]:
    """`work(k)` for k in range(count), `jobs` at a time, never two whose claims meet;
    yields (k, result) as each finishes."""
    cond = threading.Condition()
    pending = list(range(count))
    held: set[str] = set()
    done: queue.Queue[tuple[int, R]] = queue.Queue()

    def next_job() -> int | None:
        with cond:
            while pending:
                k = next((k for k in pending if not claimed[k] & held), None)
                if k is not None:
                    pending.remove(k)
                    held.update(claimed[k])
                    return k
                cond.wait()
            return None

    def worker() -> None:
        while (k := next_job()) is not None:
            try:
                result = work(k)
            finally:
                with cond:
                    held.difference_update(claimed[k])
                    cond.notify_all()
            done.put((k, result))

    # Daemons: Ctrl-C ends vmrun; the VMs' own `vmrun run` children get the signal too.
    for _ in range(max(1, min(jobs, count))):
        threading.Thread(target=worker, daemon=True).start()
    for _ in range(count):
        yield done.get()
