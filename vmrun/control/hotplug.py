"""`vmrun attach` and `vmrun detach`: changing a running VM over its QMP socket.

vmrun opens what the fragment names exactly as a launch does (through the opener, as the
VM user), passes each fd over the socket (getfd / add-fd), and creates the pieces the
launch's planner describes. Every step that changed QEMU has its undo: when one fails,
the undos run backwards and the VM is as before. The memlock limit of the running QEMU is
raised (prlimit, on a process proven to be the VM's QEMU through its pidfd) before any
device goes in, and put back if the attach fails.
"""

from __future__ import annotations

import functools
import os
import pathlib
import resource
import time
from collections.abc import Callable
from typing import Any

import attrs

from vmrun.base import layout
from vmrun.base.errors import ConfigError, VmError
from vmrun.base.problems import Problem
from vmrun.base.sizes import UNLIMITED, format_limit
from vmrun.config import document, loader, rules
from vmrun.config.model import Config
from vmrun.control import state
from vmrun.control.qmp import CommandFailed, Monitor, QmpError
from vmrun.host import facts as host
from vmrun.kernel.opener import Opener
from vmrun.launch import fd_open
from vmrun.plan import attachment
from vmrun.plan.attachment import AttachPlan, Record
from vmrun.qemu.parts import Part, Piece

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
    record = vm.record  # as state.running judged it: read once
    if vm.config is None:
        raise VmError(f"the state of VM {name} does not name its config", "was it started by this vmrun?")
    try:
        launched = loader.load(vm.config)
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


def records_of(record: dict[str, Any]) -> list[Record]:
    return [r for r in (Record.of(d) for d in record.get("attached", ())) if r is not None]


def add_records(vm: state.Vm, new: list[Record]) -> None:
    record = state.read_vm_record(vm)
    state.write_vm_record(vm, with_records(record, [*records_of(record), *new]))


