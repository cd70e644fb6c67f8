"""The guest's physical address space, planned so every passed device's BARs get an address.

A GPU's BARs (16-256 GiB each) go into the guest's 64-bit MMIO window, which the guest's
firmware places above RAM, and into the prefetchable windows that hot-plug root ports
reserve. Both must fit in the guest's physical address width (QEMU gives 40 bits under
TCG and to named CPU models), and that width may not pass what the host can do: the CPU's
physical address bits under KVM, and the host IOMMU's width for every address it must
translate. Measured on QEMU 10.0.2, q35 (see the README's "Devices with big BARs"):

- SeaBIOS puts the 64-bit window at the top of the guest's physical address space: a
  1 TiB root-port reservation is left unassigned at 40 bits and lands at 15 TiB at 44.
  Its root ports reserve 2 MiB of prefetchable window by themselves.
- OVMF sizes its aperture from the address width (the top eighth: 128 GiB at 40 bits), or
  takes it from `opt/ovmf/X-PciMmio64Mb`, placed above RAM and aligned to its size.

So vmrun rounds the window (cold-plugged 64-bit BARs plus every slot's reservation) up to
a power of two, the aperture, and gives the guest one address bit more than the larger of
the aperture and RAM's top: the window fits beside RAM with either firmware. Pure: reads
the config and host facts, opens nothing.
"""

from __future__ import annotations

import attrs

from vmrun.base.sizes import GiB, MiB, format_size
from vmrun.config.model import Config
from vmrun.config.rules import hotplug_slots, is_q35
from vmrun.host.facts import Bar, HostFacts
from vmrun.plan.requirements import Requirements

# QEMU's guest physical address width under TCG and for named CPU models.
QEMU_PHYS_BITS = 40
# What the firmware and machine give the 64-bit window by themselves: q35's pci-hole64-size
# and older OVMF's fixed aperture are 32 GiB (newer OVMF's, an eighth of the space, is more).
DEFAULT_WINDOW = 32 * GiB
# A hot-plug root port's prefetchable and memory windows when vmrun asks for none (measured,
# SeaBIOS), and the memory window vmrun asks for beside hotplug_reserve: a GPU's registers
# (16-32 MiB, below 4 GiB) must fit a slot too, and four slots of 64 MiB fit the 32-bit hole.
FIRMWARE_RESERVE = 2 * MiB
HOTPLUG_MEM_RESERVE = 64 * MiB
# The narrowest address width of IOMMUs in common use (Intel client parts).
NARROW_IOMMU_BITS = 39
# The widths QEMU's intel-iommu takes (aw-bits), widest (its default since 9.2) first. QEMU
# refuses a passed device when the vIOMMU is wider than the host's IOMMU ("aw-bits 48 > host
# aw-bits 39", hw/i386/intel_iommu.c vtd_check_hiod).
VIOMMU_WIDTHS = (48, 39)
# Linux maps a passed device's BARs into an iommufd address space (peer-to-peer DMA) from
# 6.19 on, through dma-buf; before, only the legacy VFIO container maps them.
IOMMUFD_MAPS_BARS_SINCE = (6, 19)


@attrs.frozen
class DeviceBars:
    device: str  # the [[vfio]] id
    bars: tuple[Bar, ...]


@attrs.frozen
class AddressSpace:
    """What the plan gives the guest's address space, and why."""

    devices: tuple[DeviceBars, ...]  # the passed devices whose BARs the host told
    bars_64: int  # bytes of cold-plugged 64-bit BARs
    reservations: int  # bytes the hot-plug root ports reserve together
    aperture: int  # the 64-bit window the guest gets: a power of two; 0: the firmware's own will do
    phys_bits: int  # the guest's physical address bits
    set_phys_bits: bool  # vmrun sets them (-cpu ...,phys-bits=N); False: QEMU's own
    ram_top: int  # the highest guest RAM address + 1
    p2p: bool | None  # peer-to-peer DMA between passed devices: None when there is no pair

    @property
    def window(self) -> int:
        return self.bars_64 + self.reservations

    @property
    def bar_bytes(self) -> int:
        """Every memory BAR of the passed devices, 32- and 64-bit."""
        return sum(b.size for d in self.devices for b in d.bars)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def ram_top(config: Config) -> int:
    """Where guest RAM ends: q35 keeps 2 GiB below 4 GiB once RAM passes 2.75 GiB (pc: 3.5 GiB)
    and puts the rest above 4 GiB."""
    memory = config.vm.memory
    low_limit = 0xB0000000 if is_q35(config.vm.machine) else 0xE0000000
    low = memory if memory < low_limit else (2 * GiB if is_q35(config.vm.machine) else low_limit)
    return 4 * GiB + (memory - low)


