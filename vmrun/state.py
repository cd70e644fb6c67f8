"""The running VMs as the host shows them: one state directory per VM name, read-only.

`vmrun run` leaves `lock`, `pid`, `state.json` and `qmp.sock` in `<state base>/NAME`, and
QEMU inherits the lock. So a VM is running exactly while its lock is held and the pid
recorded for it is alive; a directory whose lock is free is what a stopped VM left behind.
Nothing here writes: a VM that crashed leaves files, never a stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from typing import Any, Literal

import attrs

from vmrun import config, host
from vmrun.errors import Failure

State = Literal["running", "starting", "stopped"]
# A name becomes a directory under the state base: never "." or "..", never a path.
# The pid in state.json is QEMU's only if that process started before vmrun wrote the file;
# a process started later reuses the number. Allow for the clock ticks /proc rounds to.
START_SLACK = 1.0


class VmError(Failure):
    """A VM cannot be found, reached or stopped."""


class BadName(ValueError):
    pass


@attrs.frozen
class Process:
    """What the host says about a VM's QEMU process; None where it would not tell."""

    pid: int
    user: str | None
    started: float
    rss: int | None
    cpu_percent: float | None = None

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started)


@attrs.frozen
class Vm:
    name: str
    state_dir: str
    state: State
    pid: int | None  # as recorded; the live process is `process`
    config: str | None = None
    run_as: str | None = None
    devices: tuple[str, ...] = ()
    process: Process | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.state_dir, "qmp.sock")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.state_dir, "lock")

    def to_json(self) -> dict[str, Any]:
        p = self.process
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "user": p.user if p else None,
            "started": p.started if p else None,
            "uptime_s": round(p.uptime, 1) if p else None,
            "rss_bytes": p.rss if p else None,
            "cpu_percent": p.cpu_percent if p else None,
            "config": self.config,
            "run_as": self.run_as,
            "devices": list(self.devices),
            "state_dir": self.state_dir,
        }


def base() -> str:
    return host.state_base(os.geteuid())


def check_name(name: str) -> str:
    if not config.NAME_RE.fullmatch(name):
        raise BadName(f"{name!r} is not a VM name (letters, digits, '-', '.' and '_', as vm.name in a config)")
    return name


def lock_held(path: str) -> bool:
    """Whether someone (QEMU, or a `vmrun run` about to exec it) holds the VM's lock.

    A shared lock that we get means nobody holds the exclusive one; it is released at once
    by closing, so a `vmrun run` racing with us fails only within that instant.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise VmError(
            f"cannot read {path}: permission denied",
            "the VMs under this state directory belong to another user; run vmrun as that user or as root",
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def process(pid: int, recorded_start: float | None, cpu_interval: float | None = None) -> Process | None:
    """The live process `pid`, if it is the one vmrun started; None when it is gone."""
    import psutil  # not at the top: `vmrun run` imports this module for its errors, and starts fast

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None  # exited, not yet reaped by its parent: its fds (and the lock) are closed
            started = proc.create_time()
            if recorded_start is not None and started > recorded_start + START_SLACK:
                return None  # the pid was reused by a later process
            try:
                user: str | None = proc.username()
            except (psutil.AccessDenied, KeyError):
                user = None
            try:
                rss: int | None = proc.memory_info().rss
            except psutil.AccessDenied:
                rss = None
        cpu = None
        if cpu_interval is not None:
            try:
                cpu = proc.cpu_percent(interval=cpu_interval)
            except psutil.AccessDenied:
                cpu = None
        return Process(pid=pid, user=user, started=started, rss=rss, cpu_percent=cpu)
    except psutil.NoSuchProcess:
        return None


def load(name: str, state_base: str | None = None, cpu_interval: float | None = None) -> Vm | None:
    """The VM called `name` as its state directory shows it; None when there is none."""
    state_dir = os.path.join(state_base or base(), check_name(name))
    if not os.path.isdir(state_dir):
        return None
    held = lock_held(os.path.join(state_dir, "lock"))
    record = read_json(os.path.join(state_dir, "state.json"))
    pid = record.get("pid")
    pid = pid if isinstance(pid, int) and pid > 0 else None
    started = record.get("started")
    started = float(started) if isinstance(started, int | float) else None
    proc = process(pid, started, cpu_interval) if held and pid is not None else None
    state: State = "stopped"
    if held:
        # Held with no live recorded pid: `vmrun run` has the lock and has not yet written
        # this launch's pid (the file is the last launch's), or exec is under way.
        state = "running" if proc is not None else "starting"
    devices = record.get("devices")
    return Vm(
        name=name,
        state_dir=state_dir,
        state=state,
        pid=pid,
        config=record.get("config") if isinstance(record.get("config"), str) else None,
        run_as=record.get("run_as") if isinstance(record.get("run_as"), str) else None,
        devices=tuple(device_label(d) for d in devices) if isinstance(devices, list) else (),
        process=proc,
    )


def device_label(entry: object) -> str:
    """ "vfio-pci gpu0 (host=0000:01:00.0)" from a state.json device entry."""
    if isinstance(entry, dict):
        return f"{entry.get('driver')} {entry.get('id')} ({entry.get('source')}, {entry.get('backend')})"
    return str(entry)


def all_vms(state_base: str | None = None) -> list[Vm]:
    """Every VM directory under the state base, running or not, by name."""
    root = state_base or base()
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    except PermissionError:
        raise VmError(
            f"cannot list {root}: permission denied",
            "run vmrun as the user who started the VMs, or as root",
        ) from None
    out = []
    for name in names:
        try:
            vm = load(name, root)
        except BadName:
            continue  # not made by vmrun
        if vm is not None and os.path.exists(vm.lock_file):
            out.append(vm)
    return out


def running(name: str, cpu_interval: float | None = None) -> Vm:
    """The running VM `name`, or a VmError that says it is not running."""
    vm = load(name, cpu_interval=cpu_interval)
    if vm is None or vm.state == "stopped":
        where = base()
        raise VmError(
            f"VM {name} is not running",
            f"`vmrun ps` lists the running VMs under {where}"
            + ("" if os.environ.get("VMRUN_STATE_DIR") else " (VMRUN_STATE_DIR selects another state directory)"),
        )
    if vm.state == "starting":
        raise VmError(
            f"VM {name} is starting: its lock is held but QEMU's pid is not recorded yet",
            "try again in a moment; if it stays so, a process other than QEMU holds "
            f"{vm.lock_file} (`fuser {vm.lock_file}` names it)",
        )
    return vm