def with_records(record: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    """state.json with `records` as what is attached, and `devices` to match for ps/status."""
    own = [d for d in record.get("devices", []) if not layout.is_attached(d)]
    shown = [{**r.label, "attached": True} for r in records if r.device is not None]
    return {**record, "attached": [r.to_json() for r in records], "devices": own + shown}


class Memlock:
    """RLIMIT_MEMLOCK of the VM's QEMU, read and set only while its pidfd proves it is alive.

    prlimit takes a pid, not a pidfd: it reaches whatever process has that number when it
    is made. So the process is proven the VM's QEMU right before each call (its pidfd has
    not exited, and the pid still has the start time state.json recorded) and again right
    after: alive before and after, it was alive throughout, and a live process keeps its pid.
    """

    def __init__(self, identity: state.Identity, pidfd: int) -> None:
        self.identity = identity
        self.pid = identity.pid
        self.pidfd = pidfd
        self.before = self.get()

    def proven(self) -> None:
        if state.has_exited(self.pidfd):
            raise VmError(f"QEMU (pid {self.pid}) exited during the attach")
        try:
            ticks = state.start_ticks(self.pid)
        except OSError:
            ticks = None
        if ticks != self.identity.start_ticks or state.has_exited(self.pidfd):
            raise VmError(f"pid {self.pid} is no longer the VM's QEMU: its memlock limit was not touched")

    def get(self) -> tuple[int, int]:
        # /proc/PID/limits, not prlimit: reading another user's limits with prlimit needs
        # CAP_SYS_RESOURCE, and vmrun may be asked only to look.
        self.proven()
        try:
            with open(f"/proc/{self.pid}/limits") as f:
                text = f.read()
        except OSError as e:
            raise VmError(f"cannot read the limits of QEMU (pid {self.pid}): {e.strerror}") from None
        self.proven()
        for line in text.splitlines():
            if line.startswith("Max locked memory"):
                soft, hard = line.split()[3:5]
                return tuple(UNLIMITED if v == "unlimited" else int(v) for v in (soft, hard))  # type: ignore[return-value]
        raise VmError(f"/proc/{self.pid}/limits has no line for the memlock limit")

    def set(self, limits: tuple[int, int]) -> None:
        self.proven()
        try:
            resource.prlimit(self.pid, resource.RLIMIT_MEMLOCK, limits)
        except OSError as e:
            raise VmError(f"cannot set the memlock limit of QEMU (pid {self.pid}): {e.strerror}") from None
        self.proven()


class Transaction:
    """QMP steps, each with its undo; `rollback` runs the undos of the steps done, backwards."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.undos: list[tuple[str, Callable[[], str | None]]] = []
        self.last: str | None = None  # the step sent last, for a failure between steps

    def run(
        self, command: str, arguments: dict[str, Any], undo: tuple[str, Callable[[], str | None]] | None = None
    ) -> Any:
        """Send one step. Its undo is registered before the step is sent: when vmrun learns
        nothing of the outcome (a timeout, a closed socket, vmrun itself failing), the undo
        runs and finds nothing where QEMU did nothing. Only QEMU's own refusal drops it."""
        self.last = qmp_text(command, arguments)
        if undo is not None:
            self.undos.append(undo)
        try:
            return self.monitor.execute(command, arguments)
        except CommandFailed as e:
            if undo is not None:
                self.undos.remove(undo)
            raise StepFailed(self.last, f"QEMU: {e.desc}") from None
        except QmpError as e:
            raise StepFailed(self.last, e.what) from None

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
        if not rules.is_q35(self.running.config.vm.machine):
            return [None] * len(devices)
        free = attachment.free_slots(self.monitor.execute("query-pci"), rules.HOTPLUG_PORT)
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
        self.monitor.pass_fd(fd)
        if piece.kind == "add-fd":
            command, args = piece.qmp(self.fd_names, self.fdsets)
            opaque = str(args["opaque"])
            answer = self.tx.run(command, args, (f"remove-fd {opaque}", functools.partial(self.undo_fdset, opaque)))
            self.fdsets[piece.fdset] = int(answer["fdset-id"])
            return
        name = f"vmrun-{piece.kind}-{piece.id}"
        closefd = ("closefd", {"fdname": name})
        self.tx.run("getfd", {"fdname": name}, (qmp_text(*closefd), functools.partial(self.undo_command, *closefd)))
        self.fd_names[piece.fd] = name

    def undo_command(self, command: str, arguments: dict[str, Any]) -> str | None:
        try:
            self.monitor.execute(command, arguments)
        except CommandFailed as e:
            if e.error_class == "DeviceNotFound" or "not found" in e.desc:
                # Never made (vmrun failed as it was sent), or taken: a named fd is gone
                # from QEMU's list once the object or device it was for took it.
                return "it was not there"
            raise QmpError(e.desc) from None
        return None

    def undo_fdset(self, opaque: str) -> str | None:
        """Remove the fd set add-fd made for `opaque`, found by it: its number is QEMU's choice,
        unknown when the answer never came."""
        sets = self.monitor.execute("query-fdsets")
        ids = [s["fdset-id"] for s in sets if any(f.get("opaque") == opaque for f in s.get("fds", ()))]
        for fdset in ids:
            self.monitor.execute("remove-fd", {"fdset-id": fdset})
        return None if ids else "it was not there"

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
            undo_command = piece.undo()
            undo = functools.partial(self.undo_device, piece.id) if piece.kind == "device" else None
            self.tx.run(
                command, args, (qmp_text(*undo_command), undo or functools.partial(self.undo_command, *undo_command))
            )
            if piece.fd in self.fd_names:
                # QEMU took the named fd for this piece: undoing the piece releases it, and a
                # closefd would only find the name gone.
                self.tx.forget(f"closefd {self.fd_names[piece.fd]}")
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
    # Read once, under the trust rule with the config's owner: a fragment changes what root
    # opens and hands to QEMU, so it must be as trusted as the config. What is checked is
    # what is recorded.
    owner = running.launched.owner if running.launched.owner is not None else 0
    raw = document.read_toml(loader.read_file(path, owner, "fragment").text, path)
    fragment = loader.parse_fragment(raw, path, running.config, attachment.taken_ids(running.config))
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
                attacher = Attacher(running, plan, raw, monitor, Memlock(identity, pidfd))
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
    except BaseException as e:
        # All or nothing, whatever went wrong: a refusal of QEMU's, a vmrun that failed
        # between two steps, Ctrl-C. What was done is undone before anything is reported.
        undone = attacher.tx.rollback()
        if not isinstance(e, Exception | KeyboardInterrupt) or (not undone and isinstance(e, VmError)):
            raise  # nothing was done: vmrun's own refusal says it best
        last = attacher.tx.last
        if isinstance(e, StepFailed):
            where, why = f"at {e.step}", e.why
        else:
            where = f"after {last}" if last else "before its first step"
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else failure_text(e)
        raise VmError(
            f"attach to VM {attacher.running.vm.name} failed {where}: {why}\n"
            + "\n".join(f"  {line}" for line in undone),
            "the VM is as it was before the attach" if all(u.startswith("undone") for u in undone) else None,
        ) from None
    return Added(records, lines, memlock)


def failure_text(e: Exception) -> str:
    """An unexpected failure in words: vmrun's own errors as they say it, others by type."""
    if isinstance(e, VmError):
        return e.what
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {e}"


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
        record = state.read_vm_record(running.vm)
        state.write_vm_record(running.vm, with_records(record, [r for r in records_of(record) if r not in gone]))
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