def kernel_version(release: str | None) -> tuple[int, int] | None:
    try:
        major, minor = (release or "").split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return None


def iommufd_maps_bars(facts: HostFacts) -> bool | None:
    version = kernel_version(facts.kernel)
    return None if version is None else version >= IOMMUFD_MAPS_BARS_SINCE


def maps_bars(config: Config, facts: HostFacts) -> bool:
    """Whether the host maps a passed device's BARs into an IOMMU: the legacy container does,
    iommufd from Linux 6.19 on."""
    return any(d.iommufd is None for d in config.vfio) or bool(iommufd_maps_bars(facts))


def plan(config: Config, facts: HostFacts) -> AddressSpace:
    vm = config.vm
    devices = []
    for dev in config.vfio:
        found = facts.devices.get(dev.id)
        if found is not None and found.bars:
            devices.append(DeviceBars(dev.id, found.bars))
    bars_64 = sum(b.size for d in devices for b in d.bars if b.is64)
    slots = hotplug_slots(vm.machine, vm.hotplug_slots)
    # Every empty slot takes a window too, its firmware's own when hotplug_reserve is unset:
    # next to a BAR of 2^k, a few MiB more make the window 2^(k+1) (measured: a 1 TiB BAR with
    # four slots is left unassigned at 41 bits, the window must then be 2 TiB).
    reservations = slots * pow2_at_least(vm.hotplug_reserve or FIRMWARE_RESERVE)
    if not bars_64 and not vm.hotplug_reserve:
        reservations = 0  # no big BAR, no reservation: the firmware's defaults hold everything
    top = ram_top(config)
    window = bars_64 + reservations
    aperture = pow2_at_least(window) if window > DEFAULT_WINDOW else 0
    needed = max(pow2_at_least(window), pow2_at_least(top)).bit_length()  # one bit above the larger
    default = guest_default_bits(config, facts)
    phys_bits = max(default, needed) if window else default
    # The firmware puts the 64-bit window at the top of the address space. Where the kernel
    # maps BARs into the IOMMU (peer-to-peer DMA), a narrower space keeps them within the
    # IOMMU's reach, when RAM and the window still fit.
    narrow = narrowest_iommu(facts)
    if window and maps_bars(config, facts) and narrow is not None and needed <= narrow[1] < phys_bits:
        phys_bits = narrow[1]
    pci = [d for d in config.vfio if d.driver == "vfio-pci"]
    p2p = None  # unknown, or no pair of devices to talk
    if len(pci) > 1:
        maps = iommufd_maps_bars(facts)
        p2p = True if all(d.iommufd is None for d in pci) or maps else None if maps is None else False
    return AddressSpace(
        devices=tuple(devices),
        bars_64=bars_64,
        reservations=reservations,
        aperture=aperture,
        phys_bits=phys_bits,
        set_phys_bits=phys_bits != default,
        ram_top=top,
        p2p=p2p,
    )


