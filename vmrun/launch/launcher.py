"""Carrying out a plan: the only module of vmrun with side effects.

Order matters: stdio is made safe, every file is opened (nothing has changed yet if one
fails), the iommufd accounting is set while the fd is fresh, the fds are put at their
numbers, the memlock limit is set while vmrun may still raise it, privileges are dropped,
every other fd is closed, and QEMU replaces this process.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import sys
import termios
import time

from vmrun.base import layout
from vmrun.base.cpulist import format_cpulist
from vmrun.base.errors import LaunchError
from vmrun.base.sizes import format_limit
from vmrun.kernel import statedir
from vmrun.kernel.opener import Opener
from vmrun.kernel.privileges import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    become,
    cap_last,
    capability_sets,
    no_new_privs,
    prctl,
)
from vmrun.launch import fd_open

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from vmrun.plan.planner import FdSpec, Plan

    Exec = Callable[[str, list[str], dict[str, str]], NoReturn]


def ensure_stdio() -> None:
    # With a closed stdin, the first open() would land on fd 0 and QEMU would lose it later.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


class StateDir:
    """The running VM's directory under the state base, held open as an fd for the launch.

    Everything vmrun makes there (lock, sockets, pid, state.json, the VNC directory) is made
    through this fd: see statedir for why nothing there is reached through a path.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.path = plan.state_dir
        base = os.path.dirname(self.path)
        try:
            base_fd = statedir.open_dir(base, create=True, mode=0o755 if os.geteuid() == 0 else 0o700)
            try:
                self.fd = statedir.open_subdir(base_fd, base, plan.name, create=True)
            finally:
                os.close(base_fd)
        except statedir.UnsafeDirectory as e:
            raise LaunchError(e.what, e.hint) from None
        except OSError as e:
            raise LaunchError(
                f"cannot make {self.path}: {e.strerror}", "set VMRUN_STATE_DIR to a writable directory"
            ) from None

    def close(self) -> None:
        os.close(self.fd)

    def take_lock(self) -> int:
        """Lock the VM's name; the fd goes to QEMU, which so holds the lock until it exits."""
        try:
            fd = statedir.open_file(self.fd, self.path, layout.LOCK, os.O_RDWR | os.O_CREAT)
        except statedir.UnsafeDirectory as e:
            raise LaunchError(e.what, e.hint) from None
        except OSError as e:
            raise LaunchError(f"cannot create {self.path}/lock: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.read_pid()
            raise LaunchError(
                f"VM {self.plan.name} is already running" + (f" (pid {pid})" if pid else ""),
                f"stop it first (vmrun stop {self.plan.name}), or give this config another vm.name",
            ) from None
        # Ours now: what the last run left is history. Record this launch before anything
        # else, so `ps`/`stop` can tell it from a process that only holds the lock. The pid
        # file goes first and comes back last (see state.load, which reads them the other way).
        try:
            for name in (layout.PID, layout.RECORD):
                try:
                    statedir.remove(self.fd, name)
                except OSError as e:
                    raise LaunchError(
                        f"cannot remove {self.path}/{name} of the last run: {e.strerror}",
                        f"vmrun alone writes there; remove it (rm -r {self.path}/{name})",
                    ) from None
            st = os.fstat(fd)
            self.lock_id = (st.st_dev, st.st_ino)
            self.write_state("starting")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_pid(self) -> int | None:
        try:
            data = statedir.read_file(self.fd, self.path, layout.PID, limit=32)
            return int(data) if data else None
        except (OSError, ValueError, statedir.UnsafeDirectory):
            return None

    def listen(self, spec: FdSpec) -> int:
        assert spec.path is not None
        try:
            return statedir.listen_unix(self.fd, self.path, os.path.basename(spec.path))
        except statedir.UnsafeDirectory as e:
            raise LaunchError(e.what, e.hint) from None
        except OSError as e:
            raise LaunchError(f"cannot create the socket {spec.path} ({spec.purpose}): {e.strerror}") from None

    def vnc_dir(self, spec: FdSpec) -> int:
        """A directory QEMU's user owns, passed as an fd; QEMU creates its VNC socket there
        through /proc/self/fd/N. The state directory stays root's alone, so only root can
        reach the socket by its path."""
        assert spec.path is not None
        try:
            return statedir.user_dir(self.fd, os.path.basename(spec.path), self.plan.run_as)
        except OSError as e:
            raise LaunchError(f"cannot make the directory {spec.path} ({spec.purpose}): {e.strerror}") from None

    def write_state(self, phase: str) -> None:
        """What `vmrun ps` and `vmrun stop` read. The pid is QEMU's, as exec keeps it, and so is
        the start time in clock ticks: together with the lock they prove which process is the VM."""
        plan = self.plan
        state = {
            "name": plan.name,
            "config": os.path.abspath(plan.config),
            "phase": phase,
            "pid": os.getpid(),
            "start_ticks": own_start_ticks(),
            "exe": os.path.realpath(plan.argv[0]),
            # What this process is until it execs QEMU: how `ps` tells "starting" from a
            # process that became something else.
            "launcher": os.readlink("/proc/self/exe").removesuffix(" (deleted)"),
            "lock": list(self.lock_id),
            "started": time.time(),
            "run_as": plan.run_as.name if plan.run_as else None,
            "devices": [layout.device_entry(d.driver, d.id, d.source, d.backend) for d in plan.passthrough],
            "argv": plan.argv,
        }
        try:
            statedir.write_file(self.fd, layout.RECORD, (json.dumps(state, indent=1) + "\n").encode())
            statedir.write_file(self.fd, layout.PID, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise LaunchError(
                f"cannot write the VM's state in {self.path}: {e.strerror}",
                f"vmrun alone writes there; remove what is in the way (ls -la {self.path})",
            ) from None


def own_start_ticks() -> int:
    """This process's start time in clock ticks since boot (/proc/self/stat field 22); exec keeps it."""
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def open_data(plan: Plan, spec: FdSpec) -> int:
    """vmrun's own per-VM file (the default UEFI variable store), made from its template when missing."""
    assert spec.path is not None and spec.template is not None
    vm_dir = os.path.dirname(spec.path)
    try:
        return statedir.open_data_copy(os.path.dirname(vm_dir), plan.name, os.path.basename(spec.path), spec.template)
    except statedir.UnsafeDirectory as e:
        raise LaunchError(e.what, e.hint) from None
    except OSError as e:
        raise LaunchError(f"cannot make or open {spec.path} ({spec.purpose}): {e.strerror}") from None


def open_planned(plan: Plan, state: StateDir, opener: Opener | None = None) -> dict[int, int]:
    """Open every planned file; returns {planned number: fd as opened}. All or nothing.

    `opener` (closed here, as QEMU must not inherit its helper) is used when it opens as
    plan.run_as: then no second helper is started.
    """
    opened: dict[int, int] = {}
    if opener is not None and opener.user != Opener(plan.run_as).user:
        opener.close()
        opener = None
    with opener if opener is not None else Opener(plan.run_as) as as_user:
        return open_each(plan, state, opened, as_user)


def open_each(plan: Plan, state: StateDir, opened: dict[int, int], as_user: Opener) -> dict[int, int]:
    try:
        # The lock first: a second launch of a running VM must say so, not fail on a busy device.
        for spec in sorted(plan.fds, key=lambda f: f.kind != "lock"):
            if spec.kind == "lock":
                opened[spec.fd] = state.take_lock()
                continue
            if spec.kind in ("qmp", "console"):
                opened[spec.fd] = state.listen(spec)
                continue
            if spec.kind == "data":
                opened[spec.fd] = open_data(plan, spec)
                continue
            if spec.kind == "vncdir":
                opened[spec.fd] = state.vnc_dir(spec)
                continue
            if spec.path is not None:
                opened[spec.fd] = fd_open.open_for_qemu(spec, plan.host_root, as_user)
    except LaunchError:
        for fd in opened.values():
            os.close(fd)
        raise
    return opened


def check_caller_fds(plan: Plan, passed: frozenset[int] | None) -> None:
    for spec in plan.fds:
        if spec.path is None:
            fd_open.check_caller_fd(spec, "vmrun run CONFIG", passed)


def place_fds(opened: dict[int, int], caller: list[int]) -> None:
    """Put each opened fd at its planned number, inheritable; caller fds stay where they are."""
    # Move everything above the planned numbers first, so no dup2 overwrites a file
    # that is still waiting to be placed (an opened fd may sit on another's number).
    floor = max([*opened, *caller, 2]) + 1
    parked = {}
    for target, fd in opened.items():
        parked[target] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
        os.close(fd)
    for target, fd in parked.items():
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
        # dup2 onto the same number is a no-op that keeps CLOEXEC: be explicit.
        os.set_inheritable(target, True)
    for fd in caller:
        os.set_inheritable(fd, True)


def set_memlock(limit: int | None) -> None:
    if limit is None:
        return
    try:
        # Soft and hard alike: a de-privileged QEMU must not raise its own limit later.
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    except (ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
        raise LaunchError(
            f"cannot set RLIMIT_MEMLOCK to {format_limit(limit)}: the hard limit is {format_limit(hard)}",
            "run vmrun as root, or raise the caller's limit (systemd LimitMEMLOCK=, ulimit -l)",
        ) from None


def set_cpu_affinity(plan: Plan, say: Callable[[str], None]) -> None:
    """Put QEMU on the CPUs of its RAM's node, as far as vmrun itself may run there.

    Set here, not by QEMU: its sandbox (resourcecontrol=deny) refuses sched_setaffinity.
    """
    wanted = plan.cpu_affinity
    if wanted is None:
        return
    allowed = os.sched_getaffinity(0)
    usable = set(wanted) & allowed
    node = f"NUMA node {plan.numa_node}'s" if plan.numa_node is not None else "the planned"
    if not usable:
        say(
            f"vmrun: none of {node} CPUs ({format_cpulist(wanted)}) is allowed to vmrun"
            f" (it may use {format_cpulist(allowed)}): QEMU's CPU affinity stays as it is"
        )
        return
    if usable != set(wanted):
        say(
            f"vmrun: QEMU runs on CPUs {format_cpulist(usable)}, the part of {node} CPUs"
            f" ({format_cpulist(wanted)}) that vmrun may use"
        )
    try:
        os.sched_setaffinity(0, usable)
    except OSError as e:
        raise LaunchError(f"cannot set QEMU's CPU affinity to {format_cpulist(usable)}: {e.strerror}") from None


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def leave_terminal() -> None:
    """Give up the controlling terminal, keeping stdio and the process group.

    A de-privileged QEMU that kept root's terminal as its controlling one could push
    keystrokes into root's shell (TIOCSTI) or open /dev/tty. TIOCNOTTY drops it for this
    process alone; Ctrl-C still reaches QEMU through its process group.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return  # no controlling terminal
    leader = os.getsid(0) == os.getpid()
    # A session leader giving up its terminal hangs up its foreground group: that is us.
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN) if leader else None
    try:
        fcntl.ioctl(tty, termios.TIOCNOTTY)
    except OSError as e:
        raise LaunchError(f"cannot give up the controlling terminal: {e.strerror}") from None
    finally:
        os.close(tty)
        if old is not None:
            signal.signal(signal.SIGHUP, old)


def drop_privileges(plan: Plan) -> None:
    """Become the VM user for good: no capabilities in any set, no way to gain any by exec."""
    user = plan.run_as
    if user is not None and os.geteuid() != user.uid:
        if os.geteuid() != 0:
            raise LaunchError(f"vmrun runs as uid {os.geteuid()} and cannot switch to {user.name}", "run vmrun as root")
        leave_terminal()
        try:
            # Emptied while vmrun still has CAP_SETPCAP: then no exec can bring a capability back.
            for cap in range(cap_last() + 1):
                prctl(PR_CAPBSET_DROP, cap)
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
            become(user)
        except OSError as e:
            raise LaunchError(f"cannot switch to user {user.name}: {e.strerror}") from None
        if user.uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise LaunchError(f"dropping to {user.name} did not stick: the process could become root again")
            left = {k: v for k, v in capability_sets().items() if v}
            if left:
                sets = ", ".join(f"{k} {v:#x}" for k, v in left.items())
                raise LaunchError(f"dropping to {user.name} left capabilities: {sets}")
    try:
        no_new_privs()
    except OSError as e:
        raise LaunchError(f"cannot set no_new_privs: {e.strerror}") from None


def close_other_fds(keep: set[int]) -> None:
    highest = max(os.sysconf("SC_OPEN_MAX"), max(keep) + 1)
    start = 0
    for fd in sorted(keep):
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, highest)


def launch(
    plan: Plan, execve: Exec = os.execve, opener: Opener | None = None, passed: frozenset[int] | None = None
) -> NoReturn:
    """Carry out `plan` and exec QEMU. Raises LaunchError before exec when a step fails.

    `opener`: the one the plan's facts were read with, if any; it opens the files too.
    `passed`: the fds open when vmrun started (fd_open.open_fds), i.e. the caller's: by
    now the opener's socket may sit on a number a config names as a caller fd.
    """
    if plan.problems:
        raise LaunchError(
            "the plan has problems:\n" + "\n".join(f"  {p.render(plan.file_of(p.path))}" for p in plan.problems),
            "fix them, then run again; `vmrun plan` shows the whole plan",
        )
    ensure_stdio()
    check_caller_fds(plan, passed)
    state = StateDir(plan)
    opened = open_planned(plan, state, opener)
    # Before the fds move: the directory's own fd may sit on a planned number.
    state.write_state("exec")
    state.close()
    caller = [f.fd for f in plan.fds if f.kind == "inherited"]
    place_fds(opened, caller)
    set_memlock(plan.memlock.limit)
    set_cpu_affinity(plan, warn)
    drop_privileges(plan)
    close_other_fds({0, 1, 2, *(f.fd for f in plan.fds)})
    argv = plan.argv
    try:
        execve(argv[0], argv, dict(plan.env))
    except OSError as e:
        raise LaunchError(f"cannot execute {argv[0]}: {e.strerror}", "check vm.qemu") from None
