"""How much memory QEMU may lock (RLIMIT_MEMLOCK), and why.

The kernel pins guest RAM once per DMA address space: once per iommufd object that has
devices (a shared object shares the pinning) and once for the legacy VFIO container.
Measured here with QEMU 10.0 on a 6.12 kernel (256 MiB guests): one shared object needs
257 MiB, two objects 513 MiB, legacy 257 MiB. The extra MiB is ROMs and firmware; the
margin below covers them with room to spare while staying far below libvirt's 1 GiB.
"""

from __future__ import annotations

import attrs

from vmrun.base.sizes import UNLIMITED, MiB, format_limit, format_mib
from vmrun.config.model import Config

MARGIN = 64 * MiB


@attrs.frozen
class MemlockPlan:
    limit: int | None  # bytes; UNLIMITED; None: vmrun leaves the inherited limit alone
    derivation: str

    def describe(self) -> str:
        if self.limit is None:
            return f"untouched ({self.derivation})"
        return f"{format_limit(self.limit)} ({self.derivation})"


def address_spaces(config: Config) -> list[str]:
    """The separate DMA address spaces the VM's devices need, in declaration order."""
    spaces: list[str] = []
    for dev in config.vfio:
        if config.vm.viommu is not None:
            # Behind a vIOMMU the guest may give each device its own domain, each pinned apart.
            spaces.append(f"{dev.id} behind the vIOMMU")
            continue
        space = f"iommufd {dev.iommufd}" if dev.iommufd else "legacy VFIO container"
        if space not in spaces:
            spaces.append(space)
    return spaces


def memlock_plan(config: Config, bars: int = 0) -> MemlockPlan:
    """The limit `config` needs; `bars`: bytes of the passed devices' BARs, when the config says
    the kernel charges them (vm.memlock_bars: some vendor kernels; Linux 6.12 charges none)."""
    setting = config.vm.memlock
    if setting.mode == "off":
        return MemlockPlan(None, 'memlock = "off"')
    if setting.mode == "unlimited":
        return MemlockPlan(UNLIMITED, 'memlock = "unlimited"')
    if setting.mode == "size":
        assert setting.size is not None
        return MemlockPlan(setting.size, f"memlock = {format_mib(setting.size)} from the config")
    spaces = address_spaces(config)
    if not spaces:
        return MemlockPlan(None, "no VFIO device: nothing is pinned")
    ram = config.vm.memory
    # QEMU maps the guest's whole memory map, RAM and every passed device's BARs, into each space.
    limit = len(spaces) * (ram + bars) + MARGIN
    what = f"{format_mib(ram)} RAM" + (f" + {format_mib(bars)} BARs" if bars else "")
    return MemlockPlan(
        limit,
        f"{len(spaces)} DMA address space{'s' if len(spaces) > 1 else ''} ({', '.join(spaces)})"
        f" x {'(' + what + ')' if bars else what} + {format_mib(MARGIN)} margin",
    )
