"""The running VMs as the host shows them: one state directory per VM name.

`vmrun run` leaves `lock`, `pid`, `state.json` and `qmp.sock` in `<state base>/NAME`, and
QEMU inherits the lock. A VM is running only while a process is *proven* to be its QEMU:
it has the pid and the exact start time (in clock ticks) that state.json records, it holds
the VM's lock in its fd table, and it is the recorded binary. A pid alone proves nothing
(pids are reused; anyone may flock a file), so nothing is signalled on a pid alone: the
proof is made on a pidfd, through which every signal then goes.

Everything here is read through directory fds that refuse symlinks (see statedir). The
only thing written is the removal of a stale record, when the recorded process is not
the VM's QEMU.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import time
from collections.abc import Iterator
from typing import Any, Literal

import attrs

# Defined with the other error types, so `vmrun run` can catch them without importing this module.
from vmrun.base import layout
from vmrun.base.errors import BadName, VmError
from vmrun.base.text import printable
from vmrun.config import rules
from vmrun.host import reader
from vmrun.kernel import statedir

# running: proven to be the VM's QEMU; starting: the launching vmrun, before it execs QEMU;
# stale: the lock is held, but not by the process recorded; stopped: nobody holds the lock;
# unknown: the lock is held, and vmrun may not look into the recorded process to tell.
State = Literal["running", "starting", "stale", "stopped", "unknown"]


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
class Identity:
    """What state.json records of the launch: enough to prove a process is the VM's QEMU."""

    pid: int
    start_ticks: int
    exe: str
    argv: tuple[str, ...]
    lock: tuple[int, int]  # st_dev, st_ino of the lock file
    execed: bool  # the record of the exec (phase "exec"), not of the launch's start
    launcher: str | None = None  # the launching vmrun's binary (its interpreter), before it execs QEMU

    @classmethod
    def of(cls, record: dict[str, Any]) -> Identity | None:
        try:
            pid, ticks, exe = record["pid"], record["start_ticks"], record["exe"]
            dev, ino = record["lock"]
            argv = tuple(str(a) for a in record.get("argv", ()))
        except (KeyError, TypeError, ValueError):
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, ticks, dev, ino)):
            return None
        if pid <= 0 or not isinstance(exe, str):
            return None
        launcher = record.get("launcher")
        return cls(
            pid,
            ticks,
            exe,
            argv,
            (dev, ino),
            record.get("phase") == "exec",
            launcher if isinstance(launcher, str) else None,
        )


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
    why: str = ""  # for stale: why the recorded process is not the VM's QEMU
    identity: Identity | None = None
    record: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)  # state.json as it was judged

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.state_dir, layout.QMP_SOCKET)

    @property
    def lock_file(self) -> str:
        return os.path.join(self.state_dir, layout.LOCK)

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
    where = reader.state_base(os.geteuid())
    if where is None:
        raise VmError(
            "no state directory: XDG_RUNTIME_DIR is not set",
            "set XDG_RUNTIME_DIR or VMRUN_STATE_DIR (as when the VMs were started), or run vmrun as root",
        )
    return where


def check_name(name: str) -> str:
    if not rules.NAME_RE.fullmatch(name):
        raise BadName(f"{name!r} is not a VM name (letters, digits, '-', '.' and '_', as vm.name in a config)")
    return name


