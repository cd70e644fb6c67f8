"""`vmrun attach` and `vmrun detach`: changing a running VM over its QMP socket.

vmrun opens what the fragment names exactly as a launch does (through the opener, as the
VM user), passes each fd over the socket (getfd / add-fd), and creates the pieces the
launch's planner describes. Every step that changed QEMU has its undo: when one fails,
the undos run backwards and the VM is as before. The memlock limit of the running QEMU is
raised (prlimit, on a process proven to be the VM's QEMU through its pidfd) before any
device goes in, and put back if the attach fails.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from vmrun import attachment, config, fd_open, host, state, statedir
from vmrun.attachment import AttachPlan, Record
from vmrun.errors import ConfigError
from vmrun.memlock import UNLIMITED
from vmrun.model import Config
from vmrun.opener import Opener
from vmrun.plan import HOTPLUG_PORT
from vmrun.problems import Problem
from vmrun.qemu_parts import Part, Piece
from vmrun.qmp import CommandFailed, Monitor, QmpError
from vmrun.sizes import format_limit
from vmrun.state import VmError

UNDO_DEVICE_TIMEOUT = 10.0
Say = Callable[[str], None]


class UnknownId(VmError):
    """detach was given an id that vmrun did not attach (bad input: exit status 2)."""


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.2f} s"


def qmp_text(command: str, arguments: dict[str, Any]) -> str:
    keys = ("id", "node-name", "fdname", "fdset-id", "opaque")
    ident = next((arguments[k] for k in keys if k in arguments), None)
    return f"{command} {ident}" if ident is not None else command


@attrs.frozen
class RunningVm:
    vm: state.Vm
    launched: Config
    records: tuple[Record, ...]
    config: Config  # launched + attached


def running_vm(name: str) -> RunningVm:
    """The running VM `name` as it is now: its launch record, its config, what was attached."""
    vm = state.running(name)
    record = read_record(vm)
    if vm.config is None:
        raise VmError(f"the state of VM {name} does not name its config", "was it started by this vmrun?")
    try:
        launched = config.load(vm.config)
    except ConfigError as e:
        raise VmError(
            f"the config VM {name} was started from no longer reads:\n{e}",
            "attach and detach need it as it was launched; put it back, or restart the VM with the fixed config",
        ) from None
    if launched.vm.name != name:
        raise VmError(f"{vm.config} now names its VM {launched.vm.name}, not {name}", "put the config back")
    if (launched.vm.user or None) != vm.run_as:
        raise VmError(
            f"{vm.config} now runs its VM as {launched.vm.user}, but {name} runs as {vm.run_as}",
            "put the config back, or restart the VM",
        )
    records = tuple(records_of(record))
    try:
        merged = attachment.running_config(launched, records)
    except ValueError as e:
        raise VmError(str(e)) from None
    return RunningVm(vm, launched, records, merged)


@contextlib.contextmanager
def vm_directory(vm: state.Vm) -> Iterator[int]:
    """The running VM's state directory as an fd (see statedir), closed on leaving."""
    directory = state.open_vm_dir(vm.name, os.path.dirname(vm.state_dir))
    if directory is None:
        raise VmError(f"VM {vm.name} has no state directory any more")
    try:
        yield directory
    finally:
        os.close(directory)


def read_record(vm: state.Vm) -> dict[str, Any]:
    with vm_directory(vm) as directory:
        return state.read_record(directory, vm.state_dir)[0]


def write_record(vm: state.Vm, record: dict[str, Any]) -> None:
    with vm_directory(vm) as directory:
        try:
            statedir.write_file(directory, "state.json", (json.dumps(record, indent=1) + "\n").encode())
        except OSError as e:
            raise VmError(f"cannot update {vm.state_dir}/state.json: {e.strerror}") from None


def records_of(record: dict[str, Any]) -> list[Record]:
    return [r for r in (Record.of(d) for d in record.get("attached", ())) if r is not None]


def add_records(vm: state.Vm, new: list[Record]) -> None:
    record = read_record(vm)
    write_record(vm, with_records(record, [*records_of(record), *new]))