def slot_fits(bars: tuple[Bar, ...], reserve: int | None) -> list[str]:
    """Why a device with `bars` does not fit a hot-plug slot of a VM whose slots reserve
    `reserve` (hotplug_reserve; None: the firmware's own windows); empty when it fits."""
    pref = sum(b.size for b in bars if b.is64 and b.prefetch)
    mem = sum(b.size for b in bars if not (b.is64 and b.prefetch))
    pref_have = pow2_at_least(reserve) if reserve else FIRMWARE_RESERVE
    mem_have = HOTPLUG_MEM_RESERVE if reserve else FIRMWARE_RESERVE
    why = []
    if pref > pref_have:
        why.append(f"its 64-bit prefetchable BARs take {amount(pref)}, a slot's window is {amount(pref_have)}")
    if mem > mem_have:
        why.append(f"its other BARs take {amount(mem)}, a slot's memory window is {amount(mem_have)}")
    return why


def narrowest_iommu(facts: HostFacts) -> tuple[str, int] | None:
    widths = [(name, bits) for name, bits in facts.iommus if bits is not None]
    return min(widths, key=lambda w: w[1]) if widths else None


def viommu_width(config: Config, facts: HostFacts) -> int | None:
    """The aw-bits to give the guest's intel-iommu: the widest QEMU takes that the host's
    IOMMU can back; None to leave QEMU's default (no intel vIOMMU, or an unknown host width)."""
    narrowest = narrowest_iommu(facts)
    if config.vm.viommu != "intel" or not config.vfio or narrowest is None:
        return None
    fits = [w for w in VIOMMU_WIDTHS if w <= narrowest[1]]
    return None if not fits or fits[0] == VIOMMU_WIDTHS[0] else fits[0]


def cpu_model(config: Config) -> str | None:
    """The -cpu the plan writes: the config's, else `host` under KVM; None for QEMU's default."""
    return config.vm.cpu or ("host" if config.vm.accel == "kvm" else None)


def guest_default_bits(config: Config, facts: HostFacts) -> int:
    """The width the guest gets without vmrun saying: the host's for `-cpu host` (QEMU passes
    the host's through), QEMU's 40 bits otherwise."""
    if cpu_model(config) == "host" and facts.cpu_phys_bits is not None:
        return facts.cpu_phys_bits
    return QEMU_PHYS_BITS


def cpu_option(config: Config, space: AddressSpace) -> str | None:
    """The -cpu value: the model, with the address width when vmrun sets it."""
    model = cpu_model(config)
    if not space.set_phys_bits:
        return model
    # QEMU's default model under TCG is qemu64; phys-bits goes on whichever model it is.
    return f"{model or 'qemu64'},phys-bits={space.phys_bits}"


def options(config: Config, space: AddressSpace) -> list[tuple[str, ...]]:
    """The machine and firmware options that size the 64-bit window (none when the defaults
    hold it)."""
    if not space.aperture:
        return []
    out: list[tuple[str, ...]] = []
    if is_q35(config.vm.machine):
        out.append(("-global", f"q35-pcihost.pci-hole64-size={format_size(space.aperture)}"))
    if config.vm.firmware == "uefi":
        out.append(("-fw_cfg", f"name=opt/ovmf/X-PciMmio64Mb,string={space.aperture // MiB}"))
    return out


def amount(n: int) -> str:
    """A size as people read it: exact when whole (128G, 32M), else in GiB to two places."""
    exact = format_size(n)
    return exact if exact[-1] in "TG" or n < GiB else f"{n / GiB:.2f}G"


def describe(space: AddressSpace) -> list[str]:
    """The BARs and the window, for the plan's text."""
    lines = [
        f"{d.device}: " + ", ".join(f"BAR{b.index} {format_size(b.size)} {b.kind}" for b in d.bars)
        for d in space.devices
    ]
    if space.window:
        parts = [f"{amount(space.bars_64)} of 64-bit BARs"] if space.bars_64 else []
        if space.reservations:
            parts.append(f"{amount(space.reservations)} reserved for hot-plug")
        given = format_size(space.aperture) if space.aperture else "the firmware's own"
        bits = f"{space.phys_bits}" + (" (set by vmrun)" if space.set_phys_bits else "")
        lines.append(f"64-bit MMIO window: {given} for {' + '.join(parts)}; guest phys-bits {bits}")
    return lines


