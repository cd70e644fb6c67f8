"""`vmrun upgrade NAME`: a new QEMU process takes the running VM over (CPR transfer).

The guest's RAM is a shared memfd from launch (vm.shared_ram), so the new QEMU maps the
same pages; VFIO devices and iommufd objects come over the CPR channel (QEMU 10.1+), with
their DMA mappings. Everything else the new process gets from the old one: vmrun takes
the old QEMU's fds at the planned numbers (pidfd_getfd), so the lock stays held, the QMP
and console sockets keep their paths, taps stay attached, and images hand their locks over
as in any migration. The new process starts from the plan the VM was launched with (the
config planned again must give the very command line that runs), as the same user, with
the memlock limit the old one has now and the same sandbox.

Until QEMU reports the migration completed, the old QEMU keeps the guest: any failure
cancels the migration, kills the new process and leaves the old running as it was. With
QEMU's return path on, "completed" means the new QEMU has started the guest. Then the
record names the new process, and the old one, postmigrate, is told to quit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import time
from typing import Any

import attrs

from vmrun.base.errors import LaunchError, VmError
from vmrun.base.text import printable
from vmrun.control import hotplug, state
from vmrun.control.qmp import CommandFailed, Monitor, QmpError
from vmrun.host import facts as host
from vmrun.host.qemu_caps import QemuCaps, probe
from vmrun.kernel import pidfd as pidfds
from vmrun.kernel import statedir
from vmrun.kernel.opener import Opener
from vmrun.launch import successor
from vmrun.plan.placement import shares_ram
from vmrun.plan.planner import Plan, plan

CHANNELS = ("main", "cpr")
CPR_HANDSHAKE_SINCE = (10, 1, 0)
POLL = 0.01


class UpgradeRefused(VmError):
    """The VM cannot be upgraded as it runs; nothing was touched."""


@attrs.frozen
class Upgraded:
    old_pid: int
    new_pid: int
    old_version: str
    new_version: str
    pause: float | None  # seconds from the old QEMU's STOP to completion (the new one runs the guest)
    total: float


def channel_dir(vm: state.Vm) -> str:
    """Where the two QEMUs meet: a directory of the VM user's beside the VM directories (a VM
    name never starts with a dot), as both QEMUs reach their sockets by path."""
    return os.path.join(os.path.dirname(vm.state_dir), f".cpr-{vm.name}")


def channel(directory: str, kind: str) -> dict[str, Any]:
    path = os.path.join(directory, f"{kind}.sock")
    return {"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": path}}


def machine_type(qom_type: str) -> str:
    """`pc-q35-10.0-machine` -> `pc-q35-10.0`: the new binary's `q35` may be a newer version,
    whose state the old one's would not match."""
    return qom_type.removesuffix("-machine")


def comparable(argv: list[str]) -> list[str]:
    """A command line as its plan says it: without the -incoming of an upgrade or the -S of
    a paused launch, and with the machine type an upgrade pinned (pc-q35-10.0) back to the
    config's (q35)."""
    out: list[str] = []
    words = iter(argv)
    for arg in words:
        if arg == "-S":
            continue  # `vmrun run --paused`: the new QEMU takes the old one's run state instead
        if arg == "-incoming":
            next(words, None)
            continue
        if arg in ("-machine", "-M"):
            props = next(words, "").split(",")
            out += [arg, ",".join(["*", *props[1:]] if props and "=" not in props[0] else props)]
            continue
        out.append(arg)
    return out