def lock_state(directory: int, dir_path: str) -> tuple[bool, tuple[int, int] | None]:
    """(held, (st_dev, st_ino)) of the VM's lock file; (False, None) when there is none.

    A shared lock that we get means nobody holds the exclusive one; it is released at once
    by closing, so a `vmrun run` racing with us fails only within that instant.
    """
    try:
        fd = statedir.open_file(directory, dir_path, layout.LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    except PermissionError:
        raise VmError(
            f"cannot read {dir_path}/lock: permission denied",
            "the VMs under this state directory belong to another user; run vmrun as that user or as root",
        ) from None
    except statedir.UnsafeDirectory as e:
        raise VmError(e.what, e.hint) from None
    try:
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True, (st.st_dev, st.st_ino)
            raise
    finally:
        os.close(fd)
    return False, (st.st_dev, st.st_ino)


def inode_of(directory: int, name: str) -> int | None:
    """The inode of the entry `name` itself (a link is not followed); None when there is none."""
    try:
        return os.stat(name, dir_fd=directory, follow_symlinks=False).st_ino
    except OSError:
        return None


def read_record(directory: int, dir_path: str) -> tuple[dict[str, Any], int | None]:
    """state.json as a dict ({} when missing or damaged) and its inode."""
    try:
        fd = statedir.open_file(directory, dir_path, layout.RECORD, os.O_RDONLY)
    except (FileNotFoundError, statedir.UnsafeDirectory, PermissionError):
        return {}, None
    try:
        inode = os.fstat(fd).st_ino
        data = os.read(fd, statedir.MAX_RECORD + 1)
    finally:
        os.close(fd)
    try:
        record = json.loads(data) if len(data) <= statedir.MAX_RECORD else {}
    except ValueError:
        record = {}
    return (record if isinstance(record, dict) else {}), inode


def start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def holds(pid: int, lock: tuple[int, int]) -> bool:
    """Whether process `pid` has the lock file open (its fd table, /proc/PID/fd)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{name}")
            if (st.st_dev, st.st_ino) == lock:
                return True
    return False


@attrs.frozen
class Verdict:
    state: State
    why: str = ""
    final: bool = False  # stale for good: the record can never come true


def judge(identity: Identity, lock: tuple[int, int]) -> Verdict:
    """Is the recorded process the VM's QEMU ("running"), the vmrun about to exec it
    ("starting"), or not the VM at all ("stale", with why)? "unknown" when /proc does not
    let vmrun look (another user's process, for a vmrun that is not root)."""
    pid = identity.pid
    try:
        if start_ticks(pid) != identity.start_ticks:
            return Verdict("stale", f"pid {pid} is a later process than the one vmrun started", final=True)
        if identity.lock != lock:
            return Verdict("stale", "the lock file was replaced since the launch", final=True)
        if not holds(pid, lock):
            return Verdict("stale", f"pid {pid} does not hold the VM's lock", final=True)
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0")[:-1])
    except FileNotFoundError:
        return Verdict("stale", f"pid {pid} has exited", final=True)
    except PermissionError as e:
        where = e.filename if isinstance(e.filename, str) else f"/proc/{pid}"
        return Verdict(
            "unknown", f"cannot prove pid {pid} is the VM's QEMU: {where} is not readable for uid {os.geteuid()}"
        )
    # A QEMU run through an interpreter (a wrapper script) shows the interpreter as exe, and
    # the kernel puts the interpreter before the script's own argv: its argv says.
    if exe == identity.exe or identity.argv in (argv, argv[1:]):
        return Verdict("running")
    if not argv:
        # Caught inside execve: the new exe is in place, the new command line not yet
        # (the kernel sets it up after switching the exe). Neither verdict is final yet.
        return Verdict("starting")
    if identity.launcher is not None:
        if exe == identity.launcher:
            return Verdict("starting")  # vmrun itself, between taking the lock and exec
        # Neither vmrun nor its QEMU: what the process became (or never was) cannot turn back.
        return Verdict("stale", f"pid {pid} runs {printable(exe)}, not the recorded {identity.exe}", final=True)
    # A record that does not name the launcher: before exec, the launching vmrun; after,
    # vmrun in its last instant before exec or something its QEMU became. Not the VM
    # either way, and the record may still come true.
    if not identity.execed:
        return Verdict("starting")
    return Verdict("stale", f"pid {pid} runs {printable(exe)}, not the recorded {identity.exe}")


def has_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (a zombie included)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def prove(identity: Identity, lock: tuple[int, int]) -> tuple[Verdict, int | None]:
    """The verdict on the recorded process, made on a pidfd opened before looking at it,
    and the pidfd when the process is the VM's QEMU or its launching vmrun (the caller
    closes it).

    The pidfd pins the process: if the proof holds after it was opened, it is about the
    process the pidfd names (a reused pid would have another start time), and every
    signal sent through the pidfd reaches that process or none.
    """
    pid = identity.pid
    exited = Verdict("stale", f"pid {pid} has exited", final=True)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return exited, None
    try:
        verdict = judge(identity, lock)
        if verdict.state not in ("running", "starting"):
            os.close(pidfd)
            return verdict, None
        # Still the same live process after the proof? (A zombie has let go of its lock.)
        with contextlib.suppress(PermissionError):  # not ours to signal, but alive
            signal.pidfd_send_signal(pidfd, 0)
        if has_exited(pidfd):
            raise ProcessLookupError
    except ProcessLookupError:
        os.close(pidfd)
        return exited, None
    except BaseException:
        os.close(pidfd)
        raise
    return verdict, pidfd


def open_pidfd(identity: Identity, lock: tuple[int, int]) -> int:
    """A pidfd on the VM's QEMU, proven to be it; VmError when it is not (anymore)."""
    verdict, pidfd = prove(identity, lock)
    if verdict.state == "running" and pidfd is not None:
        return pidfd
    if pidfd is not None:
        os.close(pidfd)
    if verdict.state == "unknown":
        raise VmError(f"{verdict.why}; nothing was signalled", "run vmrun as root, or as the user QEMU runs as")
    raise VmError(
        f"pid {identity.pid} is not the VM's QEMU" + (f": {verdict.why}" if verdict.why else " yet"),
        "nothing was signalled",
    )


def process(pid: int, cpu_interval: float | None = None) -> Process | None:
    """Facts about the process `pid` for display; None when it is gone."""
    import psutil  # not at the top: `vmrun run` imports this module for its errors, and starts fast

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None  # exited, not yet reaped by its parent: its fds (and the lock) are closed
            started = proc.create_time()
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


def open_vm_dir(name: str, state_base: str) -> int | None:
    try:
        base_fd = statedir.open_dir(state_base, create=False)
    except FileNotFoundError:
        return None
    except statedir.UnsafeDirectory as e:
        raise VmError(e.what, e.hint) from None
    try:
        return statedir.open_subdir(base_fd, state_base, name, create=False)
    except FileNotFoundError:
        return None
    except statedir.UnsafeDirectory as e:
        raise VmError(e.what, e.hint) from None
    finally:
        os.close(base_fd)


@contextlib.contextmanager
def vm_directory(vm: Vm) -> Iterator[int]:
    """The VM's state directory as an fd (see statedir), closed on leaving."""
    directory = open_vm_dir(vm.name, os.path.dirname(vm.state_dir))
    if directory is None:
        raise VmError(f"VM {vm.name} has no state directory any more")
    try:
        yield directory
    finally:
        os.close(directory)


def read_vm_record(vm: Vm) -> dict[str, Any]:
    """The VM's record as it is now ({} when missing or damaged)."""
    with vm_directory(vm) as directory:
        return read_record(directory, vm.state_dir)[0]


def write_vm_record(vm: Vm, record: dict[str, Any], pid: int | None = None) -> None:
    """Replace the VM's record (attach and detach keep what they added in it); with `pid`,
    the pid file too, after the record, as the launch writes them (load reads the other way)."""
    with vm_directory(vm) as directory:
        files = [(layout.RECORD, json.dumps(record, indent=1) + "\n")]
        files += [(layout.PID, f"{pid}\n")] if pid is not None else []
        for name, text in files:
            try:
                statedir.write_file(directory, name, text.encode())
            except OSError as e:
                raise VmError(f"cannot update {vm.state_dir}/{name}: {e.strerror}") from None


def load(name: str, state_base: str | None = None, cpu_interval: float | None = None) -> Vm | None:
    """The VM called `name` as its state directory shows it; None when there is none.

    A record whose process is not the VM's QEMU is stale: it is removed, and the VM shows
    as "stale" (lock held by another process) or "stopped".
    """
    where = state_base or base()
    state_dir = os.path.join(where, check_name(name))
    directory = open_vm_dir(name, where)
    if directory is None:
        return None
    try:
        held, lock = lock_state(directory, state_dir)
        # The pid file before state.json: a launch removes pid first and writes it last, so
        # a pid file seen before an old state.json is old too (or gone), never the launch's.
        pid_inode = inode_of(directory, layout.PID)
        record, inode = read_record(directory, state_dir)
        identity = Identity.of(record)
        verdict = Verdict("stopped")
        if held and lock is not None:
            if identity is None:
                verdict = Verdict("stale", "state.json does not identify the launch", final=True)
            else:
                verdict, pidfd = prove(identity, lock)
                if pidfd is not None:
                    os.close(pidfd)
        state, why = verdict.state, verdict.why
        if not held or verdict.final:
            # A record of a VM that is gone, or of a process that can never be the VM (it
            # exited, started later, does not hold the lock, became something else):
            # history. Only the files judged: a launch may have just written fresh ones.
            for entry, seen in ((layout.RECORD, inode), (layout.PID, pid_inode)):
                if seen is not None:
                    with contextlib.suppress(OSError):  # tidying only: what is left is ignored
                        statedir.remove(directory, entry, seen)
    finally:
        os.close(directory)
    pid = identity.pid if identity else None
    proc = process(pid, cpu_interval) if state == "running" and pid is not None else None
    devices = record.get("devices")
    return Vm(
        name=name,
        state_dir=state_dir,
        state=state if proc is not None or state != "running" else "stopped",
        pid=pid,
        config=record.get("config") if isinstance(record.get("config"), str) else None,
        run_as=record.get("run_as") if isinstance(record.get("run_as"), str) else None,
        devices=tuple(layout.device_label(d) for d in devices) if isinstance(devices, list) else (),
        process=proc,
        why=why,
        identity=identity if state == "running" else None,
        record=record if state == "running" else {},
    )


def all_vms(state_base: str | None = None) -> list[Vm]:
    """Every VM directory under the state base, running or not, by name."""
    root = state_base or base()
    try:
        base_fd = statedir.open_dir(root, create=False)
    except FileNotFoundError:
        return []
    except PermissionError:
        raise VmError(
            f"cannot list {root}: permission denied",
            "run vmrun as the user who started the VMs, or as root",
        ) from None
    except statedir.UnsafeDirectory as e:
        raise VmError(e.what, e.hint) from None
    try:
        names = sorted(os.listdir(base_fd))
    finally:
        os.close(base_fd)
    out = []
    for name in names:
        try:
            vm = load(name, root)
        except (BadName, VmError):
            continue  # not made by vmrun, or not one vmrun will read: `vmrun status NAME` says why
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
    if vm.state == "stale":
        raise VmError(
            f"VM {name} is not running (stale state: {vm.why}); nothing was signalled",
            f"a process other than its QEMU holds {vm.lock_file} (`fuser {vm.lock_file}` names it); "
            "the stale record was removed",
        )
    if vm.state == "unknown":
        raise VmError(f"{vm.why}; nothing was signalled", "run vmrun as root, or as the user QEMU runs as")
    if vm.state == "starting":
        raise VmError(
            f"VM {name} is starting: vmrun has its lock and has not yet started QEMU",
            "try again in a moment",
        )
    return vm


def lock_held(lock_file: str) -> bool:
    """Whether someone holds the lock `<state base>/NAME/lock` (read through directory fds)."""
    state_dir = os.path.dirname(lock_file)
    directory = open_vm_dir(os.path.basename(state_dir), os.path.dirname(state_dir))
    if directory is None:
        return False
    try:
        return lock_state(directory, state_dir)[0]
    finally:
        os.close(directory)