def check(space: AddressSpace, config: Config, facts: HostFacts, checks: Requirements) -> None:
    """What the host's widths allow: a guest wider than the host CPU (under KVM) or than an
    IOMMU must translate is a problem naming the widths and the devices; peer-to-peer DMA
    the kernel cannot give is a note."""
    host_iommu = narrowest_iommu(facts)
    if config.vm.viommu == "intel" and config.vfio and host_iommu is not None and host_iommu[1] < VIOMMU_WIDTHS[-1]:
        checks.problem(
            "vm.viommu",
            f"the host IOMMU {host_iommu[0]} translates {host_iommu[1]}-bit addresses; QEMU's intel-iommu needs a"
            f" host of at least {VIOMMU_WIDTHS[-1]} bits for a passed device",
            'use viommu = "virtio", or no vIOMMU',
        )
    if not space.devices and not space.bars_64:
        return
    what = why_wide(space)
    if config.vm.accel == "kvm" and facts.cpu_phys_bits is not None and space.phys_bits > facts.cpu_phys_bits:
        checks.problem(
            "vm",
            f"the guest needs {space.phys_bits}-bit physical addresses ({what}); the host CPU has"
            f" {facts.cpu_phys_bits} bits, and a KVM guest cannot have more",
            "pass fewer or smaller BARs, lower hotplug_reserve or hotplug_slots, or use a host with wider addresses",
        )
    # What the IOMMU must translate: guest RAM always (a DMA beyond it fails the guest's
    # devices); the BARs where the kernel maps them (QEMU only warns when it cannot: P2P to
    # them is lost).
    ram_bits = pow2_at_least(space.ram_top).bit_length() - 1
    mapped = maps_bars(config, facts)
    widths = [(name, bits) for name, bits in facts.iommus if bits is not None]
    if config.vfio and widths:
        name, narrowest = min(widths, key=lambda w: w[1])
        if ram_bits > narrowest:
            checks.problem(
                "vm.memory",
                f"the host IOMMU {name} translates {narrowest}-bit addresses; guest RAM reaches"
                f" {format_size(space.ram_top)}, {ram_bits} bits",
                f"give the guest less than {format_size((1 << narrowest) - 4 * GiB)} of memory",
            )
        elif mapped and space.bars_64 and space.phys_bits > narrowest:
            checks.note(
                "vfio",
                f"the host IOMMU {name} translates {narrowest}-bit addresses, the guest places BARs up to"
                f" {space.phys_bits} bits ({what}): peer-to-peer DMA to BARs above {narrowest} bits is lost",
                "nothing to do unless the devices talk to each other",
            )
        else:
            checks.ok("vm", f"the host IOMMU {name} translates {narrowest}-bit addresses; the guest needs {ram_bits}")
    elif config.vfio and (ram_bits > NARROW_IOMMU_BITS or (mapped and space.phys_bits > NARROW_IOMMU_BITS)):
        checks.note(
            "vm",
            f"the host IOMMU's address width is unknown (only Intel VT-d's is read), and the guest's DMA may reach"
            f" {space.phys_bits}-bit addresses",
            f"an IOMMU of {NARROW_IOMMU_BITS} bits (common on client parts) translates less: check its documentation",
        )
    if space.p2p is False:
        kernel = f"Linux {facts.kernel}" if facts.kernel else "this kernel"
        checks.note(
            "vfio",
            f"peer-to-peer DMA between the passed devices is off: {kernel}'s iommufd cannot map their BARs"
            " (6.19 and later map them through dma-buf)",
            "multi-GPU guests need it: use the legacy backend (no iommufd key), which maps BARs, or a newer kernel",
        )


def why_wide(space: AddressSpace) -> str:
    parts = [f"RAM up to {amount(space.ram_top)}"]
    if space.bars_64:
        devices = ", ".join(
            f"{d.device} {amount(sum(b.size for b in d.bars if b.is64))}"
            for d in space.devices
            if any(b.is64 for b in d.bars)
        )
        parts.append(f"64-bit BARs {amount(space.bars_64)}: {devices}")
    if space.reservations:
        parts.append(f"hot-plug reservations {amount(space.reservations)}")
    return "; ".join(parts)