def pinned_argv(argv: list[str], machine: str) -> list[str]:
    """`argv` with the -machine type replaced by the exact one the old QEMU runs."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in ("-machine", "-M"):
            props = out[i + 1].split(",")
            if props and "=" not in props[0]:
                props[0] = machine
            else:
                props = [f"type={machine}", *(p for p in props if not p.startswith("type="))]
            out[i + 1] = ",".join(props)
            break
    return out


def refusals(running: Plan, caps_old: QemuCaps | None, caps_new: QemuCaps | None, new_binary: str) -> list[str]:
    """Why this VM cannot be upgraded, before anything is touched ([] when it can)."""
    why = []
    argv = running.argv
    if not shares_ram(argv):
        why.append(
            "its guest RAM is not shared memory (it started without vm.shared_ram): the new QEMU could not"
            " take it over; restart it once with shared_ram = true"
        )
    for name, caps in (("running", caps_old), ("new", caps_new)):
        if caps is None:
            why.append(f"the {name} QEMU binary ({new_binary if name == 'new' else argv[0]}) cannot be run")
        elif not caps.has_cpr_transfer:
            why.append(f"the {name} QEMU ({caps.version_text}) has no CPR transfer: 10.0 or later is needed")
        elif running.passthrough and not caps.has_vfio_cpr:
            why.append(f"the {name} QEMU ({caps.version_text}) cannot hand VFIO devices over: 10.1 or later is needed")
    if caps_old and caps_new and caps_old.version >= CPR_HANDSHAKE_SINCE > caps_new.version:
        # From 10.1 the old QEMU connects the main channel once the new one has closed the CPR
        # channel; a 10.0 never signals that: the old one connects too early and fails.
        why.append(
            f"QEMU {caps_old.version_text} cannot hand over to {caps_new.version_text}: the CPR channel's handshake"
            " changed in 10.1"
        )
    if any("hostfwd=" in a for a in argv):
        why.append("a user network forwards host ports, which the old QEMU holds until it quits")
    return why


class Upgrade:
    def __init__(self, name: str, new_binary: str | None, timeout: float, host_root: str) -> None:
        self.timeout = timeout
        self.running = hotplug.running_vm(name)
        self.vm = self.running.vm
        identity = self.vm.identity
        assert identity is not None
        self.identity = identity
        if self.running.records:
            ids = ", ".join(r.id for r in self.running.records)
            raise UpgradeRefused(
                f"VM {name} has devices attached since launch ({ids}): the new QEMU would start without them",
                f"detach them first (vmrun detach {name} ID), or add them to the config and restart",
            )
        launched = self.running.launched
        run_as = host.lookup_user(launched.vm.user) if launched.vm.user else None
        with Opener(run_as) as as_user:
            self.plan = plan(launched, host.gather(launched, host_root, opener=as_user))
        recorded = list(self.identity.argv)
        # The binary aside: an earlier upgrade may have changed it.
        if comparable(self.plan.argv)[1:] != comparable(recorded)[1:]:
            raise UpgradeRefused(
                f"the config of VM {name} no longer plans the command line it runs with"
                f" ({first_difference(comparable(recorded)[1:], comparable(self.plan.argv)[1:])})",
                "upgrade carries the VM over as it runs: put the config back, or stop and start the VM",
            )
        self.new_binary = new_binary or recorded[0]
        # The probe runs the binary: never as root (as host.gather probes for a launch).
        prober = self.plan.run_as or (host.lookup_user("nobody") if os.geteuid() == 0 else None)
        self.caps_old = probe(recorded[0], as_user=prober)
        self.caps_new = probe(self.new_binary, as_user=prober)
        why = refusals(self.plan, self.caps_old, self.caps_new, self.new_binary)
        if why:
            raise UpgradeRefused(f"VM {name} cannot be upgraded: " + "; ".join(why), "nothing was changed")

    def run(self) -> Upgraded:
        start = time.monotonic()
        old_pidfd = state.open_pidfd(self.identity, self.identity.lock)
        try:
            with Monitor(self.vm.qmp_socket) as old:
                return self.carry_over(old, old_pidfd, start)
        finally:
            os.close(old_pidfd)

    def preflight(self, old: Monitor) -> str:
        """Set the old QEMU up for CPR transfer; the machine type it runs. Refused (and put
        back) when QEMU names a blocker: a device that cannot migrate, RAM that is not shared,
        a kernel without the iommufd or type1 calls CPR needs."""
        machine = machine_type(str(old.execute("qom-get", {"path": "/machine", "property": "type"})))
        old.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        blocked = old.execute("query-migrate").get("blocked-reasons") or []
        if blocked:
            old.execute("migrate-set-parameters", {"mode": "normal"})
            raise UpgradeRefused(
                f"QEMU refuses CPR transfer of VM {self.vm.name}: " + "; ".join(printable(str(b)) for b in blocked),
                "nothing was changed; the VM runs on",
            )
        caps = [{"capability": c, "state": True} for c in ("return-path", "events")]
        old.execute("migrate-set-capabilities", {"capabilities": caps})
        return machine

    def take_fds(self, old_pidfd: int) -> dict[int, int]:
        """The old QEMU's fds at the planned numbers, as the new one gets them."""
        taken: dict[int, int] = {}
        try:
            for spec in self.plan.fds:
                taken[spec.fd] = pidfds.getfd(old_pidfd, spec.fd)
                if spec.kind == "lock":
                    st = os.fstat(taken[spec.fd])
                    if (st.st_dev, st.st_ino) != self.identity.lock:
                        raise VmError(f"fd {spec.fd} of the running QEMU is not the VM's lock")
        except OSError as e:
            for fd in taken.values():
                os.close(fd)
            raise VmError(f"cannot take the running QEMU's fds: {e.strerror}", "run vmrun upgrade as root") from None
        except BaseException:
            for fd in taken.values():
                os.close(fd)
            raise
        return taken

    def carry_over(self, old: Monitor, old_pidfd: int, start: float) -> Upgraded:
        machine = self.preflight(old)
        directory = channel_dir(self.vm)
        dir_fd = self.channel_directory(directory)
        taken: dict[int, int] = {}
        new_pid: int | None = None
        new_pidfd: int | None = None
        done = False
        try:
            taken = self.take_fds(old_pidfd)
            stdio = tuple(pidfds.getfd(old_pidfd, n) for n in (0, 1, 2))
            try:
                argv = pinned_argv([self.new_binary, *comparable(list(self.identity.argv))[1:]], machine)
                argv += [a for c in CHANNELS for a in ("-incoming", json.dumps(channel(directory, c)))]
                # As the old QEMU has it now (attach may have raised it), soft and hard alike.
                limit = hotplug.Memlock(self.identity, old_pidfd).get()[0]
                new_pid = successor.start(self.plan, argv, taken, (stdio[0], stdio[1], stdio[2]), limit)
            finally:
                for fd in stdio:
                    os.close(fd)
            new_pidfd = os.pidfd_open(new_pid)
            stop = old.listen("STOP")
            migration = old.listen("MIGRATION")
            self.wait_listening(dir_fd, directory, new_pidfd)
            old.execute("migrate", {"channels": [channel(directory, c) for c in CHANNELS]})
            try:
                completed = self.wait_completed(old, migration, new_pidfd)
            except BaseException:
                if not self.completed_anyway(old, new_pidfd):
                    raise
                completed = {}
            done = True
            stopped = old.wait_event(stop, lambda data: True, 0.5)
            pause = event_time(completed) - event_time(stopped) if stopped is not None and completed else None
            self.record(new_pid, argv)
            self.quit_old(old, old_pidfd)
            return Upgraded(
                self.identity.pid,
                new_pid,
                self.caps_old.version_text if self.caps_old else "?",
                self.caps_new.version_text if self.caps_new else "?",
                pause,
                time.monotonic() - start,
            )
        except BaseException:
            if not done:
                self.abandon(old, new_pidfd)
            raise
        finally:
            for fd in taken.values():
                os.close(fd)
            if new_pidfd is not None:
                os.close(new_pidfd)
            self.remove_channels(dir_fd)

    def channel_directory(self, directory: str) -> int:
        """The VM user's private directory for the two channel sockets, empty."""
        base = os.path.dirname(directory)
        try:
            base_fd = statedir.open_dir(base, create=False)
            try:
                fd = statedir.user_dir(base_fd, os.path.basename(directory), self.plan.run_as)
            finally:
                os.close(base_fd)
        except statedir.UnsafeDirectory as e:
            raise VmError(e.what, e.hint) from None
        except OSError as e:
            raise VmError(f"cannot make {directory}: {e.strerror}") from None
        self.remove_channels(fd, close=False)
        return fd

    def remove_channels(self, dir_fd: int, close: bool = True) -> None:
        for kind in CHANNELS:
            statedir.remove(dir_fd, f"{kind}.sock")
        if close:
            os.close(dir_fd)
            directory = channel_dir(self.vm)
            with contextlib.suppress(OSError, statedir.UnsafeDirectory):
                base_fd = statedir.open_dir(os.path.dirname(directory), create=False)
                try:
                    os.rmdir(os.path.basename(directory), dir_fd=base_fd)
                finally:
                    os.close(base_fd)

    def wait_listening(self, dir_fd: int, directory: str, new_pidfd: int) -> None:
        """Until the new QEMU listens on its CPR channel (it binds it first thing). Looked at
        through the directory's fd, never following a link: the directory is the VM user's."""
        deadline = time.monotonic() + self.timeout
        path = os.path.join(directory, "cpr.sock")
        while not is_socket(dir_fd, "cpr.sock"):
            if state.has_exited(new_pidfd):
                raise VmError("the new QEMU exited before it listened for the VM (its errors are in the VM's log)")
            if time.monotonic() > deadline:
                raise VmError(f"the new QEMU did not listen on {path} within {self.timeout:g} s")
            time.sleep(POLL)

    def completed_anyway(self, old: Monitor, new_pidfd: int) -> bool:
        """Whether the hand-over completed after all (a wait cut short by a timeout or Ctrl-C
        at the last moment): then the new QEMU runs the guest, and the old must not resume."""
        try:
            return old.execute("query-migrate").get("status") == "completed" and not state.has_exited(new_pidfd)
        except (VmError, OSError):
            return False

    def wait_completed(self, old: Monitor, migration: Any, new_pidfd: int) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            event = old.wait_event(
                migration, lambda data: data.get("status") in ("completed", "failed", "cancelled"), 0.05
            )
            if event is not None:
                status = event["data"]["status"]
                if status == "completed":
                    return event
                info = old.execute("query-migrate")
                raise VmError(f"the migration to the new QEMU {status}: {printable(str(info.get('error-desc', '')))}")
            if state.has_exited(new_pidfd):
                raise VmError("the new QEMU exited during the hand-over (its errors are in the VM's log)")
            if time.monotonic() > deadline:
                raise VmError(f"the hand-over did not complete within {self.timeout:g} s")

    def abandon(self, old: Monitor, new_pidfd: int | None) -> None:
        """Before completion: the old QEMU keeps the guest, the new one goes. The old one is
        resumed only when QEMU says the migration failed or was cancelled: after "completed"
        the guest is the new QEMU's, and two QEMUs must never run it."""
        with contextlib.suppress(VmError, OSError):
            old.execute("migrate_cancel")
        if new_pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(new_pidfd, signal.SIGKILL)
        with contextlib.suppress(VmError, OSError):
            migration = old.execute("query-migrate").get("status")
            old.execute("migrate-set-parameters", {"mode": "normal"})
            if migration in ("failed", "cancelled", None) and old.execute("query-status").get("status") in (
                "postmigrate",
                "finish-migrate",
            ):
                old.execute("cont")

    def record(self, new_pid: int, argv: list[str]) -> None:
        record = state.read_vm_record(self.vm)
        record.update(
            pid=new_pid,
            start_ticks=state.start_ticks(new_pid),
            exe=os.path.realpath(argv[0]),
            argv=argv,
            phase="exec",
            upgraded=time.time(),
        )
        record.pop("launcher", None)
        state.write_vm_record(self.vm, record, pid=new_pid)

    def quit_old(self, old: Monitor, old_pidfd: int) -> None:
        with contextlib.suppress(QmpError, CommandFailed):
            old.execute("quit")
        deadline = time.monotonic() + 10
        while not state.has_exited(old_pidfd):
            if time.monotonic() > deadline:
                signal.pidfd_send_signal(old_pidfd, signal.SIGKILL)
                break
            time.sleep(POLL)


def is_socket(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def event_time(event: Any) -> float:
    stamp = event.get("timestamp", {})
    return float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6


def first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return f"runs {printable(x)}, plans {printable(y)}"
    return f"runs {len(a)} arguments, plans {len(b)}"


def upgrade(name: str, new_binary: str | None, timeout: float, host_root: str) -> Upgraded:
    try:
        job = Upgrade(name, new_binary, timeout, host_root)
    except LaunchError as e:
        raise VmError(str(e)) from None
    return job.run()
