"""What `vmrun attach` will do to a running VM, worked out purely: the VM as it runs (its
config plus what was attached since), the fragment's entries planned by the launch's own
planner, and the memlock limit of the VM as it will be, by the launch's own rule.

Nothing here talks to QEMU or opens a file; hotplug carries the result out.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from vmrun.base import layout
from vmrun.base.errors import ConfigError
from vmrun.base.problems import Problem
from vmrun.config import keytable, loader
from vmrun.config.model import Config, Disk, Iommufd, Net, Vfio
from vmrun.config.rules import is_q35
from vmrun.host.facts import HostFacts
from vmrun.kernel.users import User
from vmrun.plan import address_space
from vmrun.plan.memlock import MemlockPlan, memlock_plan
from vmrun.plan.planner import FdSpec, Planner
from vmrun.qemu.parts import Part

Entry = Iommufd | Vfio | Disk | Net
SECTIONS = tuple(keytable.ENTRY_SECTIONS)  # iommufd, vfio, disk, net
ENTRY_PATH_RE = re.compile(r"(iommufd|vfio|disk|net)\[([0-9]+)\](.*)")


@attrs.frozen
class Record:
    """One entry `vmrun attach` added, as state.json keeps it: enough to read the entry
    again (its keys as written and the directory relative paths start at) and to take it
    out again (the backend pieces to remove once the guest let go of the device)."""

    section: str
    id: str
    raw: dict[str, Any]
    base: str
    fragment: str
    device: str | None  # the guest-visible device's id; None for an iommufd object
    label: dict[str, str]  # driver, id, source, backend: as `vmrun ps` shows devices
    # After device_del completed: [command, arguments] in order (blockdev-del, remove-fd, ...).
    backend: tuple[tuple[str, dict[str, Any]], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "backend": [list(step) for step in self.backend]}

    @classmethod
    def of(cls, data: object) -> Record | None:
        if not isinstance(data, dict):
            return None
        try:
            backend = tuple((str(c), dict(a)) for c, a in data.get("backend", ()))
            return cls(
                section=str(data["section"]),
                id=str(data["id"]),
                raw=dict(data["raw"]),
                base=str(data["base"]),
                fragment=str(data["fragment"]),
                device=None if data.get("device") is None else str(data["device"]),
                label={str(k): str(v) for k, v in dict(data.get("label", {})).items()},
                backend=backend,
            )
        except (KeyError, TypeError, ValueError):
            return None


def with_entries(base: Config, entries: Iterable[tuple[str, Entry]]) -> Config:
    """`base` with `entries` appended to their sections."""
    added = list(entries)
    grown: dict[str, Any] = {s: (*getattr(base, s), *(e for t, e in added if t == s)) for s in SECTIONS}
    return attrs.evolve(base, **grown)


def entries_of(config: Config) -> list[tuple[str, Entry]]:
    return [(section, e) for section in SECTIONS for e in getattr(config, section)]


def running_config(launched: Config, records: Sequence[Record]) -> Config:
    """The VM as it runs: its config as launched, plus every entry attached since."""
    added: list[tuple[str, Entry]] = []
    for r in records:
        try:
            added.append((r.section, loader.entry(r.section, r.raw, pathlib.Path(r.base))))
        except (KeyError, ValueError) as e:
            raise ValueError(f"the record of attached {r.section} {r.id} from {r.fragment} no longer reads: {e}") from e
    return with_entries(launched, added)


def taken_ids(running: Config) -> dict[str, str]:
    """Every id the running VM has, and what has it, in a fragment's error messages' words."""
    return {e.id: f"{section} {e.id} of the running VM" for section, e in entries_of(running)}


@attrs.frozen
class AttachPlan:
    fragment: Config  # the fragment's entries, with the VM's [vm]
    parts: tuple[Part, ...]  # what QEMU creates for them, objects first
    fds: tuple[FdSpec, ...]  # what vmrun opens and passes
    memlock: MemlockPlan  # of the VM as it will be
    run_as: User | None
    host_root: str
    notes: tuple[Problem, ...] = ()

    @property
    def devices(self) -> list[Part]:
        """The parts that put a device on a PCI slot of the guest: each needs a hot-plug slot."""
        return [p for p in self.parts if needs_slot(p)]


def needs_slot(part: Part) -> bool:
    """Whether the part's device goes on a hot-plug slot: not when it names its bus (a scsi
    disk goes on the VM's SCSI controller), not when there is no device (an iommufd object)."""
    device = part.device
    return device is not None and "bus" not in dict(device.props)