def with_records(record: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    """state.json with `records` as what is attached, and `devices` to match for ps/status."""
    own = [d for d in record.get("devices", []) if not (isinstance(d, dict) and d.get("attached"))]
    shown = [{**r.label, "attached": True} for r in records if r.device is not None]
    return {**record, "attached": [r.to_json() for r in records], "devices": own + shown}


class Memlock:
    """RLIMIT_MEMLOCK of the VM's QEMU, read and set only while its pidfd says it is alive."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.before = self.get()

    def alive(self) -> None:
        if state.has_exited(self.pidfd):
            raise VmError(f"QEMU (pid {self.pid}) exited during the attach")

    def get(self) -> tuple[int, int]:
        # /proc/PID/limits, not prlimit: reading another user's limits with prlimit needs
        # CAP_SYS_RESOURCE, and vmrun may be asked only to look.
        try:
            with open(f"/proc/{self.pid}/limits") as f:
                text = f.read()
        except OSError as e:
            raise VmError(f"cannot read the limits of QEMU (pid {self.pid}): {e.strerror}") from None
        self.alive()
        for line in text.splitlines():
            if line.startswith("Max locked memory"):
                soft, hard = line.split()[3:5]
                return tuple(UNLIMITED if v == "unlimited" else int(v) for v in (soft, hard))  # type: ignore[return-value]
        raise VmError(f"/proc/{self.pid}/limits has no line for the memlock limit")

    def set(self, limits: tuple[int, int]) -> None:
        try:
            resource.prlimit(self.pid, resource.RLIMIT_MEMLOCK, limits)
        except OSError as e:
            raise VmError(f"cannot set the memlock limit of QEMU (pid {self.pid}): {e.strerror}") from None
        # The pid named the proven process throughout: it was alive after the call.
        self.alive()


class Transaction:
    """QMP steps, each with its undo; `rollback` runs the undos of the steps done, backwards."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.undos: list[tuple[str, Callable[[], str | None]]] = []

    def run(self, command: str, arguments: dict[str, Any]) -> Any:
        try:
            return self.monitor.execute(command, arguments)
        except CommandFailed as e:
            raise StepFailed(qmp_text(command, arguments), f"QEMU: {e.desc}") from None
        except QmpError as e:
            raise StepFailed(qmp_text(command, arguments), e.what) from None

    def on_undo(self, what: str, undo: Callable[[], str | None]) -> None:
        self.undos.append((what, undo))

    def forget(self, what: str) -> None:
        """Drop the undo registered as `what`: its step's effect is no longer there to undo."""
        self.undos = [(w, u) for w, u in self.undos if w != what]

    def rollback(self) -> list[str]:
        """What each undo did, for the message; a failed undo is reported, not raised."""
        report = []
        for what, undo in reversed(self.undos):
            try:
                left = undo()
                report.append(f"undone: {what}" + (f" ({left})" if left else ""))
            except (QmpError, VmError, OSError) as e:
                report.append(f"NOT undone: {what}: {e}")
        self.undos.clear()
        return report


class StepFailed(Exception):
    def __init__(self, step: str, why: str) -> None:
        super().__init__(f"{step}: {why}")
        self.step = step
        self.why = why


def device_gone(monitor: Monitor, device: str, timeout: float) -> bool:
    """device_del, then wait for QEMU's DEVICE_DELETED: the guest must let go of it first."""
    listener = monitor.listen("DEVICE_DELETED")
    try:
        try:
            monitor.execute("device_del", {"id": device})
        except CommandFailed as e:
            if e.error_class == "DeviceNotFound":
                return True  # gone already: the guest let go after an earlier try
            if "already in the process of unplug" not in e.desc:
                raise
        event = monitor.wait_event(listener, lambda data: data.get("device") == device, timeout)
        return event is not None
    finally:
        monitor.client.remove_listener(listener)


class Attacher:
    def __init__(
        self,
        running: RunningVm,
        plan: AttachPlan,
        raw: dict[str, Any],
        monitor: Monitor,
        memlock: Memlock,
    ) -> None:
        self.running = running
        self.plan = plan
        self.raw = raw  # the fragment's TOML as read
        self.monitor = monitor
        self.memlock = memlock
        self.tx = Transaction(monitor)
        self.fd_names: dict[int, str] = {}
        self.fdsets: dict[int, int] = {}

    def check_ids(self) -> None:
        """Ids QEMU already has (the config may have changed since the launch): refused."""
        peripherals = {p["name"] for p in self.monitor.execute("qom-list", {"path": "/machine/peripheral"})}
        objects = {p["name"] for p in self.monitor.execute("qom-list", {"path": "/objects"})}
        nodes = {n.get("node-name") for n in self.monitor.execute("query-named-block-nodes")}
        problems = []
        for part in self.plan.parts:
            for piece in part.pieces:
                ident = piece.id
                where = {"device": peripherals, "object": objects, "blockdev": nodes}.get(piece.kind, set())
                if ident and ident in where:
                    problems.append(
                        Problem(
                            f"{part.section}[{part.index}].id",
                            f"QEMU of VM {self.running.vm.name} already has a {piece.kind} {ident}",
                            "pick another id",
                        )
                    )
        if problems:
            raise ConfigError(str(self.plan.fragment.file), problems)

    def slots(self) -> list[str | None]:
        """A free hot-plug slot for each device of the fragment (None: the root bus, off q35)."""
        devices = self.plan.devices
        if not devices:
            return []
        if not config.is_q35(self.running.config.vm.machine):
            return [None] * len(devices)
        free = attachment.free_slots(self.monitor.execute("query-pci"), HOTPLUG_PORT)
        if len(free) < len(devices):
            vm = self.running.config.vm
            raise VmError(
                f"VM {vm.name} has {len(free)} free hot-plug slot{'s' if len(free) != 1 else ''}, "
                f"and the fragment needs {len(devices)}",
                "detach a device first, or raise [vm] hotplug_slots in the config (the VM's next start has them)",
            )
        return list(free[: len(devices)])

    def raise_memlock(self) -> str:
        new = self.plan.memlock.limit
        soft, hard = self.memlock.before
        if new is None or (soft == UNLIMITED or (new != UNLIMITED and soft >= new)):
            return f"memlock stays {format_limit(soft)}"
        if not host.current_launcher().cap_sys_resource:
            raise VmError(
                f"VM {self.running.vm.name} needs RLIMIT_MEMLOCK {format_limit(new)} with the fragment"
                f" ({self.plan.memlock.derivation}); its QEMU has {format_limit(soft)}, and vmrun may not raise it",
                "run vmrun attach as root (it needs CAP_SYS_RESOURCE); nothing was changed",
            )
        # Soft and hard alike, as at launch: QEMU must not raise its own limit.
        self.memlock.set((new, new))
        self.tx.on_undo(f"RLIMIT_MEMLOCK back to {format_limit(soft)}", lambda: self.memlock.set((soft, hard)))
        return f"memlock {format_limit(soft)} -> {format_limit(new)} ({self.plan.memlock.derivation})"

    def pass_fd(self, piece: Piece, opened: dict[int, int]) -> None:
        assert piece.fd is not None
        fd = opened[piece.fd]
        if piece.kind == "add-fd":
            self.monitor.pass_fd(fd)
            command, args = piece.qmp(self.fd_names, self.fdsets)
            answer = self.tx.run(command, args)
            fdset = int(answer["fdset-id"])
            self.fdsets[piece.fdset] = fdset
            self.tx.on_undo(f"remove-fd {fdset}", lambda: self.undo_command("remove-fd", {"fdset-id": fdset}))
            return
        name = f"vmrun-{piece.kind}-{piece.id}"
        self.monitor.pass_fd(fd)
        self.tx.run("getfd", {"fdname": name})
        self.fd_names[piece.fd] = name
        # Once a piece took the fd, QEMU has forgotten the name: closefd then finds nothing.
        self.tx.on_undo(f"closefd {name}", lambda: self.undo_command("closefd", {"fdname": name}, missing_ok=True))

    def undo_command(self, command: str, arguments: dict[str, Any], missing_ok: bool = False) -> str | None:
        try:
            self.monitor.execute(command, arguments)
        except CommandFailed as e:
            if missing_ok:
                return "already taken by QEMU"
            raise QmpError(e.desc) from None
        return None

    def undo_device(self, device: str) -> str | None:
        if device_gone(self.monitor, device, UNDO_DEVICE_TIMEOUT):
            return None
        raise VmError(
            f"the guest did not release {device} within {UNDO_DEVICE_TIMEOUT:g} s; "
            f"`vmrun detach {self.running.vm.name} {device}` once it does"
        )

    def add(self, part: Part, slot: str | None, opened: dict[int, int]) -> Record:
        for piece in part.pieces:
            if piece.fd is not None and piece.fd in opened:
                self.pass_fd(piece, opened)
            if piece.kind == "add-fd":
                continue
            command, args = piece.qmp(self.fd_names, self.fdsets)
            if piece.kind == "device" and slot is not None:
                args["bus"] = slot
            self.tx.run(command, args)
            if piece.fd in self.fd_names:
                # QEMU took the named fd for this piece: undoing the piece releases it, and a
                # closefd would only find the name gone.
                self.tx.forget(f"closefd {self.fd_names[piece.fd]}")
            if piece.kind == "device":
                self.tx.on_undo(f"device_del {piece.id}", functools.partial(self.undo_device, piece.id))
            else:
                undo_command, undo_args = piece.undo()
                self.tx.on_undo(
                    qmp_text(undo_command, undo_args), functools.partial(self.undo_command, undo_command, undo_args)
                )
        return self.record(part)

    def record(self, part: Part) -> Record:
        fragment = self.plan.fragment
        entry = getattr(fragment, part.section)[part.index]
        backend: list[tuple[str, dict[str, Any]]] = []
        for piece in reversed(part.pieces):
            if piece.kind == "device":
                continue
            if piece.kind == "add-fd":
                backend.append(("remove-fd", {"fdset-id": self.fdsets[piece.fdset]}))
            else:
                backend.append(piece.undo())
        device = part.device
        return Record(
            section=part.section,
            id=part.id,
            raw=dict(self.raw[part.section][part.index]),
            base=str(pathlib.Path(fragment.file).absolute().parent),
            fragment=str(pathlib.Path(fragment.file).absolute()),
            device=device.id if device is not None else None,
            label=attachment.label(part, entry),
            backend=tuple(backend),
        )


def attach(name: str, fragment_file: str, host_root: str, say: Say, passed: frozenset[int]) -> None:
    """`passed`: the fds the caller passed in (fd_open.open_fds, taken before vmrun opened any)."""
    start = time.monotonic()
    running = running_vm(name)
    path = pathlib.Path(fragment_file)
    raw = config.read_toml(config.read_text(path), path)  # read once: what is checked is what is recorded
    fragment = config.parse_fragment(raw, path, running.config, attachment.taken_ids(running.config))
    identity = running.vm.identity
    assert identity is not None
    run_as = host.lookup_user(running.config.vm.user) if running.config.vm.user else None
    with Opener(run_as) as as_user:
        facts = host.gather(fragment, host_root, opener=as_user)
        plan = attachment.plan_attach(running.config, fragment, facts)
        for note in plan.notes:
            say(f"note: {note.render(str(fragment.file))}")
        pidfd = state.open_pidfd(identity, identity.lock)
        try:
            with Monitor(running.vm.qmp_socket) as monitor:
                attacher = Attacher(running, plan, raw, monitor, Memlock(identity.pid, pidfd))
                attacher.check_ids()
                slots = attacher.slots()
                opened = open_all(plan, as_user, passed)
                try:
                    # Recorded while vmrun still holds QEMU's one QMP session: no other
                    # attach or detach can read or write state.json meanwhile.
                    added = carry_out(attacher, slots, opened, lambda new: add_records(running.vm, new))
                finally:
                    for fd in opened.values():
                        os.close(fd)
        finally:
            os.close(pidfd)
    for line in added.lines:
        say(line)
    say(f"attached to VM {name} in {elapsed(start)}; {added.memlock}")
    say(
        f"not in {running.vm.config}: a restart of the VM brings none of this back; "
        "add the entries to the config to keep them"
    )


@attrs.frozen
class Added:
    records: list[Record]
    lines: list[str]
    memlock: str


def open_all(plan: AttachPlan, as_user: Opener, passed: frozenset[int]) -> dict[int, int]:
    opened: dict[int, int] = {}
    try:
        for spec in plan.fds:
            if spec.path is None:  # passed in by the caller of vmrun attach
                fd_open.check_caller_fd(spec, "vmrun attach NAME FRAGMENT", passed)
                opened[spec.fd] = os.dup(spec.fd)
                continue
            opened[spec.fd] = fd_open.open_for_qemu(spec, plan.host_root, as_user)
    except BaseException:
        for fd in opened.values():
            os.close(fd)
        raise
    return opened


def carry_out(
    attacher: Attacher, slots: list[str | None], opened: dict[int, int], commit: Callable[[list[Record]], None]
) -> Added:
    """Every step, then `commit` of what was added; a failure of either undoes every step."""
    plan = attacher.plan
    free = iter(slots)
    records: list[Record] = []
    lines: list[str] = []
    try:
        memlock = attacher.raise_memlock()
        for part in plan.parts:
            slot = next(free) if attachment.needs_slot(part) else None
            record = attacher.add(part, slot, opened)
            records.append(record)
            bus = dict(part.device.props).get("bus") if part.device is not None else None
            where = f" on {slot or bus}" if slot or bus else ""
            lab = record.label
            lines.append(
                f"attached {part.section} {part.id}: {lab['driver']} ({lab['source']}, {lab['backend']}){where}"
            )
        commit(records)
    except StepFailed as e:
        undone = attacher.tx.rollback()
        raise VmError(
            f"attach to VM {attacher.running.vm.name} failed at {e.step}: {e.why}\n"
            + "\n".join(f"  {line}" for line in undone),
            "the VM is as it was before the attach" if all(u.startswith("undone") for u in undone) else None,
        ) from None
    except BaseException:
        attacher.tx.rollback()
        raise
    return Added(records, lines, memlock)


def detach(name: str, ident: str, timeout: float, say: Say) -> None:
    start = time.monotonic()
    running = running_vm(name)
    records = list(running.records)
    target = next((r for r in records if r.id == ident or r.device == ident), None)
    if target is None:
        if ident in attachment.taken_ids(running.launched):
            raise UnknownId(
                f"{ident} is part of VM {name}'s config ({running.vm.config}), not attached by vmrun",
                "devices of the config sit on the root bus, which has no hot-plug; change the config and restart",
            )
        attached = ", ".join(r.id for r in records) or "nothing"
        raise UnknownId(f"VM {name} has no attached device or object {ident}", f"attached: {attached}")
    users = [d.id for d in running.config.vfio if target.section == "iommufd" and d.iommufd == target.id]
    if users:
        # QEMU refuses object-del while a device holds the object: asking would change nothing
        # in QEMU and, done anyway, lose the record of an object that is still there.
        raise UnknownId(
            f"iommufd object {ident} of VM {name} is in use by {', '.join(users)}",
            f"detach {' and '.join(users)}: an object vmrun attached goes with its last device",
        )
    with Monitor(running.vm.qmp_socket) as monitor:
        if target.device is not None and not device_gone(monitor, target.device, timeout):
            raise VmError(
                f"the guest of VM {name} did not release {target.device} within {timeout:g} s;"
                " the VM keeps running with the device",
                f"the guest may still let go of it later: run `vmrun detach {name} {ident}` again then,"
                " or give more time with --timeout",
            )
        leftovers = [*remove_backend(monitor, target)]
        remaining = [r for r in records if r is not target]
        gone = [target]
        # An iommufd object vmrun attached goes with its last device.
        used = {d.iommufd for d in running.config.vfio if d.id != target.id}
        for r in remaining:
            if r.section == "iommufd" and r.id not in used:
                leftovers += remove_backend(monitor, r)
                gone.append(r)
        record = read_record(running.vm)
        write_record(running.vm, with_records(record, [r for r in records_of(record) if r not in gone]))
    for r in gone:
        say(f"detached {r.section} {r.id}")
    for line in leftovers:
        say(f"warning: {line}")
    say(f"detached from VM {name} in {elapsed(start)}; memlock left as it is")


def remove_backend(monitor: Monitor, record: Record) -> list[str]:
    """Remove what backed an attached device, once the device is gone; what failed, in words."""
    failed = []
    for command, arguments in record.backend:
        try:
            monitor.execute(command, arguments)
        except CommandFailed as e:
            failed.append(f"{qmp_text(command, arguments)} failed: {e.desc}")
    return failed