def fragment_path(path: str, objects_before: int) -> str | None:
    """A plan finding's key path in the fragment's own numbering; None for what is about
    the running VM (its [vm], its iommufd objects), which attach does not judge again."""
    m = ENTRY_PATH_RE.fullmatch(path)
    if m is None:
        return None
    section, index, rest = m.group(1), int(m.group(2)), m.group(3)
    if section == "iommufd":
        if index < objects_before:
            return None
        index -= objects_before
    return f"{section}[{index}]{rest}"


def plan_attach(running: Config, fragment: Config, facts: HostFacts) -> AttachPlan:
    """The fragment planned as the launch would plan it, inside the running VM.

    The planner sees the VM's iommufd objects (a fragment device may use one) and the
    fragment's entries; only what the fragment adds is kept. Problems are the fragment's,
    at its own key paths: ConfigError naming the fragment.
    """
    objects_before = len(running.iommufd)
    scope = attrs.evolve(fragment, iommufd=(*running.iommufd, *fragment.iommufd))
    # A VM launched with scsi disks has the controller: more go on its bus, hot-plugged there.
    has_scsi = any(d.interface == "scsi" for d in running.disk)
    plan = Planner(scope, facts, scsi_controller=has_scsi).build()
    problems: list[Problem] = []
    notes: list[Problem] = []
    for finding in plan.findings:
        where = fragment_path(finding.problem.path, objects_before)
        if where is None or finding.status == "ok":
            continue
        located = attrs.evolve(finding.problem, path=where)
        (problems if finding.status == "fail" else notes).append(located)
    for i, dev in enumerate(fragment.vfio):
        found = facts.devices.get(dev.id)
        bars = found.bars if found is not None and found.bars else ()
        why = address_space.slot_fits(bars, running.vm.hotplug_reserve)
        if why and is_q35(running.vm.machine):
            wanted = address_space.pow2_at_least(sum(b.size for b in bars if b.is64 and b.prefetch))
            problems.append(
                Problem(
                    f"vfio[{i}]",
                    f"{dev.source} does not fit a hot-plug slot of the VM: {'; '.join(why)}, and the guest"
                    " could not give it addresses",
                    f'set [vm] hotplug_reserve = "{address_space.amount(wanted)}" (the VM\'s next start has it), or'
                    " pass the device in the config",
                )
            )
    for i, disk in enumerate(fragment.disk):
        if disk.interface == "scsi" and not has_scsi:
            problems.append(
                Problem(
                    f"disk[{i}].interface",
                    "the VM has no SCSI controller (none of its disks is scsi), and attach does not add one",
                    'attach it as interface = "virtio-blk" or "nvme"; a config with a scsi disk has the controller',
                )
            )
    if problems:
        raise ConfigError(str(fragment.file), problems)
    # The fragment's own parts, numbered as in the fragment: the planner counted the VM's
    # iommufd objects first.
    parts = tuple(
        attrs.evolve(p, index=p.index - objects_before) if p.section == "iommufd" else p
        for p in plan.parts
        if p.section != "iommufd" or p.index >= objects_before
    )
    numbers = {piece.fd for part in parts for piece in part.pieces if piece.fd is not None}
    return AttachPlan(
        fragment=fragment,
        parts=parts,
        fds=tuple(f for f in plan.fds if f.fd in numbers),
        memlock=memlock_plan(with_entries(running, entries_of(fragment))),
        run_as=plan.run_as,
        host_root=facts.root,
        notes=tuple(notes),
    )


def free_slots(query_pci: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    """The ids of root ports named `prefix`N with no device behind them, in order."""
    free: list[tuple[int, str]] = []

    def walk(devices: Sequence[Mapping[str, Any]]) -> None:
        for dev in devices:
            bridge = dev.get("pci_bridge")
            if not isinstance(bridge, Mapping):
                continue
            qdev = str(dev.get("qdev_id", ""))
            below = bridge.get("devices") or []
            if qdev.startswith(prefix) and qdev[len(prefix) :].isdigit() and not below:
                free.append((int(qdev[len(prefix) :]), qdev))
            walk(below)

    for bus in query_pci:
        walk(bus.get("devices", []))
    return [qdev for _, qdev in sorted(free)]


def label(part: Part, entry: Entry) -> dict[str, str]:
    """How `vmrun ps` shows an attached entry: like the config's passthrough devices."""
    device = part.device
    if isinstance(entry, Vfio):
        return layout.device_entry(entry.driver, entry.id, entry.source, entry.iommufd or "legacy")
    if isinstance(entry, Disk):
        assert device is not None
        return layout.device_entry(device.type, entry.id, str(entry.path), entry.format)
    if isinstance(entry, Net):
        source = f"tap {entry.ifname}" if entry.type == "tap" else "user"
        return layout.device_entry(entry.model, entry.id, source, "netdev")
    return layout.device_entry("iommufd", entry.id, "/dev/iommu", "object")
